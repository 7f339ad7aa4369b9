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

import jax
import numpy as np
import pandas as pd
import pytest

from conftest import PROJECT_ROOT

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


def test_results_guide_recomputes_results_json_and_fairlearn_agrees(tmp_path, monkeypatch):
  """The per-seed snippets give results.json's own GF(MAE) mean and std; the per-user
  snippets, on a predictions file made here (committed runs have none), give the
  per-group MAE that pandas computes from the same rows, inside its bootstrap interval."""
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
  rng = np.random.default_rng(0)
  users, rows = 40, 10
  group = np.repeat(rng.choice(["M", "F"], users), rows)
  y = rng.integers(1, 6, users * rows).astype(float)
  pred = pd.DataFrame({"user_id": np.repeat(np.arange(users) + 100, rows), "group": group,
                       "item_row": np.tile(np.arange(rows) + 20, users), "y": y,
                       "y_hat": y + rng.normal(0, 0.5 + (group == "F"), users * rows),
                       "y_hat_unadapted": y + rng.normal(0, 2, users * rows)})
  run = tmp_path / "run"
  (run / "predictions").mkdir(parents=True)
  pred.to_csv(run / "predictions" / f"seed-{ns['results']['per_seed'][0]['seed']}.csv",
              index=False)
  ns["run"] = run
  for i, block in enumerate(blocks[2:], start=3):
    exec(compile(block, f"{RESULTS_GUIDE.name} block {i}", "exec"), ns)
  per_user = (pred["y"] - pred["y_hat"]).abs().groupby([pred["user_id"], pred["group"]]).mean()
  expected = per_user.groupby(level="group").mean()
  for g in ("M", "F"):
    assert ns["frame"].by_group["mae"][g] == pytest.approx(expected[g], abs=1e-9)
    assert ns["boot"].by_group[g] == pytest.approx(expected[g], abs=1e-9)
    assert ns["low"][g] <= expected[g] <= ns["high"][g]
  assert ns["frame"].difference()["mae"] == pytest.approx(abs(expected["M"] - expected["F"]))
