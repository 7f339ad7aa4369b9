"""Evaluation in length-sorted chunks, each on the rows its longest user needs
(fast_jax.runner.chunk_plan, eval_budgets): the plan against a NumPy reference, and every
kind of method's per-user scores and representations against the whole padded rows."""

import jax
import numpy as np
import pytest

from fast_jax import runner as runner_lib
from fast_jax.config import BASELINES, Config, resolve
from fast_jax.runner import Runner, chunk_plan, eval_budgets, map_chunks
from conftest import TINY

# (lengths, users per chunk, row budgets): sorted and unsorted, a short last chunk, a
# chunk that needs the full length, no budgets.
PLANS = [
    (np.array([11, 40, 12, 100, 33, 64, 65, 20, 31]), 4, (32, 64, 100)),
    (np.array([11, 40, 12, 100, 33, 64, 65, 20, 31]), 3, (32, 64, 100)),
    (np.array([15, 15, 15, 15, 16]), 2, (16,)),
    (np.array([50, 11, 12]), 8, (32, 64, 100)),
    (np.array([50, 11, 12, 30, 70]), 2, ()),
]

# (backend, max_len, budgets)
BUDGETS = [("cpu", 100, (32, 64, 100)), ("cpu", 64, (32, 64)), ("cpu", 20, (20,)),
           ("cpu", 300, (32, 64, 128, 256, 300)), ("gpu", 100, ()), ("tpu", 100, ())]

# Every kind of evaluation pass: a meta-learner's adapted and unadapted predictions and
# its representations, CLOVER's own adaptation, and each baseline family (fitted).
METHODS = [("fast", "melu"), ("clover", "melu"), ("widedeep", "melu"),
           ("dropoutnet", "melu"), ("nlba", "melu"), ("support-mean", "melu")]
SETTINGS = {"clover": {"clover_preset": "a1-ext", "loss": "mse"}}
# Users of 11 to 80 ratings: the row budgets 32, 64 and the longest user's all occur.
SPREAD = dict(TINY, min_ratings=11, max_ratings=80, num_items=120)


@pytest.mark.parametrize("lengths, chunk, budgets", PLANS)
def test_chunk_plan_covers_every_user_once_on_the_smallest_budget_that_fits(lengths, chunk,
                                                                            budgets):
  plan = chunk_plan(lengths, chunk, budgets)
  size = min(chunk, len(lengths))
  real = np.concatenate([users[:count] for users, _, count in plan])
  np.testing.assert_array_equal(np.sort(real), np.arange(len(lengths)))
  for users, rows, count in plan:
    assert len(users) == size and 1 <= count <= size
    assert np.all(users[count:] == users[count - 1])  # padded with the last real user
    need = lengths[users].max()
    if not budgets:
      assert rows is None
    else:
      assert rows == min(b for b in budgets if b >= need)
  if budgets:  # length order: no chunk's users are shorter than the previous chunk's
    np.testing.assert_array_equal(lengths[real], np.sort(lengths))
  else:
    np.testing.assert_array_equal(real, np.arange(len(lengths)))


@pytest.mark.parametrize("backend, max_len, budgets", BUDGETS)
def test_eval_budgets_by_backend(backend, max_len, budgets):
  assert eval_budgets(max_len, backend=backend) == budgets


def test_map_chunks_cuts_rows_and_restores_the_order():
  lengths = np.array([5, 30, 12, 64, 7])
  y = np.where(np.arange(64) < lengths[:, None], 1.0, 0.0) * np.arange(1, 6)[:, None]
  seen = []

  def fn(y, length):
    seen.append(y.shape)
    return {"total": y.sum(1), "length": length}
  out = map_chunks(fn, (y, lengths), 2, lengths=lengths, budgets=(8, 32, 64))
  np.testing.assert_array_equal(out["length"], lengths)
  np.testing.assert_array_equal(out["total"], lengths * np.arange(1, 6))
  assert seen == [(2, 8), (2, 32), (2, 64)]


@pytest.mark.parametrize("method, backbone", METHODS, ids=[f"{b}-{m}" for m, b in METHODS])
def test_scores_in_length_chunks_equal_the_whole_padded_rows(prepared, monkeypatch, method,
                                                             backbone):
  data = prepared("synthetic", **SPREAD)
  assert data.train.max_len > 64 and data.train.length.min() < 32
  cfg = resolve(Config(dataset="synthetic", method=method, backbone=backbone, epochs=1,
                       batch_size=8, lr=1e-3, inner_lr=0.5, eval_chunk=4, mf_steps=3,
                       interaction_batch=64, **SETTINGS.get(method, {})), data.name)
  runner = Runner(cfg, data)
  state = runner.method.init(jax.random.key(0))
  if method in BASELINES and runner.method.epoch is not None:  # the fits they predict with
    state, _ = runner.method.epoch(state, runner.method.splits["fit"], jax.random.key(1))
  assert {x.shape[1] for split in ("train", "test")
          for _, (x, *_) in runner._chunks(split)} >= {32, 64}
  by_length = {s: runner.scores(state, s) for s in ("train", "test")}
  reps = runner.representations(state, "test")

  monkeypatch.setattr(runner_lib, "eval_budgets", lambda max_len, **kw: ())
  runner._chunk_cache.clear()
  assert {x.shape[1] for _, (x, *_) in runner._chunks("test")} == {data.train.max_len}
  for split, got in by_length.items():
    whole = runner.scores(state, split)
    for key in ("y", "query_idx"):
      np.testing.assert_array_equal(got[key], whole[key])
    for key in ("pred", "pred0"):
      if key in whole:
        np.testing.assert_allclose(got[key], whole[key], rtol=1e-5, atol=1e-5)
    for name, v in whole["metrics"].items():
      np.testing.assert_allclose(got["metrics"][name], v, rtol=1e-5, atol=1e-5)
  if reps is not None:
    np.testing.assert_allclose(reps, runner.representations(state, "test"), rtol=1e-5,
                               atol=1e-5)
