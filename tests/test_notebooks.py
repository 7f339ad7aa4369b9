"""The Colab notebooks run headless on CPU with tiny settings, and match their generator.

Each notebook's ``parameters`` cell is followed by an injected cell (the papermill
convention) with 1 epoch, 1 seed and paths in a temporary folder; the kernel gets the
project on PYTHONPATH, the shared data, an empty cache and no network. Compiling dominates
such tiny runs, so XLA optimisations are off, and both notebooks run at the same time.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import pathlib
import re
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import PROJECT_ROOT, shared_data_path

NOTEBOOKS = PROJECT_ROOT / "notebooks"


def _generator():
  spec = importlib.util.spec_from_file_location("build_notebooks",
                                                NOTEBOOKS / "build_notebooks.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def inject_parameters(nb: nbformat.NotebookNode, params: dict) -> nbformat.NotebookNode:
  """Insert a cell assigning ``params`` right after the cell tagged ``parameters``."""
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, "a notebook needs exactly one cell tagged 'parameters'"
  cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
  cell.id = "injected-parameters"
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(tagged[0] + 1, cell)
  return nb


def execute(name: str, params: dict, cwd: pathlib.Path) -> nbformat.NotebookNode:
  nb = inject_parameters(nbformat.read(NOTEBOOKS / name, as_version=4), params)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(cwd)}}).execute()
  return nb


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """Run both notebooks (concurrently); {name: (executed notebook, work folder)}."""
  data_dir = shared_data_path()
  if not data_dir.is_dir():
    pytest.skip(f"shared data not found at {data_dir} (set FAST_JAX_SHARED_DATA)")
  root = tmp_path_factory.mktemp("notebooks")
  runs = {
      "quickstart.ipynb": dict(DATA_DIR=str(data_dir), OUT_DIR=str(root / "quickstart"),
                               EPOCHS=1, SEEDS=1, BATCH_SIZE=32),
      "bring_your_own_data.ipynb": dict(WORK_DIR=str(root / "byod"), NUM_USERS=60,
                                        METHODS=["fast"], EPOCHS=1, SEEDS=1, BATCH_SIZE=16),
  }
  with pytest.MonkeyPatch.context() as mp:  # the kernels inherit this environment
    mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                          os.environ.get("PYTHONPATH")])))
    mp.setenv("FAST_JAX_OFFLINE", "1")
    mp.setenv("FAST_JAX_CACHE", str(root / "cache"))
    mp.setenv("JAX_PLATFORMS", "cpu")
    mp.setenv("MPLBACKEND", "agg")
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
      futures = {name: pool.submit(execute, name, params, root) for name, params in runs.items()}
      return {name: (f.result(), root) for name, f in futures.items()}


def _outputs(nb) -> str:
  return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))


def test_quickstart_trains_melu_fast_on_ml100k_and_plots_p(executed):
  nb, root = executed["quickstart.ipynb"]
  out = root / "quickstart"
  results = json.loads((out / "results.json").read_text())
  assert results["config"]["method"] == "fast" and results["config"]["backbone"] == "melu"
  assert [r["seed"] for r in results["per_seed"]] == [1024]
  assert set(results["mean"]["group"]) == {"0", "1"}
  assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
  assert (out / "p_and_group_losses.png").stat().st_size > 1000
  text = _outputs(nb)
  assert "backend: cpu" in text and "train:  408 users" in text


def test_bring_your_own_data_prepares_csvs_trains_and_reports_groups(executed):
  nb, root = executed["bring_your_own_data.ipynb"]
  work = root / "byod"
  for name in ("ratings.csv", "users.csv", "items.csv", "prepared/meta.json",
               "runs/fast/results.json", "group_report.csv"):
    assert (work / name).is_file(), name
  meta = json.loads((work / "prepared" / "meta.json").read_text())
  assert meta["dataset"] == "custom" and meta["sensitive"]["groups"] == ["F", "M"]
  assert sum(meta["counts"][s]["users"] for s in ("train", "valid", "test")) == 60
  report = (work / "group_report.csv").read_text().splitlines()
  assert report[0] == "method,group,users,MAE,MSE,NDCG@3" and len(report) == 3
  assert "GF(MAE)" in _outputs(nb)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "bring_your_own_data.ipynb"])
def test_notebooks_match_their_generator_and_have_no_outputs(name):
  text = (NOTEBOOKS / name).read_text(encoding="utf-8")
  assert text == _generator().render(name), (
      f"notebooks/{name} differs from notebooks/build_notebooks.py: edit the cells there "
      "and run `python notebooks/build_notebooks.py`")
  nb = nbformat.reads(text, as_version=4)
  nbformat.validate(nb)
  assert all(not c.get("outputs") and c.get("execution_count") is None
             for c in nb.cells if c.cell_type == "code")


def _install_cell(repo_url: str = "") -> str:
  source = _generator().INSTALL
  assert source.count('REPO_URL = ""') == 1
  return source.replace('REPO_URL = ""', f"REPO_URL = {repo_url!r}")


@pytest.fixture
def not_installed(monkeypatch, tmp_path):
  """The install cell's view of a fresh runtime: fast_jax not importable, pip recorded."""
  import importlib.util
  import subprocess
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "fast_jax" else find_spec(name, *a))
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
  monkeypatch.chdir(tmp_path)
  return calls


def test_install_cell_installs_a_clone_next_to_the_notebook(not_installed, tmp_path):
  clone = tmp_path / "fast-jax"
  (clone / "fast_jax").mkdir(parents=True)
  (clone / "fast_jax" / "__init__.py").write_text("")
  (clone / "pyproject.toml").write_text("")
  exec(_install_cell(), {})
  assert not_installed == [[sys.executable, "-m", "pip", "install", "-q", str(clone)]]


def test_install_cell_installs_from_repo_url(not_installed):
  exec(_install_cell("https://example.org/o/fast-jax@dev"), {})
  assert not_installed == [[sys.executable, "-m", "pip", "install", "-q",
                            "git+https://example.org/o/fast-jax@dev"]]


def test_install_cell_without_a_clone_or_repo_url_stops_with_one_sentence(not_installed):
  with pytest.raises(SystemExit) as stop:
    exec(_install_cell(), {})
  message = str(stop.value)
  assert not_installed == []
  assert "REPO_URL" in message and message.endswith(".") and message.count(". ") == 0
  assert "\n" not in message


@pytest.mark.parametrize("name", ["quickstart.ipynb", "bring_your_own_data.ipynb"])
def test_notebooks_use_the_packaged_command_and_name_no_placeholder_repository(name):
  text = "\n".join(c.source for c in nbformat.read(NOTEBOOKS / name, as_version=4).cells)
  assert "experiments/" not in text and "-m data_prep" not in text
  assert "import data_prep" not in text and "your-org" not in text
  assert 'pip install "fast-jax[cuda12]"' in text and '"jax[tpu]"' in text
  assert ("fast-jax run " if name == "quickstart.ipynb" else "fast-jax prep ") in text
  # the JAX versions the runtime note promises are pyproject's bounds
  low, high = re.search(r'"jax>=([0-9.]+),<0\.([0-9]+)"',
                        (PROJECT_ROOT / "pyproject.toml").read_text()).groups()
  assert f"JAX {low} to 0.{int(high) - 1}" in text
