"""Every method trains through the one runner (fast_jax.runner), on tiny data."""

import jax
import numpy as np
import pytest

from fast_jax import methods
from fast_jax.checkpoint import SeedCheckpoint
from fast_jax.config import BASELINES, REFERENCE, Config, UsageError, resolve
from fast_jax.experiment import train_and_evaluate
from fast_jax.runner import Runner
from conftest import TINY

META = ("origin", "static", "fast", "reg", "ipw", "clover")
BACKBONES = ("melu", "metacs")
# Synthetic ratings are not integers: CLOVER with the rating MSE (its A1 with the ratings).
SETTINGS = {"clover": {"clover_preset": "a1-ext", "loss": "mse"}}
# (method, backbone, settings): every meta-learner on both backbones (FAST in both modes);
# the baselines use the dataset's MeLU network whatever the backbone.
CASES = ([(m, b, SETTINGS.get(m, {})) for m in META for b in BACKBONES]
         + [("fast", b, {"p_update": "epoch"}) for b in BACKBONES]
         + [(m, "melu", {}) for m in BASELINES])


def test_every_method_is_registered():
  assert set(methods.REGISTRY) == set(META) | set(BASELINES)


@pytest.mark.parametrize("method, backbone, settings", CASES,
                         ids=[f"{b}-{m}" + "".join(f"-{v}" for v in s.values() if m != "clover")
                              for m, b, s in CASES])
def test_method_trains_two_epochs_through_the_runner(prepared, method, backbone, settings):
  data = prepared("synthetic", **TINY)
  cfg = resolve(Config(dataset="synthetic", method=method, backbone=backbone, epochs=2,
                       batch_size=8, lr=1e-3, inner_lr=1e-2, attack=False, mf_steps=3,
                       interaction_batch=64, **settings), data.name)
  records = []
  state, report = Runner(cfg, data).run_seed(1024, log=records.append, progress=False)
  epochs = [0] if method in REFERENCE else [1, 2]
  assert [r["epoch"] for r in records] == epochs
  assert all(np.isfinite(r["train_loss"]) for r in records)
  assert np.isfinite(report["mae"]) and report["group"]["1"]["n"] == data.test.num_users - \
      report["group"]["0"]["n"]
  if method in META:
    assert report["auc_attack"] is None  # --no-attack
    moved = not np.allclose(records[-1]["p"], 0.5)
    assert moved == (method == "fast")


def test_a_baseline_nan_is_recorded_as_divergence_not_raised(prepared, tmp_path, monkeypatch):
  data = prepared("synthetic", **TINY)
  real_make = methods.REGISTRY["nlba"]

  def with_a_nan_in_seed_1024(ctx, **kw):
    """NLBA whose second step of seed 1024's first epoch has a NaN loss."""
    m = real_make(ctx, **kw)
    first_key = jax.random.fold_in(jax.random.split(jax.random.key(1024))[1], 1)

    def epoch(state, data_, key):
      state, steps = m.epoch(state, data_, key)
      if np.array_equal(jax.random.key_data(key), jax.random.key_data(first_key)):
        steps = {**steps, "loss": steps["loss"].at[1].set(np.nan)}
      return state, steps
    return m._replace(epoch=epoch)
  monkeypatch.setitem(methods.REGISTRY, "nlba", with_a_nan_in_seed_1024)
  cfg = Config(dataset="synthetic", method="nlba", epochs=2, seeds=2, batch_size=8)
  results = train_and_evaluate(cfg, tmp_path, data=data, progress=False, echo=lambda s: None)
  assert [d["seed"] for d in results["diverged"]] == [1024]
  assert "epoch 1, step 2" in results["diverged"][0]["message"]
  assert "--baseline-lr" in results["diverged"][0]["message"]
  assert [r["seed"] for r in results["per_seed"]] == [3145]


def test_a_resumed_baseline_seed_ends_where_an_uninterrupted_one_does(prepared, tmp_path):
  """Baselines checkpoint like the meta-learners: two epochs, then a third from the
  checkpoint, equals three epochs in one go (state, records and the selected epoch)."""
  data = prepared("synthetic", **TINY)
  cfg = resolve(Config(dataset="synthetic", method="nlba", epochs=3, batch_size=8,
                       baseline_select="best-valid"), data.name)
  full_records, cut_records = [], []
  _, full = Runner(cfg, data).run_seed(1024, log=full_records.append, progress=False)
  ckpt = SeedCheckpoint(tmp_path, 1024)
  Runner(cfg.replace(epochs=2), data).run_seed(1024, progress=False, checkpoint=ckpt,
                                               checkpoint_every=1)
  _, resumed = Runner(cfg, data).run_seed(1024, log=cut_records.append, progress=False,
                                          checkpoint=ckpt, checkpoint_every=1)
  assert resumed == full
  strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]
  assert strip(cut_records) == strip(full_records)


@pytest.mark.parametrize("setting", [{"p_update": "batch"}, {"resample": "mean"},
                                     {"train_query": "first"}, {"select": "best"}])
def test_a_meta_learning_setting_outside_its_choices_is_a_usage_error(prepared, setting):
  data = prepared("synthetic", **TINY)
  cfg = resolve(Config(dataset="synthetic", method="fast", **setting), data.name)
  flag = "--" + next(iter(setting)).replace("_", "-")
  with pytest.raises(UsageError, match=flag):
    Runner(cfg, data)
