"""Masked losses, NDCG@3 and group fairness against NumPy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fast_jax import metrics


def _ragged_batch(seed=0, users=5, max_len=12):
  rng = np.random.default_rng(seed)
  length = rng.integers(1, max_len + 1, size=users)
  pred = rng.normal(size=(users, max_len)).astype(np.float32)
  y = rng.integers(1, 6, size=(users, max_len)).astype(np.float32)
  mask = np.arange(max_len)[None] < length[:, None]
  return pred, y, mask, length


class MaskedLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_masked_losses_equal_numpy_on_ragged_users(self):
    pred, y, mask, length = _ragged_batch()
    mse = self.variant(metrics.masked_mse)(pred, y, mask)
    mae = self.variant(metrics.masked_mae)(pred, y, mask)
    chex.assert_shape(mse, (5,))
    ref_mse = [np.mean((pred[u, :n] - y[u, :n]) ** 2) for u, n in enumerate(length)]
    ref_mae = [np.mean(np.abs(pred[u, :n] - y[u, :n])) for u, n in enumerate(length)]
    np.testing.assert_allclose(mse, ref_mse, rtol=1e-5)
    np.testing.assert_allclose(mae, ref_mae, rtol=1e-5)

  def test_padding_values_do_not_leak_into_the_loss(self):
    pred, y, mask, _ = _ragged_batch(1)
    garbage = np.where(mask, pred, 1e6)
    np.testing.assert_allclose(metrics.masked_mse(garbage, y, mask),
                               metrics.masked_mse(pred, y, mask), rtol=1e-6)

  def test_empty_mask_gives_zero_not_nan(self):
    out = metrics.masked_mse(jnp.ones(4), jnp.zeros(4), jnp.zeros(4, bool))
    assert float(out) == 0.0


def ndcg3_reference(pred, y, k=3):
  """The FAST/CLOVER rule: top-k by (prediction, index) descending, gain r^2 - 1."""
  order = sorted(range(len(pred)), key=lambda j: (pred[j], j), reverse=True)[:k]
  disc = [1 / np.log2(i + 2) for i in range(k)]
  dcg = sum((y[j] ** 2 - 1) * d for j, d in zip(order, disc))
  idcg = sum((r ** 2 - 1) * d for r, d in zip(sorted(y, reverse=True)[:k], disc))
  return dcg / idcg if idcg > 0 else np.nan


class NdcgTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_ndcg3_equals_numpy_reference_with_ties(self):
    rng = np.random.default_rng(3)
    for _ in range(50):
      # Few distinct prediction values so that ties are common.
      pred = rng.integers(0, 3, size=10).astype(np.float32)
      y = rng.integers(1, 6, size=10).astype(np.float32)
      got = self.variant(metrics.ndcg_at_k)(pred, y)
      np.testing.assert_allclose(got, ndcg3_reference(pred, y), rtol=1e-5)

  def test_ties_go_to_the_later_row(self):
    pred = jnp.zeros(10)
    y = jnp.array([5, 5, 5, 1, 1, 1, 1, 2, 3, 4], jnp.float32)
    # All predictions tie, so the top 3 are rows 9, 8, 7 (ratings 4, 3, 2).
    expected = (15 + 8 / np.log2(3) + 3 / 2) / (24 + 24 / np.log2(3) + 24 / 2)
    np.testing.assert_allclose(metrics.ndcg_at_k(pred, y), expected, rtol=1e-6)

  def test_all_ones_query_gives_nan_that_the_report_skips(self):
    per_user = {"ndcg3": np.array([np.nan, 0.5, 0.7])}
    rep = metrics.group_report(per_user, np.array([0, 0, 1]), 2)
    assert rep["ndcg3"] == pytest.approx(0.6)
    assert rep["group"]["0"]["ndcg3"] == pytest.approx(0.5)


def test_user_metrics_shapes():
  pred, y = jnp.ones((7, 10)), jnp.full((7, 10), 3.0)
  out = metrics.user_metrics(pred, y)
  for v in out.values():
    chex.assert_shape(v, (7,))
  np.testing.assert_allclose(out["mae"], 2.0)
  np.testing.assert_allclose(out["mse"], 4.0)


def test_group_fairness_on_a_toy_case():
  per_user = {"mae": np.array([1.0, 2.0, 3.0, 0.5, 1.5]),
              "mse": np.array([1.0, 1.0, 1.0, 4.0, 4.0])}
  group = np.array([0, 0, 0, 1, 1])
  rep = metrics.group_report(per_user, group, 2)
  assert rep["mae"] == pytest.approx(1.6)
  assert rep["group"]["0"] == {"n": 3, "mae": 2.0, "mse": 1.0}
  assert rep["group"]["1"]["mae"] == pytest.approx(1.0)
  assert rep["gf_mae"] == pytest.approx(1.0)
  assert rep["gf_mse"] == pytest.approx(3.0)


def test_gf_with_three_groups_is_max_minus_min():
  rep = metrics.group_report({"mae": np.array([1.0, 2.0, 4.0])}, np.array([0, 1, 2]), 3)
  assert rep["gf_mae"] == pytest.approx(3.0)
