"""FAST's p update, the resampled batch, IPW / Reg pieces and the epoch samplers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fast_jax import fairness


def eq9_reference(p0, l0, l1, gamma, tau):
  """Paper Eq. 9 for two groups, with clipping to [0, 1] (the FAST code)."""
  delta = l1 - l0
  return float(np.clip(p0 - np.sign(delta) * min(gamma * abs(delta), tau), 0.0, 1.0))


class UpdatePTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_update_p_matches_eq9_for_two_groups(self):
    rng = np.random.default_rng(0)
    update = self.variant(fairness.update_p)
    for _ in range(30):
      p0 = rng.uniform()
      l0, l1 = rng.uniform(0, 3, size=2)
      gamma, tau = rng.uniform(0, 3), rng.uniform(0, 1)
      got = update(jnp.array([p0, 1 - p0]), jnp.array([l0, l1]), jnp.array([True, True]),
                   gamma, tau)
      want = eq9_reference(p0, l0, l1, gamma, tau)
      np.testing.assert_allclose(got, [want, 1 - want], atol=1e-6)

  def test_fast_moves_p_toward_the_worse_served_group(self):
    p = fairness.update_p(jnp.array([0.5, 0.5]), jnp.array([1.0, 1.2]), jnp.array([True, True]),
                          gamma=1.0, tau=1.0)
    assert p[1] > 0.5 and p[0] < 0.5  # group 1 has the larger loss: sample it more
    np.testing.assert_allclose(p, [0.3, 0.7], atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_p_average_caps_step_t_at_tau_over_one_plus_t_over_T(self):
    update = self.variant(fairness.update_p_decaying, static_argnums=6)
    p, big_gap, both = jnp.array([0.5, 0.5]), jnp.array([0.0, 3.0]), jnp.array([True, True])
    for t, cap in [(0, 0.1), (8, 0.05), (24, 0.025)]:  # T = 8 steps per epoch
      np.testing.assert_allclose(update(p, big_gap, both, 2.0, 0.1, jnp.int32(t), 8),
                                 [0.5 - cap, 0.5 + cap], atol=1e-6)
    small_gap = jnp.array([1.0, 1.01])  # gamma |gap| below the cap: Eq. 9's rate
    np.testing.assert_allclose(update(p, small_gap, both, 1.0, 0.1, jnp.int32(24), 8),
                               [0.49, 0.51], atol=1e-6)

  def test_tau_caps_the_change(self):
    p = fairness.update_p(jnp.array([0.5, 0.5]), jnp.array([0.0, 3.0]), jnp.array([True, True]),
                          gamma=2.0, tau=0.1)
    np.testing.assert_allclose(p, [0.4, 0.6], atol=1e-6)

  def test_p_is_clipped_to_the_unit_interval(self):
    p = fairness.update_p(jnp.array([0.05, 0.95]), jnp.array([0.0, 1.0]),
                          jnp.array([True, True]), gamma=1.0, tau=1.0)
    np.testing.assert_allclose(p, [0.0, 1.0], atol=1e-6)

  def test_a_group_absent_from_the_batch_leaves_p_unchanged(self):
    p0 = jnp.array([0.3, 0.7])
    p = fairness.update_p(p0, jnp.array([2.0, 0.0]), jnp.array([True, False]), 1.0, 1.0)
    np.testing.assert_allclose(p, p0)

  def test_three_groups_move_toward_the_worst_and_stay_a_distribution(self):
    p0 = jnp.full(3, 1 / 3)
    losses = jnp.array([1.0, 1.0, 1.6])
    p = fairness.update_p(p0, losses, jnp.ones(3, bool), gamma=0.5, tau=1.0)
    np.testing.assert_allclose(p.sum(), 1.0, atol=1e-6)
    assert p[2] > p0[2] and p[0] < p0[0]
    np.testing.assert_allclose(p[0], p[1], atol=1e-7)
    # d_2 = 1.6 - 1.0 = 0.6 -> +0.3; d_0 = d_1 = 1.0 - 1.3 = -0.3 -> -0.15; mass conserved.
    np.testing.assert_allclose(p, [1 / 3 - 0.15, 1 / 3 - 0.15, 1 / 3 + 0.3], atol=1e-6)

  def test_three_groups_with_one_absent_keep_its_probability(self):
    p0 = jnp.array([0.2, 0.3, 0.5])
    p = fairness.update_p(p0, jnp.array([1.0, 2.0, 0.0]), jnp.array([True, True, False]),
                          gamma=0.1, tau=1.0)
    assert p[2] == pytest.approx(0.5)
    np.testing.assert_allclose(p[:2].sum(), 0.5, atol=1e-6)
    assert p[1] > 0.3


def test_group_means_skip_absent_groups():
  means, present = fairness.group_means(jnp.array([1.0, 3.0, 5.0]), jnp.array([0, 0, 2]), 3)
  np.testing.assert_allclose(means, [2.0, 0.0, 5.0])
  np.testing.assert_array_equal(present, [True, False, True])


def test_resample_weights_reproduce_p_group_ratio_in_expectation():
  group = jnp.array([0] * 24 + [1] * 8)  # a majority-heavy batch
  p = jnp.array([0.3, 0.7])
  keys = jax.random.split(jax.random.key(0), 2000)
  counts = jax.vmap(lambda k: fairness.resample_weights(k, group, p, 2))(keys)
  chex.assert_shape(counts, (2000, 32))
  np.testing.assert_allclose(counts.sum(1), 32.0)
  share1 = float(counts[:, 24:].sum() / counts.sum())
  # 64,000 slots: the standard error of the share is ~0.002.
  assert abs(share1 - 0.7) < 0.01
  # Within a group every user is equally likely (bounds: ~4.5 standard errors of the
  # per-user mean count over 2000 draws).
  per_user = counts.mean(0)
  expected = fairness.expected_weights(group, p, 2)
  np.testing.assert_allclose(expected[24:], 32 * 0.7 / 8, rtol=1e-6)
  np.testing.assert_allclose(expected[:24], 32 * 0.3 / 24, rtol=1e-6)
  np.testing.assert_allclose(per_user[24:], expected[24:], atol=0.17)
  np.testing.assert_allclose(per_user[:24], expected[:24], atol=0.065)


def test_resample_weights_with_a_missing_group_use_the_present_one():
  counts = fairness.resample_weights(jax.random.key(1), jnp.zeros(8, jnp.int32),
                                     jnp.array([0.1, 0.9]), 2)
  assert float(counts.sum()) == 8.0


def test_ipw_weights_are_normalised_inverse_shares():
  group = jnp.array([0, 0, 0, 1])
  shares = jnp.array([0.75, 0.25])
  w = fairness.ipw_weights(group, shares)
  raw = np.array([1 / 0.75] * 3 + [4.0])
  np.testing.assert_allclose(w, raw * 4 / raw.sum(), rtol=1e-6)


def test_gap_penalty_is_zero_with_one_group():
  assert float(fairness.gap_penalty(jnp.array([1.0, 5.0]), jnp.array([1, 1]), 2)) == 0.0
  assert float(fairness.gap_penalty(jnp.array([1.0, 5.0]), jnp.array([0, 1]), 2)) == 4.0


def test_uniform_batches_visit_each_user_at_most_once():
  b = fairness.uniform_batches(jax.random.key(0), 100, 32)
  chex.assert_shape(b, (3, 32))
  assert len(np.unique(np.asarray(b))) == 96


def test_group_pool_batches_draw_binomial_counts_and_wrap_cyclically():
  group = jnp.array([0] * 90 + [1] * 10)
  p = jnp.array([0.5, 0.5])
  b = np.asarray(fairness.group_pool_batches(jax.random.key(0), group, p, 2, 20))
  chex.assert_shape(b, (5, 20))
  g = np.asarray(group)[b]
  assert abs(g.mean() - 0.5) < 0.15  # ~50 of 100 slots from the 10-user minority
  # Minority pool is read cyclically: consecutive reads go round the whole pool.
  minority = [u for row in b for u in row if u >= 90]
  first = minority[:10]
  assert sorted(first) == list(range(90, 100))
  assert minority[10:20] == first[: len(minority[10:20])]
  # The majority is read without repeats until its pool is exhausted.
  majority = [u for row in b for u in row if u < 90]
  assert len(set(majority)) == len(majority)


def test_group_pool_batches_with_p_zero_never_sample_that_group():
  group = jnp.array([0] * 50 + [1] * 50)
  b = fairness.group_pool_batches(jax.random.key(2), group, jnp.array([1.0, 0.0]), 2, 10)
  assert int((np.asarray(group)[np.asarray(b)] == 1).sum()) == 0
