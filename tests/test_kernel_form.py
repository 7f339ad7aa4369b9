"""One inner step in kernel form (fast_jax.models.one_step_query): the query output after
one SGD step on the support rows, computed without forming the adapted weights, against
a NumPy step written out by hand and against adapting the weights (predictions and the
second-order meta-gradient); and the learner's choice of it."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fast_jax import meta
from fast_jax.methods import learner as learn
from fast_jax.models import FAST_LOCAL, MELU_LOCAL, make_backbone

# (dataset, user tower: once per user / per row / no user fields, adapted layers, first order)
CASES = [
    ("ml100k", "once", FAST_LOCAL, False),
    ("ml100k", "per row", MELU_LOCAL, False),
    ("bookcrossing", "once", MELU_LOCAL, True),
    ("bookcrossing", "none", MELU_LOCAL, False),
]
USERS, ALPHA = 4, 0.05


def _numpy_one_step(params, e, y, support, e_query, item_dim, local, alpha):
  """One SGD step of the per-row head on the masked MSE, gradients by hand, float64;
  then the adapted head on the query rows."""
  p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params.items()}
  e, y, s = np.asarray(e, np.float64), np.asarray(y, np.float64), np.asarray(support, bool)
  relu = lambda a: np.maximum(a, 0.0)

  towers = ("item_fc", "user_fc") if e.shape[1] > item_dim else ("item_fc",)

  def forward(p, e):
    acts = {"item_fc": e[:, :item_dim], "user_fc": e[:, item_dim:]}
    z = {name: acts[name] @ p[name]["kernel"] + p[name]["bias"] for name in towers}
    acts["fc1"] = np.concatenate([relu(z[name]) for name in towers], -1)
    z["fc1"] = acts["fc1"] @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    acts["fc2"] = relu(z["fc1"])
    z["fc2"] = acts["fc2"] @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    acts["out"] = relu(z["fc2"])
    z["out"] = acts["out"] @ p["out"]["kernel"] + p["out"]["bias"]
    return acts, z

  acts, z = forward(p, e)
  dz = {"out": (2.0 * (z["out"][:, 0] - y) * s / s.sum())[:, None]}
  dz["fc2"] = (dz["out"] @ p["out"]["kernel"].T) * (z["fc2"] > 0)
  dz["fc1"] = (dz["fc2"] @ p["fc2"]["kernel"].T) * (z["fc1"] > 0)
  d_concat = dz["fc1"] @ p["fc1"]["kernel"].T
  half = p["item_fc"]["kernel"].shape[1]
  dz["item_fc"] = d_concat[:, :half] * (z["item_fc"] > 0)
  if "user_fc" in towers:
    dz["user_fc"] = d_concat[:, half:] * (z["user_fc"] > 0)
  for name in set(local) & set(dz):
    p[name] = {"kernel": p[name]["kernel"] - alpha * acts[name].T @ dz[name],
               "bias": p[name]["bias"] - alpha * dz[name].sum(0)}
  return forward(p, np.asarray(e_query, np.float64))[1]["out"][:, 0]


def _batch(data):
  x = jnp.asarray(data.train.x[:USERS])
  support, query = meta.last_query_split(jnp.asarray(data.train.length[:USERS]), x.shape[1])
  return x, jnp.asarray(data.train.y[:USERS]), support, query


@pytest.mark.parametrize("name,tower,local,first_order", CASES)
def test_one_step_query_equals_a_numpy_step_and_adapting_the_weights(prepared, name, tower,
                                                                     local, first_order):
  data = prepared(name)
  bb = make_backbone(data.meta, out_bias=3.5, user_rows_shared=tower == "once")
  user_fields = tuple(f["name"] for f in data.meta["fields"] if f["side"] == "user")
  module = bb.module.clone(drop_fields=user_fields) if tower == "none" else bb.module
  bb = dataclasses.replace(bb, module=module, local_modules=local)
  x, y, support, query = _batch(data)
  params = bb.init(jax.random.key(0), x[0])
  labels = bb.labels(params)
  e = bb.embed(params, x)
  e_query = meta.take_rows(e, query)
  item_dim = bb.module.embed_dim * sum(f["side"] == "item" for f in data.meta["fields"])

  def kernel(params, alpha):
    e = bb.embed(params, x)
    return jax.vmap(lambda e_u, y_u, s_u, eq_u: bb.one_step_query(
        params, alpha, e_u, y_u, s_u, eq_u, first_order=first_order))(
            e, y.astype(e.dtype), support, meta.take_rows(e, query))

  def weights(params, alpha):
    e = bb.embed(params, x)

    def one(e_u, y_u, s_u, eq_u):
      theta = meta.inner_adapt(bb.head_user, params, labels, alpha, e_u, y_u, s_u, steps=1,
                               first_order=first_order)
      return bb.head_user(theta, eq_u)
    return jax.vmap(one)(e, y.astype(e.dtype), support, meta.take_rows(e, query))

  alpha = jnp.float32(ALPHA)
  pred = jax.jit(kernel)(params, alpha)
  chex.assert_shape(pred, query.shape)
  ref = np.stack([_numpy_one_step(params, e[u], y[u], support[u], e_query[u], item_dim, local,
                                  ALPHA) for u in range(USERS)])
  np.testing.assert_allclose(pred, ref, rtol=1e-4, atol=1e-4)
  # The step moved the predictions, so the check covers the adapted layers.
  assert float(jnp.max(jnp.abs(pred - bb.head_user(params, e_query)))) > 1e-3

  # The meta-gradients in float64: at float32 a pre-activation within rounding of zero
  # may take either side of the ReLU in the two forms, and the gradients jump there.
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), params)
    alpha64, y64 = jnp.float64(ALPHA), jnp.asarray(y, jnp.float64)

    def meta_grad(fn):
      def loss(params, alpha):
        return jnp.mean(jnp.square(fn(params, alpha) - meta.take_rows(y64, query)))
      return jax.jit(jax.grad(loss, argnums=(0, 1)))(params64, alpha64)
    g_kernel, g_weights = meta_grad(kernel), meta_grad(weights)
  chex.assert_trees_all_close(g_kernel, g_weights, rtol=1e-9, atol=1e-12)
  assert float(jnp.abs(g_kernel[1])) > 1e-6  # the rate's own meta-gradient is not nil


LEARNERS = [(1, "scalar", True), (1, "per-param", False), (2, "scalar", False)]


@pytest.mark.parametrize("steps,rates,direct", LEARNERS)
def test_predict_takes_the_kernel_form_for_one_step_with_a_scalar_rate(prepared, monkeypatch,
                                                                      steps, rates, direct):
  data = prepared("ml100k")
  bb = make_backbone(data.meta, out_bias=3.5, user_rows_shared=True)
  x, y, support, query = _batch(data)
  group = jnp.asarray(data.train.group[:USERS])
  params = bb.init(jax.random.key(1), x[0])
  labels = bb.labels(params)
  alpha = jnp.float32(ALPHA)
  if rates == "per-param":
    alpha = jax.tree.map(lambda v: jnp.full_like(v, ALPHA), meta.split_params(params, labels)[0])
  lrn = learn.maml(bb, labels, steps=steps, first_order=False)
  assert (lrn.query_output is not None) == (steps == 1)
  calls = []
  if lrn.query_output is not None:
    inner = lrn.query_output
    lrn = lrn._replace(query_output=lambda *a: calls.append(1) or inner(*a))
  pred = learn.predict(lrn, params, alpha, x, y, support, query, group)
  assert bool(calls) == direct
  monkeypatch.setattr(learn, "ONE_STEP_KERNEL", False)
  by_weights = learn.maml(bb, labels, steps=steps, first_order=False)
  assert by_weights.query_output is None
  ref = learn.predict(by_weights, params, alpha, x, y, support, query, group)
  np.testing.assert_allclose(pred, ref, rtol=1e-5, atol=1e-5)


# CLOVER's inner loop (inner max, inner adv, first order): the fooling term with the
# adversary's inner step, and with a first-order meta-gradient (the plain MAML step is
# the one test_one_step_query_equals_a_numpy_step_and_adapting_the_weights checks).
CLOVER_SWITCHES = [(True, True, False), (True, False, True)]


@pytest.fixture(scope="module")
def clover_user(prepared):
  """CLOVER's players (one inner step, cross-entropy over rating classes), their initial
  state and four ML-100K users."""
  from fast_jax.config import Config, resolve
  from fast_jax.methods import clover
  from fast_jax.methods.base import make_context
  cfg = resolve(Config(dataset="ml100k", method="clover", preset="code", inner_lr=ALPHA,
                       inner_steps=1, disable_inner_max=False), "ml100k")
  ctx = make_context(cfg, prepared("ml100k"))
  players, _, init = clover.game(ctx)
  state = jax.jit(init)(jax.random.key(0))
  batch = jax.tree.map(lambda a: a[:USERS], ctx.splits["train"])
  return players, state, batch


@pytest.mark.parametrize("inner_max,inner_adv,first_order", CLOVER_SWITCHES)
def test_clover_one_step_in_kernel_form_equals_adapting_both_players(clover_user, inner_max,
                                                                     inner_adv, first_order):
  from fast_jax.methods import clover
  players, state, batch = clover_user
  players = clover.Players(players.backbone, players.labels, players.spec, inner_steps=1,
                           first_order=first_order, adv_inner_lr=ALPHA)
  assert players.kernel_form
  flags = dict(inner_max=inner_max, inner_adv=inner_adv)
  support, query = meta.last_query_split(batch["length"], batch["x"].shape[1])
  q_mask = jnp.ones(query.shape[-1], bool)

  def per_user(kernel):
    def fn(rec, adv, alpha):
      e = players.backbone.embed(rec, batch["x"])
      y = batch["y"].astype(e.dtype)

      def one(e_u, y_u, s_u, g_u, q_u):
        eq_u, yq_u = e_u[q_u], y_u[q_u]
        if kernel:
          forward, adv_u = players.adapt_forward(rec, adv, alpha, e_u, y_u, s_u, g_u, eq_u,
                                                 **flags)
        else:
          rec_u, adv_u = players.adapt(rec, adv, alpha, e_u, y_u, s_u, g_u, **flags)
          forward = clover._forward(players.backbone, rec_u, eq_u)
        return forward, adv_u, players.losses_of(forward, adv_u, yq_u, q_mask, g_u)
      return jax.vmap(one)(e, y, support, batch["group"], query)
    return fn

  with jax.enable_x64(True):
    rec, adv = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64),
                            (state.params, state.extra["adv"]))
    alpha = jnp.float64(ALPHA)
    got, want = jax.jit(per_user(True))(rec, adv, alpha), jax.jit(per_user(False))(rec, adv,
                                                                                  alpha)
    chex.assert_trees_all_close(got, want, rtol=1e-9, atol=1e-12)

    def meta_grad(kernel):
      def objective(rec, adv, alpha):
        l_rec, l_adv = per_user(kernel)(rec, adv, alpha)[2]
        return jnp.mean(l_rec) - players.spec.lam1 * jnp.mean(l_adv)
      return jax.jit(jax.grad(objective, argnums=(0, 1, 2)))(rec, adv, alpha)
    chex.assert_trees_all_close(meta_grad(True), meta_grad(False), rtol=1e-9, atol=1e-12)
    # The step moved the recommender's query outputs.
    e0 = players.backbone.embed(rec, batch["x"][0])
    unadapted = clover._forward(players.backbone, rec, e0[query[0]])[0]
    assert float(jnp.max(jnp.abs(got[0][0][0] - unadapted))) > 1e-4
