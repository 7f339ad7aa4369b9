"""The inner loop: masks, one SGD step by hand, first vs second order, jit agreement."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fast_jax import meta
from fast_jax.models import GLOBAL, LOCAL


def tiny_net():
  """y = tanh(x @ W1 + b1) @ w2 + c, with W1, b1 local and w2, c global."""
  rng = np.random.default_rng(0)
  params = {"lin": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
            "out": {"kernel": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
                    "bias": jnp.asarray(0.5, jnp.float32)}}
  labels = {"lin": {"kernel": LOCAL, "bias": LOCAL}, "out": {"kernel": GLOBAL, "bias": GLOBAL}}

  def apply(p, x):
    h = jnp.tanh(x @ p["lin"]["kernel"] + p["lin"]["bias"])
    return h @ p["out"]["kernel"] + p["out"]["bias"]
  return params, labels, apply


def _user(seed=1, rows=6):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(rows, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(rows,)), jnp.float32)
  support = jnp.array([True, True, True, True, False, False])
  return x, y, support


class InnerAdaptTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_one_inner_step_equals_a_hand_computed_sgd_step(self):
    params, labels, apply = tiny_net()
    x, y, support = _user()
    alpha = 0.1
    adapted = self.variant(lambda p: meta.inner_adapt(apply, p, labels, alpha, x, y, support))(
        params)
    # By hand: L = mean_s (y_hat - y)^2 over the 4 support rows.
    W, b = np.asarray(params["lin"]["kernel"]), np.asarray(params["lin"]["bias"])
    w2, c = np.asarray(params["out"]["kernel"]), float(params["out"]["bias"])
    xs, ys = np.asarray(x)[:4], np.asarray(y)[:4]
    pre = xs @ W + b
    h = np.tanh(pre)
    r = h @ w2 + c - ys
    dpre = (2 / 4) * r[:, None] * w2[None, :] * (1 - h ** 2)
    np.testing.assert_allclose(adapted["lin"]["kernel"], W - alpha * xs.T @ dpre, rtol=1e-5)
    np.testing.assert_allclose(adapted["lin"]["bias"], b - alpha * dpre.sum(0), rtol=1e-5)
    # Global parameters are untouched.
    chex.assert_trees_all_close(adapted["out"], params["out"])

  def test_per_parameter_rates_match_a_scalar_rate_when_equal(self):
    params, labels, apply = tiny_net()
    x, y, support = _user()
    scalar = meta.inner_adapt(apply, params, labels, 0.05, x, y, support, steps=2)
    rates = {("lin", "kernel"): jnp.full((3, 4), 0.05), ("lin", "bias"): jnp.full((4,), 0.05)}
    per_param = meta.inner_adapt(apply, params, labels, rates, x, y, support, steps=2)
    chex.assert_trees_all_close(scalar, per_param, rtol=1e-6)

  def test_query_rows_do_not_influence_the_adaptation(self):
    params, labels, apply = tiny_net()
    x, y, support = _user()
    a = meta.inner_adapt(apply, params, labels, 0.1, x, y, support)
    b = meta.inner_adapt(apply, params, labels, 0.1, x, y.at[4:].set(100.0), support)
    chex.assert_trees_all_close(a, b)

  def test_second_order_meta_gradient_differs_from_first_order(self):
    params, labels, apply = tiny_net()
    x, y, support = _user()

    def outer(p, first_order):
      theta = meta.inner_adapt(apply, p, labels, 0.5, x, y, support, first_order=first_order)
      return jnp.mean((apply(theta, x[4:]) - y[4:]) ** 2)
    g2 = jax.grad(outer)(params, False)
    g1 = jax.grad(outer)(params, True)
    assert not np.allclose(g2["lin"]["kernel"], g1["lin"]["kernel"])
    # FOMAML: the meta-gradient is the query gradient at the adapted parameters.
    theta = meta.inner_adapt(apply, params, labels, 0.5, x, y, support)
    gq = jax.grad(lambda p: jnp.mean((apply(p, x[4:]) - y[4:]) ** 2))(theta)
    chex.assert_trees_all_close(g1["lin"], gq["lin"], rtol=1e-5)

  def test_inner_loop_compiles_once_across_calls(self):
    params, labels, apply = tiny_net()
    x, y, support = _user()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def adapt(p, x, y, s):
      return meta.inner_adapt(apply, p, labels, 0.1, x, y, s, steps=3)
    for i in range(4):
      adapt(params, x + i, y, support)


def test_last_query_split_takes_the_last_ten_valid_rows():
  length = jnp.array([13, 20, 100])
  support, q = meta.last_query_split(length, 100)
  chex.assert_shape(support, (3, 100))
  chex.assert_shape(q, (3, 10))
  np.testing.assert_array_equal(q[0], np.arange(3, 13))
  np.testing.assert_array_equal(support.sum(1), [3, 10, 90])
  assert not bool(support[1, 10])


def test_random_query_split_draws_ten_valid_rows_disjoint_from_the_support():
  length = jnp.array([13, 50, 100, 11])
  for s in range(20):
    support, q = meta.random_query_split(jax.random.key(s), length, 100)
    q = np.asarray(q)
    for u, n in enumerate(np.asarray(length)):
      assert len(set(q[u])) == 10 and q[u].max() < n
      assert np.asarray(support[u]).sum() == n - 10
      assert not np.asarray(support[u])[q[u]].any()


def test_random_query_split_is_uniform_over_rows():
  length = jnp.array([20])
  hits = np.zeros(20)
  for s in range(400):
    _, q = meta.random_query_split(jax.random.key(s), length, 20)
    hits[np.asarray(q[0])] += 1
  # Each row is in the query with probability 1/2: 200 +- ~10.
  assert np.all(np.abs(hits - 200) < 50)
