"""The ```python blocks of docs/extending.md run, in order, in one namespace.

They run in a temporary folder with a temporary cache and no network, so their relative
paths (prepared/, runs/) and ensure_prepared's cache stay out of the repository.
"""

from __future__ import annotations

import re
import sys
import types

import jax

from conftest import PROJECT_ROOT

GUIDE = PROJECT_ROOT / "docs" / "extending.md"


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
  optimizations_off = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)  # tiny runs: compiling dominates
  try:
    for i, block in enumerate(blocks):  # a traceback names "extending.md block N", line
      exec(compile(block, f"{GUIDE.name} block {i + 1}", "exec"), namespace)
  finally:
    jax.config.update("jax_disable_most_optimizations", optimizations_off)
  # The snippets did what the guide says they do.
  assert namespace["report"]["group"].keys() == {"0", "1"}
  assert namespace["steps"]["outer_loss"].shape[0] >= 1
  assert (tmp_path / "prepared" / "toy" / "meta.json").is_file()
  assert (tmp_path / "runs" / "toy" / "results.json").is_file()


def test_outline_blocks_are_valid_python():
  text = GUIDE.read_text(encoding="utf-8")
  for block in re.findall(r"^```py\n(.*?)^```$", text, flags=re.S | re.M):
    compile(block if not block.startswith(" ") else "def outline():\n" + block, GUIDE.name, "exec")
