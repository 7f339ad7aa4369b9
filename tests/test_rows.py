"""Origin, Reg, IPW and FAST (step mode) on the one program of all four rows
(fast_jax.methods.rows.make): the same compiled epoch for every row, each run's results
those of the method's own program, and checkpoints written before the rows shared it."""

import json

import jax
import numpy as np
import pytest

from fast_jax.checkpoint import SeedCheckpoint
from fast_jax.config import Config, resolve
from fast_jax.experiment import train_and_evaluate
from fast_jax.methods import rows
from fast_jax.runner import Runner

ROW_METHODS = ["origin", "reg", "ipw", "fast"]
QUIET = dict(progress=False, echo=lambda s: None)
BASE = dict(dataset="synthetic", epochs=1, seeds=1, lr=1e-3, gamma=3.0, tau=0.01,
            reg_weight=1.0, attack=False)


def _method(data, method, **kw):
  return Runner(resolve(Config(**{**BASE, "method": method, **kw})), data).method


def _epoch_program(data, method, **kw) -> str:
  m = _method(data, method, **kw)
  key = jax.random.key(0)
  return m.epoch.lower(m.init(key), m.splits["fit"], key).as_text()


def test_the_rows_of_a_backbone_lower_to_one_program(prepared, monkeypatch):
  data = prepared("synthetic")
  programs = {m: _epoch_program(data, m) for m in ROW_METHODS}
  assert len(set(programs.values())) == 1
  for i, m in enumerate(ROW_METHODS):
    assert int(_method(data, m).init(jax.random.key(0)).hyper["row"]) == i
  # Reg's weight is a value of the state, not of the program; the rows that draw their
  # batches from p and another setting of the objective are other programs.
  assert _epoch_program(data, "reg", reg_weight=2.0) == programs["reg"]
  assert float(_method(data, "reg", reg_weight=2.0).init(jax.random.key(0)).hyper[
      "reg_weight"]) == 2.0
  assert _epoch_program(data, "fast", p_update="epoch") != programs["fast"]
  assert "row" not in _method(data, "fast", p_update="epoch").init(jax.random.key(0)).hyper
  assert _epoch_program(data, "origin", reg_kind="value") != programs["origin"]
  monkeypatch.setattr(rows, "SHARED_PROGRAM", False)  # each method's own program
  own = {m: _epoch_program(data, m) for m in ROW_METHODS}
  assert len(set(own.values())) == len(ROW_METHODS)


@pytest.mark.parametrize("method", ROW_METHODS)
def test_a_row_on_the_shared_program_gives_its_own_programs_results(prepared, tmp_path,
                                                                    monkeypatch, method):
  data = prepared("synthetic", min_ratings=15, max_ratings=80, num_minority=40,
                  num_majority=160)  # lengths that 2 parts cut
  cfg = Config(**BASE, method=method, length_parts=2)
  shared = train_and_evaluate(cfg, tmp_path / "shared", data=data, **QUIET)
  monkeypatch.setattr(rows, "SHARED_PROGRAM", False)
  own = train_and_evaluate(cfg, tmp_path / "own", data=data, **QUIET)
  for k in ("mae", "mse", "gf_mae", "ndcg3"):
    np.testing.assert_allclose(shared["per_seed"][0][k], own["per_seed"][0][k], rtol=1e-5,
                               atol=1e-7, err_msg=k)
  lines = [(tmp_path / d / "metrics.jsonl").read_text() for d in ("shared", "own")]
  p = [[json.loads(line)["p"] for line in text.splitlines()] for text in lines]
  np.testing.assert_allclose(p[0], p[1], atol=1e-6)
  assert (p[0][-1] == [0.5, 0.5]) == (method != "fast")  # only FAST's p moves


def test_a_checkpoint_from_before_the_rows_shared_a_program_resumes(prepared, tmp_path,
                                                                    monkeypatch):
  # ... and from before Reg's weight was in the state: the run's config supplies it.
  data = prepared("synthetic")
  monkeypatch.setattr(rows, "SHARED_PROGRAM", False)
  old = _method(data, "reg").init(jax.random.key(3))
  assert "row" not in old.hyper
  old = old.replace(hyper={k: v for k, v in old.hyper.items() if k != "reg_weight"})
  ckpt = SeedCheckpoint(tmp_path, 1024)
  ckpt.save(state=old, best_state=old, best_score=1.0, epoch=2, records=[])
  monkeypatch.setattr(rows, "SHARED_PROGRAM", True)
  template = _method(data, "reg").init(jax.random.key(0))
  restored = ckpt.restore(template)
  for state in (restored["state"], restored["best_state"]):
    assert int(state.hyper["row"]) == ROW_METHODS.index("reg")  # the run's own row
    assert float(state.hyper["gamma"]) == float(old.hyper["gamma"])
    assert float(state.hyper["reg_weight"]) == BASE["reg_weight"]
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(old.params)):
      np.testing.assert_array_equal(a, b)
  assert restored["epoch"] == 2
