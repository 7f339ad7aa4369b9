"""What a run reports beside its metrics: the adaptation diagnostics of a meta-learner
(fast_jax.diagnostics, wired through the runner) and the per-user predictions file of
each seed, from which results.json's metrics can be recomputed."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from fast_jax import meta, metrics
from fast_jax.config import Config, resolve
from fast_jax.experiment import format_table, train_and_evaluate
from fast_jax.runner import Runner
from conftest import TINY

COLUMNS = ["user_id", "group", "item_row", "y", "y_hat", "y_hat_unadapted"]


def _cfg(method="origin", **kw):
  return Config(**{**dict(dataset="synthetic", method=method, epochs=1, seeds=1, batch_size=8,
                          lr=1e-3, inner_lr=1e-2, attack=False), **kw})


def _user_mae(pred: pd.DataFrame, column: str) -> float:
  """Per-user MAE (mean over a user's rows), then the mean over users."""
  return float((pred["y"] - pred[column]).abs().groupby(pred["user_id"]).mean().mean())


@pytest.fixture(scope="module")
def origin_run(prepared, tmp_path_factory):
  data = prepared("synthetic", **TINY)
  out = tmp_path_factory.mktemp("origin")
  results = train_and_evaluate(_cfg(), out, data=data, progress=False, echo=lambda t: None)
  return data, out, results


def test_results_and_metrics_jsonl_report_the_adaptation(origin_run):
  data, out, results = origin_run
  for a in (results["per_seed"][0]["adaptation"], results["mean"]["adaptation"]):
    assert set(a) == {"shift", "closed", "mae_unadapted"}
    assert a["shift"] > 0 and 0 <= a["closed"] <= 1 and a["mae_unadapted"] > 0
  assert results["std"]["adaptation"]["shift"] == 0.0  # one seed
  records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert 0 <= records[-1]["valid"]["adaptation"]["closed"] <= 1
  line = [l for l in format_table(results, data.meta).splitlines() if "adaptation" in l]
  assert line and f"MAE unadapted {results['mean']['adaptation']['mae_unadapted']:.4f}" in line[0]


def test_predictions_file_recomputes_results_mae_and_the_unadapted_mae(origin_run):
  data, out, results = origin_run
  seed = results["per_seed"][0]
  pred = pd.read_csv(out / "predictions" / f"seed-{seed['seed']}.csv")
  assert list(pred.columns) == COLUMNS
  assert len(pred) == 10 * data.test.num_users
  assert _user_mae(pred, "y_hat") == pytest.approx(seed["mae"], abs=1e-4)
  assert _user_mae(pred, "y_hat_unadapted") == pytest.approx(
      seed["adaptation"]["mae_unadapted"], abs=1e-4)
  # group names beside the keys, and the file's groups per user are the data's
  names = data.meta["sensitive"]["groups"]
  assert results["group_names"] == names
  assert [seed["group"][str(g)]["name"] for g in range(2)] == names
  assert results["mean"]["group"]["1"]["name"] == names[1]
  by_user = pred.groupby("user_id")["group"].first()
  expected = dict(zip(data.test.user_id.tolist(), [names[g] for g in data.test.group]))
  assert by_user.to_dict() == expected
  # the query rows are each user's last 10 rows, with their ratings
  first = data.test.user_id.tolist().index(pred["user_id"][0])
  rows = pred[pred["user_id"] == pred["user_id"][0]]
  n = int(data.test.length[first])
  assert rows["item_row"].tolist() == list(range(n - 10, n))
  np.testing.assert_allclose(rows["y"], data.test.y[first, n - 10:n], atol=1e-6)


def test_unadapted_mae_is_that_of_the_meta_parameters_without_an_inner_step(prepared):
  """mae_unadapted equals the MAE of the selected state with its inner rate set to 0
  (the inner loop run, but moving nothing); the adapted MAE is the runner's, bit for bit
  the MAE of a pass that computes only the adapted predictions."""
  data = prepared("synthetic", **TINY)
  cfg = resolve(_cfg(), data.name)
  runner = Runner(cfg, data)
  state, report = runner.run_seed(1024, progress=False)
  d = runner.method.splits["test"]
  support, query_idx = meta.last_query_split(d["length"], runner.ctx.max_len)
  y_q = meta.take_rows(d["y"], query_idx)

  @jax.jit
  def mae(state):
    pred = runner.method.predict(state, d["x"], d["y"], support, query_idx, d["group"])
    return metrics.user_metrics(pred, y_q)["mae"]
  frozen = state.replace(alpha=jnp.zeros_like(state.alpha))
  assert report["adaptation"]["mae_unadapted"] == pytest.approx(
      float(np.mean(mae(frozen))), abs=1e-5)
  np.testing.assert_array_equal(runner.per_user(state, "test")["mae"], np.asarray(mae(state)))


def test_no_inner_step_means_no_shift_and_nothing_closed(prepared, tmp_path):
  data = prepared("synthetic", **TINY)
  results = train_and_evaluate(_cfg(inner_lr=0.0), tmp_path, data=data, progress=False,
                               echo=lambda t: None)
  a = results["mean"]["adaptation"]
  assert a["shift"] == pytest.approx(0.0, abs=1e-6)
  assert a["closed"] == pytest.approx(0.0, abs=1e-6)
  assert a["mae_unadapted"] == pytest.approx(results["mean"]["mae"], abs=1e-6)


def test_a_reference_predictor_has_no_adaptation_and_keeps_its_predictions_on_resume(
    prepared, tmp_path):
  data = prepared("synthetic", **TINY)
  results = train_and_evaluate(_cfg("global-mean"), tmp_path, data=data, progress=False,
                               echo=lambda t: None)
  assert "adaptation" not in results["per_seed"][0] and "adaptation" not in results["mean"]
  assert "adaptation" not in format_table(results, data.meta)
  path = tmp_path / "predictions" / "seed-1024.csv"
  pred = pd.read_csv(path)
  assert pred["y_hat_unadapted"].isna().all()
  assert _user_mae(pred, "y_hat") == pytest.approx(results["mean"]["mae"], abs=1e-4)
  before = path.read_bytes()
  train_and_evaluate(_cfg("global-mean", seeds=2), tmp_path, data=data, progress=False,
                     resume=True, echo=lambda t: None)
  assert path.read_bytes() == before
  assert (tmp_path / "predictions" / "seed-3145.csv").is_file()


def test_constant_mode_predicts_the_most_frequent_training_rating(prepared):
  data = prepared("synthetic", **TINY)
  mask = data.train.mask
  pattern = np.resize(np.float32([4, 4, 3, 2, 1, 6, 7, 8]), mask.shape[1])  # 4 most often
  y = np.where(mask, pattern[None, :], np.float32(5)).astype(np.float32)
  assert (~mask).sum() > (y == 4).sum()  # padding rows, more numerous, do not count
  data = dataclasses.replace(data, train=dataclasses.replace(data.train, y=y))
  runner = Runner(resolve(_cfg("constant-mode"), data.name), data)
  state, report = runner.run_seed(1024, progress=False)
  assert report["choices"]["train_mode"] == 4.0
  rows = runner.predictions(runner.scores(state, "test"), "test")
  assert np.all(rows["y_hat"] == 4.0) and rows["y_hat_unadapted"] is None


def test_vmapped_seeds_write_each_seeds_predictions(prepared, tmp_path):
  data = prepared("synthetic", **TINY)
  results = train_and_evaluate(_cfg(seeds=2, vmap_seeds=True), tmp_path, data=data,
                               progress=False, echo=lambda t: None)
  for seed in results["per_seed"]:
    pred = pd.read_csv(tmp_path / "predictions" / f"seed-{seed['seed']}.csv")
    assert _user_mae(pred, "y_hat") == pytest.approx(seed["mae"], abs=1e-4)
    assert _user_mae(pred, "y_hat_unadapted") == pytest.approx(
        seed["adaptation"]["mae_unadapted"], abs=1e-4)
