"""The ```python blocks of docs/extending.md and docs/results.md run, in order, in one
namespace per guide.

extending.md's run in a temporary folder with a temporary cache and no network, so their
relative paths (prepared/, runs/) and ensure_prepared's cache stay out of the
repository; results.md's read the committed runs from the repository root.
"""

from __future__ import annotations

import re
import sys
import types

import pytest

from conftest import PROJECT_ROOT
from fast_jax import methods

GUIDE = PROJECT_ROOT / "docs" / "extending.md"
RESULTS_GUIDE = PROJECT_ROOT / "docs" / "results.md"


def python_blocks(markdown: str) -> list[str]:
  """The bodies of the blocks fenced as ```python (not ```py, ```bash, ...)."""
  return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.S | re.M)


def test_extending_guide_snippets_run(tmp_path, monkeypatch):
  blocks = python_blocks(GUIDE.read_text(encoding="utf-8"))
  assert len(blocks) >= 6
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("FAST_JAX_CACHE", str(tmp_path / "cache"))
  module = types.ModuleType("extending_md")  # Flax modules (dataclasses) need a real module
  monkeypatch.setitem(sys.modules, module.__name__, module)
  namespace = module.__dict__
  registered = dict(methods.REGISTRY)  # the guide registers a method: not for later tests
  try:
    for i, block in enumerate(blocks):  # a traceback names "extending.md block N", line
      exec(compile(block, f"{GUIDE.name} block {i + 1}", "exec"), namespace)
  finally:
    methods.REGISTRY.clear()
    methods.REGISTRY.update(registered)
  # The snippets did what the guide says they do.
  assert namespace["report"]["group"].keys() == {"0", "1"}
  assert namespace["steps"]["outer_loss"].shape[0] >= 1
  assert (tmp_path / "prepared" / "toy" / "meta.json").is_file()
  assert (tmp_path / "runs" / "toy" / "results.json").is_file()


def test_outline_blocks_are_valid_python():
  text = GUIDE.read_text(encoding="utf-8")
  for block in re.findall(r"^```py\n(.*?)^```$", text, flags=re.S | re.M):
    compile(block if not block.startswith(" ") else "def outline():\n" + block, GUIDE.name, "exec")


def test_results_guide_recomputes_results_json_and_fairlearn_agrees(prepared, tmp_path,
                                                                   monkeypatch):
  """The per-seed snippets give results.json's own GF(MAE) mean and std on a committed
  run; the per-user snippets, on a tiny run's predictions file (committed runs have
  none), give its results.json per-group MAE, inside their bootstrap interval."""
  blocks = python_blocks(RESULTS_GUIDE.read_text(encoding="utf-8"))
  assert len(blocks) == 4
  monkeypatch.chdir(PROJECT_ROOT)
  ns: dict = {}
  for i, block in enumerate(blocks[:2]):
    exec(compile(block, f"{RESULTS_GUIDE.name} block {i + 1}", "exec"), ns)
  assert ns["gap"].mean() == pytest.approx(ns["results"]["mean"]["gf_mae"], abs=1e-9)
  assert ns["gap"].std(ddof=0) == pytest.approx(ns["results"]["std"]["gf_mae"], abs=1e-9)
  assert len(ns["difference"]) == 5

  pytest.importorskip("fairlearn", reason="the test extra installs fairlearn")
  from fast_jax.config import Config
  from fast_jax.experiment import train_and_evaluate
  run = tmp_path / "run"
  results = train_and_evaluate(
      Config(dataset="synthetic", method="origin", epochs=1, seeds=1, batch_size=8,
             lr=1e-3, inner_lr=1e-2, attack=False), run,
      data=prepared("synthetic", num_minority=12, num_majority=36), progress=False,
      echo=lambda text: None)
  ns.update(run=run, results=results)
  for i, block in enumerate(blocks[2:], start=3):
    exec(compile(block, f"{RESULTS_GUIDE.name} block {i}", "exec"), ns)
  (seed,) = results["per_seed"]
  names = results["group_names"]
  assert ns["frame"].overall["mae"] == pytest.approx(seed["mae"], abs=1e-4)
  for key, group in seed["group"].items():
    name = names[int(key)]
    assert ns["frame"].by_group["mae"][name] == pytest.approx(group["mae"], abs=1e-4)
    assert ns["boot"].by_group[name] == pytest.approx(group["mae"], abs=1e-4)
    assert ns["low"][name] <= ns["boot"].by_group[name] <= ns["high"][name]
  assert ns["frame"].difference()["mae"] == pytest.approx(seed["gf_mae"], abs=1e-4)


def _project_texts():
  """(relative path, text) of the project's own source and documentation files."""
  skip = {"results", ".git", "build"}
  for path in sorted(PROJECT_ROOT.rglob("*")):
    rel = path.relative_to(PROJECT_ROOT)
    if (path.is_file() and path.suffix in (".py", ".md", ".ipynb", ".toml")
        and not skip & set(rel.parts) and not any(p.endswith(".egg-info") for p in rel.parts)):
      yield rel, path.read_text(encoding="utf-8")


def test_nothing_cites_notes_outside_the_repository():
  """The method notes the code cites are docs/methods.md; the design notes and research
  notes the project was built from are not shipped, so nothing may point to them."""
  outside = re.compile(r"research/|\b(?:fast|clover|ecosystem)\.md\b|DESIGN\.md|STYLE\.md")
  hits = [f"{rel}:{n}: {line.strip()}" for rel, text in _project_texts()
          for n, line in enumerate(text.splitlines(), 1)
          if outside.search(line) and rel.name != "test_docs.py"]
  assert not hits, "\n".join(hits)


def test_cited_docs_and_markdown_links_exist():
  cited = re.compile(r"\bdocs/[\w-]+\.md\b")
  link = re.compile(r"\]\(([^)\s]+)\)")
  missing = []
  for rel, text in _project_texts():
    for name in set(cited.findall(text)):
      if not (PROJECT_ROOT / name).is_file():
        missing.append(f"{rel}: {name}")
    if rel.suffix == ".md":
      prose = re.sub(r"^```.*?^```$", "", text, flags=re.S | re.M)  # links, not code
      for target in link.findall(prose):
        target = target.split("#")[0]
        if target and "://" not in target and not target.startswith("mailto:"):
          if not (PROJECT_ROOT / rel.parent / target).exists():
            missing.append(f"{rel}: ({target})")
  assert not missing, "\n".join(missing)
