"""The user tower once per user (fast_jax.models.MeLU.head_one_user): the same function
as the per-row head, checked against a NumPy forward pass and through the adapted,
second-order meta-gradient; and the data condition that switches it on."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fast_jax import meta
from fast_jax.config import Config, resolve
from fast_jax.methods import learner as learn
from fast_jax.methods.base import make_context

from fast_jax.models import fields_from_meta, make_backbone, user_rows_shared
from conftest import TINY

DATASETS = ["ml100k", "bookcrossing", "synthetic"]
GRADIENT_DATASETS = ["ml100k"]  # compile-bound: one real dataset suffices here
OPTIONS = {"synthetic": TINY}


def _numpy_head(params, e, item_dim):
  """MeLU's head in NumPy, every row on its own: relu(item_fc), relu(user_fc), concat,
  fc1, fc2, out."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  relu = lambda a: np.maximum(a, 0.0)
  dense = lambda name, a: a @ p[name]["kernel"] + p[name]["bias"]
  e = np.asarray(e, np.float64)
  h = np.concatenate([relu(dense("item_fc", e[..., :item_dim])),
                      relu(dense("user_fc", e[..., item_dim:]))], -1)
  return dense("out", relu(dense("fc2", relu(dense("fc1", h)))))[..., 0]


@pytest.mark.parametrize("name", DATASETS)
def test_head_one_user_equals_the_per_row_head_and_numpy(prepared, name):
  data = prepared(name, **OPTIONS.get(name, {}))
  bb = make_backbone(data.meta, out_bias=3.5, user_rows_shared=True)
  x = jnp.asarray(data.train.x[:4])
  params = bb.init(jax.random.key(0), x)
  e = bb.embed(params, x)  # [4 users, L, D]
  item_dim = bb.module.embed_dim * sum(f["side"] == "item" for f in data.meta["fields"])
  valid = np.arange(x.shape[1]) < np.asarray(data.train.length[:4])[:, None]
  ref = _numpy_head(params, e, item_dim)[valid]
  per_user = jax.jit(jax.vmap(lambda e_u: bb.head_user(params, e_u)))(e)[valid]
  # (Padding rows differ: their user fields are the pad value, and they are masked.)
  chex.assert_trees_all_close(per_user, bb.head(params, e)[valid], rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(per_user, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", GRADIENT_DATASETS)
def test_adapted_predictions_and_meta_gradient_match_the_per_row_head(prepared, name):
  steps = 2  # the first inner step at the shared parameters, the second at adapted ones
  data = prepared(name, **OPTIONS.get(name, {}))
  cfg = resolve(Config(dataset=name, inner_lr=0.05, inner_steps=steps), data.meta["dataset"])
  ctx = make_context(cfg, data)
  assert ctx.user_rows_shared
  bb, labels = learn.network(ctx)
  per_row = dataclasses.replace(bb, user_rows_shared=False)
  x = jnp.asarray(data.train.x[:6])
  y = jnp.asarray(data.train.y[:6])
  group = jnp.asarray(data.train.group[:6])
  support, query = meta.last_query_split(jnp.asarray(data.train.length[:6]), x.shape[1])
  params = bb.init(jax.random.key(1), x[0])
  alpha = jnp.asarray(cfg.inner_lr, jnp.float32)

  def loss(params, backbone):
    lrn = learn.maml(backbone, labels, steps=steps, first_order=False)
    pred = learn.predict(lrn, params, alpha, x, y, support, query, group)
    return jnp.mean(jnp.square(pred - meta.take_rows(y, query))), pred

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, pred_once), g_once = grad(params, bb)
  (_, pred_rows), g_rows = grad(params, per_row)
  chex.assert_trees_all_close(pred_once, pred_rows, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(g_once, g_rows, rtol=1e-4, atol=1e-6)
  # The inner loop moved the predictions, so the check covers the adapted head too.
  lrn = learn.maml(bb, labels, steps=steps, first_order=False)
  unadapted = jax.jit(lambda p: learn.predict(lrn, p, alpha, x, y, support, query, group,
                                              adapt=False))(params)
  assert float(jnp.max(jnp.abs(unadapted - pred_once))) > 1e-4


class _Split:
  def __init__(self, x, length):
    self.x, self.length = x, length


def test_user_rows_shared_requires_the_same_user_fields_on_every_valid_row(prepared):
  data = prepared("ml100k")
  fields = fields_from_meta(data.meta)
  user_col = next(f.start for f in fields if f.side == "user")
  item_col = next(f.start for f in fields if f.side == "item")
  split = data.train
  assert user_rows_shared(fields, data.train, data.valid, data.test)
  x = np.array(split.x)
  n = int(split.length[0])
  x[0, n:, user_col] += 1  # padding rows: ignored
  x[0, 1:n, item_col] += 1  # item fields may differ
  assert user_rows_shared(fields, _Split(x, split.length))
  x[0, n - 1, user_col] += 1  # a valid row of user 0 with another user value
  assert not user_rows_shared(fields, _Split(x, split.length))
  assert not user_rows_shared([f for f in fields if f.side == "item"], split)
