"""Cold-start baselines and reference predictors (fast_jax.methods, docs/methods.md §7)."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fast_jax import meta
from fast_jax.config import Config, resolve
from fast_jax.experiment import train_and_evaluate
from fast_jax.methods import dropoutnet, nlba as nlba_lib, widedeep
from fast_jax.methods.base import make_context
from fast_jax.models import Field, MeLU
from fast_jax.runner import Runner

# A tiny dataset layout: an item id, a multi-valued genre (3 slots, pad 4), two user fields.
FIELDS = (Field("item", "item", "categorical", 0, 1, 7),
          Field("genre", "item", "multi", 1, 4, 4, pad_index=4),
          Field("gender", "user", "categorical", 4, 5, 2),
          Field("age", "user", "categorical", 5, 6, 3))
B, L, Q, P = 3, 12, 4, 5


def _tiny_batch(seed=0):
  rng = np.random.default_rng(seed)
  x = np.stack([rng.integers(0, 7, (B, L)), rng.integers(0, 4, (B, L)),
                rng.integers(0, 5, (B, L)), rng.integers(0, 5, (B, L)),
                rng.integers(0, 2, (B, L)), rng.integers(0, 3, (B, L))], -1).astype(np.int32)
  y = rng.integers(1, 6, (B, L)).astype(np.float32)
  length = np.array([L, 11, 11], np.int32)
  return x, y, length


def _runner(data, method, **kw):
  return Runner(resolve(Config(method=method, **kw), data.meta["dataset"]), data)


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("method, expected", [
    ("global-mean", (1.484, 3.430, 0.014, 0.170)),
    ("support-mean", (1.288, 2.855, 0.061, 0.299)),
])
def test_reference_predictors_reproduce_the_bookcrossing_sanity_numbers(prepared, method,
                                                                       expected):
  data = prepared("bookcrossing")  # clover protocol: the FAST / CLOVER splits
  records = []
  _, report = _runner(data, method).run_seed(1024, log=records.append, progress=False)
  got = tuple(round(report[k], 3) for k in ("mae", "mse", "gf_mae", "gf_mse"))
  assert got == expected
  assert report["group"]["0"]["n"] == 463 and report["group"]["1"]["n"] == 235
  assert [r["epoch"] for r in records] == [0] and "mae" in records[0]["valid"]


def test_baseline_run_writes_the_result_files(prepared, tmp_path):
  data = prepared("synthetic")
  results = train_and_evaluate(Config(dataset="synthetic", method="support-mean", seeds=2),
                               tmp_path, data=data, progress=False, echo=lambda s: None)
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert [r["seed"] for r in on_disk["per_seed"]] == [1024, 3145]
  assert on_disk["std"]["mae"] == 0.0  # no randomness in a reference predictor
  assert set(on_disk["mean"]["group"]) == {"0", "1"}
  assert results["mean"]["gf_mse"] == pytest.approx(on_disk["mean"]["gf_mse"])
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def wide_deep():
  melu = MeLU(fields=FIELDS, embed_dim=8, proj_dim=8, hidden=16)
  model = widedeep.WideDeep(deep=melu, wide=widedeep.Wide(fields=FIELDS, cross_buckets=97,
                                                            offset=3.5))
  x, _, _ = _tiny_batch()
  return model, jax.jit(model.init)(jax.random.key(0), x)["params"]


def test_wide_deep_forward_shapes_and_wide_starts_at_the_offset(wide_deep):
  model, params = wide_deep
  x, _, _ = _tiny_batch()
  chex.assert_shape(jax.jit(model.apply)({"params": params}, x), (B, L))
  chex.assert_shape(params["wide"]["w_cross"], (97,))
  for cross in (0, 97):
    wide = widedeep.Wide(fields=FIELDS, cross_buckets=cross, offset=3.5)
    np.testing.assert_allclose(jax.jit(wide.apply)({"params": params["wide"]}, x), 3.5)


def test_wide_part_is_a_linear_model_over_one_hot_features():
  x, _, _ = _tiny_batch(1)
  wide = widedeep.Wide(fields=FIELDS)
  params = jax.tree.map(lambda w: np.random.default_rng(w.size).normal(size=w.shape),
                        jax.jit(wide.init)(jax.random.key(0), x)["params"])
  w = {k: np.asarray(v) for k, v in params.items()}
  genre = x[..., 1:4]
  genre_mean = np.where(genre != 4, w["w_genre"][genre], 0).sum(-1) / (genre != 4).sum(-1).clip(1)
  expected = (w["offset"] + w["w_item"][x[..., 0]] + genre_mean + w["w_gender"][x[..., 4]]
              + w["w_age"][x[..., 5]])
  np.testing.assert_allclose(jax.jit(wide.apply)({"params": params}, x), expected, rtol=1e-5)


def test_cross_feature_hash_stays_in_range_and_separates_pairs():
  a, b = jnp.arange(50)[:, None], jnp.arange(60)[None, :]
  ids = widedeep._hash(a, b, 3, 1000)
  assert int(ids.min()) >= 0 and int(ids.max()) < 1000
  assert np.unique(np.asarray(ids)).size > 900  # 3000 pairs spread over the buckets
  assert not np.array_equal(ids, widedeep._hash(a, b, 4, 1000))


def test_dropoutnet_forward_shapes():
  x, _, _ = _tiny_batch()
  model = dropoutnet.DropoutNet(melu=MeLU(fields=FIELDS, embed_dim=8, proj_dim=8), out_bias=3.0)
  u, v = jnp.ones((B, Q, P)), jnp.ones((B, Q, P))
  params = jax.jit(model.init)(jax.random.key(0), x[:, :Q], u, v)["params"]
  chex.assert_shape(jax.jit(model.apply)({"params": params}, x[:, :Q], u, v), (B, Q))
  chex.assert_shape(params["fc1"]["kernel"], (8 + 8 + 2 * P, 64))


def test_preference_dropout_zeroes_whole_rows_independently_at_the_rate():
  rng = np.random.default_rng(0)
  u, v = (rng.normal(size=(400, 10, P)).astype(np.float32) + 5.0 for _ in "uv")  # no zeros
  dropout = jax.jit(dropoutnet.preference_dropout)
  du, dv = dropout(jax.random.key(3), u, v, 0.5)
  chex.assert_shape([du, dv], (400, 10, P))
  zero_u, zero_v = np.all(du == 0, -1), np.all(dv == 0, -1)
  # A row is either zeroed entirely or kept unchanged (no rescaling).
  np.testing.assert_array_equal(np.any(du == 0, -1), zero_u)
  np.testing.assert_array_equal(np.where(zero_u[..., None], 0, u), du)
  np.testing.assert_array_equal(np.where(zero_v[..., None], 0, v), dv)
  assert abs(zero_u.mean() - 0.5) < 0.03 and abs(zero_v.mean() - 0.5) < 0.03
  assert abs((zero_u & zero_v).mean() - 0.25) < 0.03  # independent masks
  same_u, same_v = dropout(jax.random.key(3), u, v, 0.0)
  np.testing.assert_array_equal(same_u, u)
  np.testing.assert_array_equal(same_v, v)


@pytest.fixture(scope="module")
def nlba():
  melu = MeLU(fields=FIELDS, embed_dim=8, proj_dim=6, drop_fields=("gender", "age"))
  model = nlba_lib.NLBA(melu=melu, threshold=4.0, hidden=7, out_bias=3.0)
  x, y, length = _tiny_batch()
  support, query_idx = meta.last_query_split(jnp.asarray(length), L)
  params = jax.jit(model.init)(jax.random.key(0), x, y, support, query_idx)["params"]
  return model, params, jax.jit(model.apply, static_argnames="method")


def test_nlba_forward_shapes(nlba):
  model, params, apply = nlba
  x, y, length = _tiny_batch()
  support, query_idx = meta.last_query_split(jnp.asarray(length), L)
  chex.assert_shape(apply({"params": params}, x, y, support, query_idx), (B, 10))
  hidden, out = apply({"params": params}, x, y, support, method="biases")
  chex.assert_shape([hidden, out], [(B, 7), (B,)])
  assert "user_fc" not in params["melu"]  # the user enters only through R^0 and R^1


def test_nlba_biases_equal_numpy(nlba):
  model, params, apply = nlba
  x, y, length = _tiny_batch(2)
  y[1, :] = 2.0  # user 1 has no class-1 support item: R^1 = 0
  support, _ = meta.last_query_split(jnp.asarray(length), L)
  hidden, out = apply({"params": params}, x, y, support, method="biases")
  f = np.asarray(apply({"params": params}, x, method="item_repr"), np.float64)
  s = np.asarray(support)
  for u in range(B):
    r = []
    for c in (0, 1):
      rows = [j for j in range(L) if s[u, j] and (y[u, j] >= 4.0) == bool(c)]
      r.append(f[u, rows].mean(0) if rows else np.zeros(f.shape[-1]))
    r = np.concatenate(r)
    hb, ob = params["hidden_b"], params["out_b"]
    np.testing.assert_allclose(hidden[u], r @ hb["kernel"] + hb["bias"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[u], r @ ob["kernel"][:, 0] + ob["bias"][0], rtol=1e-5,
                               atol=1e-6)
  _, r1 = nlba_lib.class_means(jnp.asarray(f), jnp.asarray(y), support, 4.0)
  np.testing.assert_array_equal(r1[1], 0.0)


def test_nlba_threshold_is_three_quarters_up_the_rating_scale():
  assert nlba_lib.nlba_threshold(Config(), (1, 5)) == 4.0
  assert nlba_lib.nlba_threshold(Config(), (1, 10)) == 8.0
  assert nlba_lib.nlba_threshold(Config(nlba_threshold=3.5), (1, 5)) == 3.5


# ----------------------------------------------------------------------------- runners


def test_dropoutnet_training_users_get_item_vectors_fitted_without_their_ratings(prepared):
  data = prepared("synthetic")
  ctx = make_context(resolve(Config(method="dropoutnet", mf_steps=5), data.name), data)
  method = dropoutnet.make(ctx)
  fixed = method.init(jax.random.key(0)).extra
  index = dropoutnet.ItemIndex(data)
  user = np.repeat(np.arange(data.train.num_users), data.train.length)
  item = index.train_rows
  fold = np.asarray(fixed["user_fold"])
  for f in range(dropoutnet.MF_FOLDS):
    seen_outside = np.zeros(index.num_items + 1, bool)
    seen_outside[item[fold[user] != f]] = True
    np.testing.assert_array_equal(fixed["fold_known"][f], seen_outside)
    assert np.all(np.asarray(fixed["fold_items"][f])[~seen_outside] == 0)
  assert np.all(np.asarray(fixed["known"])[:-1]) and not fixed["known"][-1]
  assert np.all(index(data.test)[~data.test.mask] == index.num_items)


def test_short_ml100k_widedeep_run_loss_falls_and_support_finetuning_changes_predictions(
    prepared):
  data = prepared("ml100k")
  records = []
  runner = _runner(data, "widedeep", epochs=2, interaction_batch=256, eval_chunk=32,
                   finetune_steps=3, finetune_lr=0.1)
  state, report = runner.run_seed(1024, log=records.append, progress=False)
  assert [r["epoch"] for r in records] == [1, 2]
  assert records[1]["train_loss"] < records[0]["train_loss"]
  assert {"seed", "train_loss", "group_loss", "valid", "seconds"} <= set(records[0])
  assert {"mae", "mse", "ndcg3", "gf_mae", "gf_mse", "group"} <= set(report)
  assert report["choices"]["selected_epoch"] in (1, 2) and report["choices"]["epochs_run"] == 2
  assert "offset" in report["choices"]["finetuned_modules"]
  assert report["mae"] < 1.0  # far below the spread of the 1-5 scale
  # Without fine-tuning: the same network on the query rows' features alone.
  test = runner.method.splits["test"]
  _, query_idx = meta.last_query_split(test["length"], data.test.max_len)
  plain_runner = _runner(data, "widedeep", epochs=2, interaction_batch=256, eval_chunk=32)
  plain = jax.jit(plain_runner.method.predict)(state, test["x"], test["y"], None, query_idx,
                                               test["group"])
  plain_mae = float(jnp.mean(jnp.abs(plain - meta.take_rows(test["y"], query_idx))))
  assert abs(report["mae"] - plain_mae) > 1e-3
