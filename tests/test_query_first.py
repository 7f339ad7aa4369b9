"""Training batches laid out query first (fast_jax.meta.query_first): the re-laid rows
against a NumPy re-layout, and the inner loop that skips the query rows against the one
that carries them masked (predictions, the second-order meta-gradient, CLOVER's losses)."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fast_jax import meta
from fast_jax.methods import learner as learn
from fast_jax.models import make_backbone

# (users, rows per user, query rows, seed)
LAYOUTS = [(3, 7, 2, 0), (5, 12, 3, 1), (4, 20, 10, 2)]


def _numpy_query_first(support, query, x):
  """Each user's query rows (in query order; a repeated entry once), its support rows, its
  other rows."""
  out_x, out_s = np.empty_like(x), np.zeros_like(support)
  for u in range(len(x)):
    rest = [i for i in range(x.shape[1]) if i not in query[u]]
    order = list(dict.fromkeys(query[u])) + [i for i in rest if support[u, i]] + [
        i for i in rest if not support[u, i]]
    out_x[u] = x[u, order]
    out_s[u] = support[u, order]
  return out_s, out_x


@pytest.mark.parametrize("users,rows,q,seed", LAYOUTS)
def test_query_first_lays_out_query_then_support_then_the_rest(users, rows, q, seed):
  rng = np.random.default_rng(seed)
  length = jnp.asarray(rng.integers(q + 1, rows + 1, users), jnp.int32)
  support, query = meta.random_query_split(jax.random.key(seed), length, rows, q)
  x = jnp.asarray(rng.integers(0, 50, (users, rows, 2)), jnp.int32)
  y = jnp.asarray(rng.normal(size=(users, rows)), jnp.float32)
  new_support, new_query, new_x, new_y = jax.jit(meta.query_first)(support, query, x, y)
  ref_support, ref_x = _numpy_query_first(np.asarray(support), np.asarray(query), np.asarray(x))
  np.testing.assert_array_equal(new_x, ref_x)
  np.testing.assert_array_equal(new_support, ref_support)
  np.testing.assert_array_equal(new_query, np.broadcast_to(np.arange(q), (users, q)))
  # The query rows are the rows the query indices named, in their order.
  np.testing.assert_array_equal(meta.take_rows(new_y, new_query), meta.take_rows(y, query))
  # Support: rows q .. length - 1, as many as before; a user still uses its first rows.
  pos = np.arange(rows)
  np.testing.assert_array_equal(new_support, (pos >= q) & (pos < np.asarray(length)[:, None]))
  np.testing.assert_array_equal(meta.rows_used(new_support, new_query), length)


# (users, rows per user, query rows, seed): query indices drawn with repeats, supports
# anywhere (some empty), where the layout's places are counted rather than sorted for.
ODD_LAYOUTS = [(4, 9, 3, 3), (6, 15, 6, 4)]


@pytest.mark.parametrize("users,rows,q,seed", ODD_LAYOUTS)
def test_query_first_with_repeated_query_rows_matches_numpy(users, rows, q, seed):
  rng = np.random.default_rng(seed)
  query = rng.integers(0, rows, (users, q)).astype(np.int32)
  query[0] = query[0, 0]                                    # one row named q times
  support = rng.random((users, rows)) < 0.5
  support[-1] = False
  x = rng.integers(0, 50, (users, rows, 2)).astype(np.int32)
  new_support, _, new_x = jax.jit(meta.query_first)(
      jnp.asarray(support), jnp.asarray(query), jnp.asarray(x))
  ref_support, ref_x = _numpy_query_first(support, query, x)
  np.testing.assert_array_equal(new_x, ref_x)
  np.testing.assert_array_equal(new_support, ref_support)


# (inner steps, rate: scalar / per parameter, batch runner: whole batches / by length)
LEARNERS = [(1, "scalar", "whole"), (3, "scalar", "whole"), (3, "scalar", "by length"),
            (1, "per-param", "by length")]
USERS, ALPHA = 8, 0.05


def _training_batch(data, key):
  x = jnp.asarray(data.train.x[:USERS])
  length = jnp.asarray(data.train.length[:USERS])
  support, query = meta.random_query_split(key, length, x.shape[1])
  return x, jnp.asarray(data.train.y[:USERS]), support, query, jnp.asarray(
      data.train.group[:USERS]), length


@pytest.mark.parametrize("steps,rates,runner", LEARNERS)
def test_inner_loop_without_the_query_rows_predicts_as_with_them(prepared, steps, rates,
                                                                 runner):
  data = prepared("ml100k")
  bb = make_backbone(data.meta, out_bias=3.5, user_rows_shared=True)
  x, y, support, query, group, length = _training_batch(data, jax.random.key(3))
  params = bb.init(jax.random.key(1), x[0])
  labels = bb.labels(params)
  alpha = jnp.float32(ALPHA)
  if rates == "per-param":
    alpha = jax.tree.map(lambda v: jnp.full_like(v, ALPHA), meta.split_params(params, labels)[0])
  lrn = learn.maml(bb, labels, steps=steps, first_order=False)
  run = meta.whole_batch
  if runner == "by length":  # the shorter half on fewer rows than the longest user's
    short = int(np.sort(np.asarray(length))[USERS // 2 - 1])
    assert short < x.shape[1]
    run = meta.length_bucketing((short, x.shape[1]))
  assert learn.QUERY_FIRST  # what a training step passes

  def predict(params, alpha, y, query_first):
    return learn.predict(lrn, params, alpha, x, y, support, query, group, run=run,
                         query_first=query_first)
  pred = jax.jit(lambda p, a: predict(p, a, y, True))(params, alpha)
  ref = jax.jit(lambda p, a: predict(p, a, y, False))(params, alpha)
  chex.assert_shape(pred, query.shape)
  np.testing.assert_allclose(pred, ref, rtol=1e-5, atol=1e-5)
  unadapted = learn.predict(lrn, params, alpha, x, y, support, query, group, adapt=False)
  assert float(jnp.max(jnp.abs(ref - unadapted))) > 1e-3  # the inner loop moved them

  # The meta-gradients in float64 (at float32 a pre-activation within rounding of zero
  # may take either side of the ReLU in the two layouts).
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), params)
    a64 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), alpha)
    y64 = jnp.asarray(y, jnp.float64)
    y_q = meta.take_rows(y64, query)

    def grads(query_first):
      loss = lambda p, a: jnp.mean(jnp.square(predict(p, a, y64, query_first) - y_q))
      return jax.jit(jax.grad(loss, argnums=(0, 1)))(p64, a64)
    g_laid, g_ref = grads(True), grads(False)
  chex.assert_trees_all_close(g_laid, g_ref, rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def clover_players(prepared):
  """CLOVER's players at its ML-100K settings (three inner steps, cross-entropy), their
  initial state and eight ML-100K users."""
  from fast_jax.config import Config, resolve
  from fast_jax.methods import clover
  from fast_jax.methods.base import make_context
  cfg = resolve(Config(dataset="ml100k", method="clover", preset="code", inner_lr=ALPHA,
                       inner_steps=3, disable_inner_max=False), "ml100k")
  ctx = make_context(cfg, prepared("ml100k"))
  players, _, init = clover.game(ctx)
  state = jax.jit(init)(jax.random.key(0))
  return players, state, jax.tree.map(lambda a: a[:USERS], ctx.splits["train"])


def test_clover_losses_without_the_query_rows_equal_those_with_them(clover_players,
                                                                   monkeypatch):
  players, state, batch = clover_players
  support, query = meta.random_query_split(jax.random.key(4), batch["length"],
                                           batch["x"].shape[1])

  def losses():
    return jax.jit(lambda rec, adv, a: players.batch_losses(rec, adv, a, batch, support, query))(
        state.params, state.extra["adv"], state.alpha)
  laid = losses()
  monkeypatch.setattr(learn, "QUERY_FIRST", False)
  in_place = losses()
  chex.assert_trees_all_close(laid, in_place, rtol=1e-5, atol=1e-6)
  assert float(jnp.std(in_place[0])) > 1e-3  # per-user losses, not one constant
