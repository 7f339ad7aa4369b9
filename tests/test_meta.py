"""The inner loop: masks, one SGD step by hand, first vs second order, jit agreement."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


# Inner-loop lengths: unrolled (up to meta.UNROLL_STEPS) and run as a loop (beyond it).
SGD_STEPS = [1, 3, meta.UNROLL_STEPS, meta.UNROLL_STEPS + 2]


@pytest.mark.parametrize("steps", SGD_STEPS)
def test_sgd_and_its_second_order_gradient_match_the_closed_form(steps):
  # On f(p) = a p^2 / 2 (gradient a p), k SGD steps at rate r give p_k = (1 - r a)^k p0, so
  # dp_k/dp0 = (1 - r a)^k and dp_k/da = -k r p0 (1 - r a)^(k-1): the second-order path.
  p0 = np.array([0.7, -1.3]); a, r = 1.5, 0.2

  def final(p, a):
    return meta.sgd(lambda q: {"w": a * q["w"]}, {"w": p}, {"w": r}, steps=steps)["w"]
  np.testing.assert_allclose(final(jnp.asarray(p0), a), (1 - r * a) ** steps * p0, rtol=1e-5)
  d_p0, d_a = jax.grad(lambda p, a: jnp.sum(final(p, a)), argnums=(0, 1))(jnp.asarray(p0), a)
  np.testing.assert_allclose(d_p0, np.full(2, (1 - r * a) ** steps), rtol=1e-5)
  np.testing.assert_allclose(d_a, -steps * r * p0.sum() * (1 - r * a) ** (steps - 1),
                             rtol=1e-5)
  # First order: no gradient through the inner gradients.
  fo = jax.grad(lambda a: jnp.sum(meta.sgd(lambda q: {"w": a * q["w"]}, {"w": jnp.asarray(p0)},
                                           {"w": r}, steps=steps, first_order=True)["w"]))(a)
  np.testing.assert_allclose(fo, 0.0, atol=1e-7)


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


def _numpy_adapted_predictions(params, x, y, support, query_idx, alpha):
  """NumPy reference: tiny_net's query predictions after one SGD step per user."""
  W, b = np.asarray(params["lin"]["kernel"]), np.asarray(params["lin"]["bias"])
  w2, c = np.asarray(params["out"]["kernel"]), float(params["out"]["bias"])
  out = []
  for x_u, y_u, s_u, q_u in zip(np.asarray(x), np.asarray(y), np.asarray(support),
                                np.asarray(query_idx)):
    xs, ys = x_u[s_u], y_u[s_u]
    h = np.tanh(xs @ W + b)
    dpre = (2 / len(xs)) * (h @ w2 + c - ys)[:, None] * w2[None, :] * (1 - h ** 2)
    W_u, b_u = W - alpha * xs.T @ dpre, b - alpha * dpre.sum(0)
    out.append(np.tanh(x_u[q_u] @ W_u + b_u) @ w2 + c)
  return np.stack(out)


class ByRowsTest(chex.TestCase):
  """A batch run by length (sorted parts, each on only the rows it needs) = the whole batch."""

  def _batch(self):
    rng = np.random.default_rng(3)
    lengths = np.array([3, 12, 5, 4, 7, 9, 6, 11])  # sorted parts: (3,4) (5,6) (7,9) (11,12)
    L = 12
    valid = np.arange(L)[None, :] < lengths[:, None]
    x = jnp.asarray(np.where(valid[..., None], rng.normal(size=(8, L, 3)), 0.0), jnp.float32)
    y = jnp.asarray(np.where(valid, rng.normal(size=(8, L)), 0.0), jnp.float32)
    support, query_idx = meta.last_query_split(jnp.asarray(lengths), L, q=2)
    return x, y, support, query_idx

  # Budgets 4 and 6 fit their parts; (7, 9) exceeds 8 and falls back to all 12 rows.
  BUDGETS = (4, 6, 8, 12)

  def _run(self, params, budgets):
    _, labels, apply = tiny_net()
    x, y, support, query_idx = self._batch()

    def fn(s, q, x, y):
      return meta.adapted_query_predictions(apply, params, labels, 0.3, x, y, s, q, steps=1)
    return meta.by_rows(fn, support, query_idx, x, y, budgets=budgets)

  @chex.variants(with_jit=True, without_jit=True)
  def test_parts_that_fit_and_parts_that_fall_back_match_a_numpy_reference(self):
    params, _, _ = tiny_net()
    x, y, support, query_idx = self._batch()
    chex.assert_trees_all_equal(meta.rows_used(support, query_idx),
                                jnp.array([3, 12, 5, 4, 7, 9, 6, 11]))
    by_length = self.variant(lambda p: self._run(p, self.BUDGETS))(params)
    chex.assert_shape(by_length, (8, 2))
    expected = _numpy_adapted_predictions(params, x, y, support, query_idx, 0.3)
    np.testing.assert_allclose(by_length, expected, rtol=1e-5, atol=1e-6)

  def test_the_meta_gradient_through_the_parts_is_the_whole_batchs(self):
    params, _, _ = tiny_net()
    grad = jax.jit(jax.grad(lambda p, b: jnp.sum(self._run(p, b) ** 2)), static_argnums=1)
    chex.assert_trees_all_close(grad(params, self.BUDGETS), grad(params, ()), rtol=1e-5,
                                atol=1e-6)

  def test_the_parts_that_fit_are_those_of_a_numpy_reference_and_switch_parts_cuts_them(self):
    _, _, support, query_idx = self._batch()
    fits = meta.parts_fit(support, query_idx, self.BUDGETS)
    need = np.sort(np.array([3, 12, 5, 4, 7, 9, 6, 11]))  # rows_used of the batch
    expected = [need[2 * j + 1] <= b for j, b in enumerate(self.BUDGETS)]
    assert expected == [True, True, False, True]
    chex.assert_trees_all_equal(fits, jnp.array(expected))
    # The pattern of the branch that runs: the parts that fit, the last (all rows) never cut.
    run = meta.length_bucketing(self.BUDGETS)
    cut = jax.jit(lambda s, q: meta.switch_parts(run, lambda r: jnp.array(r.cut),
                                                 s, q))(support, query_idx)
    chex.assert_trees_all_equal(cut, jnp.array([True, True, False, False]))
    # Any other runner: f(run) as it is.
    assert meta.switch_parts(meta.whole_batch, lambda r: r, support, query_idx) is \
        meta.whole_batch

  def test_the_meta_gradient_with_the_parts_chosen_outside_it_is_the_whole_batchs(self):
    """The second-order meta-gradient, the parts picked by one switch around it
    (meta.switch_parts, as a training step does) = the whole batch's."""
    params, labels, apply = tiny_net()
    x, y, support, query_idx = self._batch()

    def loss(p, run):
      def fn(s, q, x, y):
        return meta.adapted_query_predictions(apply, p, labels, 0.3, x, y, s, q, steps=1)
      return jnp.sum(run(fn, support, query_idx, x, y) ** 2)
    run = meta.length_bucketing(self.BUDGETS)
    switched = jax.jit(lambda p: meta.switch_parts(
        run, lambda r: jax.value_and_grad(functools.partial(loss, run=r))(p), support,
        query_idx))(params)
    whole = jax.jit(jax.value_and_grad(functools.partial(loss, run=meta.whole_batch)))(params)
    chex.assert_trees_all_close(switched, whole, rtol=1e-5, atol=1e-6)


def test_row_budgets_follow_the_length_distribution():
  lengths = np.r_[np.full(90, 10), np.full(10, 100)]
  assert meta.row_budgets(lengths, 32, 100, parts=2) == (16, 100)
  assert meta.row_budgets(lengths, 32, 100, parts=1) == ()
  assert meta.row_budgets(lengths, 30, 100, parts=4) == ()          # 30 users in 4 parts
  assert meta.row_budgets(np.full(50, 90), 32, 100, parts=2) == ()  # nothing to save
  assert meta.row_budgets(np.full(50, 60), 32, 100, parts=2) == (64, 100)
  assert meta.row_budgets(np.full(50, 60), 32, 100, parts=2, max_short=0.5) == ()
  four = meta.row_budgets(np.arange(11, 101), 32, 100, parts=4)
  assert len(four) == 4 and four[-1] == 100 and list(four) == sorted(four)
  assert all(b % 8 == 0 for b in four[:-1])
