"""Reg and IPW as outer objectives: the gap penalty, value unfairness, IPW weights."""

import functools
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fast_jax import fairness, meta
from fast_jax.config import Config, resolve
from fast_jax.methods import fast, ipw, origin, reg
from fast_jax.methods import learner as learn
from fast_jax.methods.base import TrainState
from fast_jax.models import make_backbone

# The toy steps run once: skipping XLA's backend optimisations halves their compile time.
quick_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

TOY_META = {
    "fields": [
        {"name": "item", "side": "item", "kind": "categorical", "start": 0, "stop": 1,
         "vocab_size": 12},
        {"name": "user", "side": "user", "kind": "categorical", "start": 1, "stop": 2,
         "vocab_size": 8},
    ],
    "sensitive": {"column": None, "groups": ["a", "b"]},
}


def _toy_batch(b=8, rows=20):
  """Six users of group 0 rated 1 below the initial output bias of 3, two users of group 1
  rated 1.5 above it: a step on the mean loss mostly serves group 0 and widens the gap."""
  rng = np.random.default_rng(0)
  group = np.array([0, 0, 0, 0, 0, 0, 1, 1])
  x = np.stack([rng.integers(0, 12, (b, rows)), np.repeat(np.arange(b)[:, None], rows, 1)], -1)
  y = np.where(group[:, None] == 1, 4.5, 2.0) + rng.normal(0, 0.1, (b, rows))
  return {"x": jnp.asarray(x, jnp.int32), "y": jnp.asarray(y, jnp.float32),
          "length": jnp.full((b,), rows, jnp.int32), "group": jnp.asarray(group, jnp.int32)}


def _toy_ctx(cfg, shares=(0.5, 0.5)):
  """What the objectives and the step read of a Context, for the toy layout."""
  return types.SimpleNamespace(cfg=cfg, num_groups=2, max_len=20, item_columns=(0,),
                               group_shares=np.asarray(shares))


def _toy_step(method, reg_weight=0.0, reg_kind="loss", lr=0.005):
  cfg = resolve(Config(method=method, reg_weight=reg_weight, reg_kind=reg_kind,
                       train_query="last", inner_lr=0.01), "toy")
  ctx = _toy_ctx(cfg)
  backbone = make_backbone(TOY_META, out_bias=3.0)
  batch = _toy_batch()
  params = backbone.init(jax.random.key(0), batch["x"][0])
  learner = learn.maml(backbone, backbone.labels(params), steps=1, first_order=False)
  objective = reg.objective(ctx) if method == "reg" else origin.OBJECTIVE
  tx = optax.sgd(lr)
  step = fast.make_train_step(learner, objective, learn.inner_rate(cfg), tx, ctx=ctx)
  state = TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                     alpha=jnp.float32(0.01), p=jnp.full((2,), 0.5),
                     hyper={"gamma": jnp.float32(cfg.gamma), "tau": jnp.float32(cfg.tau),
                            "reg_weight": jnp.float32(cfg.reg_weight)})
  return learner, quick_jit(step), state, batch


def _group_gap(learner, params, batch):
  @quick_jit
  def gap(params, batch):
    support, query = meta.last_query_split(batch["length"], 20)
    pred = learn.predict(learner, params, jnp.float32(0.01), batch["x"], batch["y"], support,
                         query, batch["group"])
    mse, _ = learn.query_errors(pred, meta.take_rows(batch["y"], query))
    return fairness.gap_penalty(mse, batch["group"], 2)
  return float(gap(params, batch))


def test_a_reg_gradient_step_shrinks_the_group_loss_gap():
  learner, reg_step, state, batch = _toy_step("reg", reg_weight=5.0)
  _, origin_step, _, _ = _toy_step("origin")
  before = _group_gap(learner, state.params, batch)
  after_reg = _group_gap(learner, reg_step(state, batch, jax.random.key(0))[0].params, batch)
  after_origin = _group_gap(learner, origin_step(state, batch, jax.random.key(0))[0].params,
                            batch)
  assert after_origin > before  # the mean serves the majority
  assert after_reg < before


def test_value_penalty_is_the_reg_weight_times_value_unfairness_on_the_item_columns():
  rng = np.random.default_rng(1)
  group = jnp.array([0, 0, 1, 1])
  pred, y = (jnp.asarray(rng.normal(3, 1, (4, 5)), jnp.float32) for _ in range(2))
  # Column 0 is the item, column 1 a user field that must not split items.
  x = jnp.stack([jnp.asarray(rng.integers(0, 3, (4, 5))), jnp.arange(4)[:, None] + 0 * pred],
                -1).astype(jnp.int32)
  objective = reg.objective(_toy_ctx(Config(method="reg", reg_kind="value")))
  terms = fast.OuterTerms(mse=jnp.zeros(4), mae=jnp.zeros(4), group=group, weights=jnp.ones(4),
                          pred=pred, y=y, x=x, hyper={"reg_weight": jnp.float32(2.0)})
  expected = fairness.value_unfairness(pred, y, x[..., :1], group, 2)
  assert float(expected) > 0
  np.testing.assert_allclose(objective.penalty(terms), 2.0 * expected, rtol=1e-6)


class ValueUnfairnessTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_value_unfairness_matches_a_hand_computation_over_shared_items(self):
    # Two users per group, two query rows each. Item 7 is rated by both groups, item 8 by
    # group 0 only (ignored), item 9 by both.
    pred = jnp.array([[4.0, 3.0], [5.0, 2.0], [2.0, 1.0], [3.0, 4.0]])
    y = jnp.array([[3.0, 3.0], [4.0, 2.0], [2.0, 2.0], [3.0, 3.0]])
    items = jnp.array([[7, 8], [7, 9], [7, 9], [9, 9]])[..., None]
    group = jnp.array([0, 0, 1, 1])
    u = self.variant(lambda *a: fairness.value_unfairness(*a, num_groups=2))(
        pred, y, items, group)
    # item 7: G0 errors (+1, +1) -> 1, G1 errors (0) -> 0: |1 - 0| = 1
    # item 9: G0 errors (0) -> 0, G1 errors (-1, 0, +1) -> 0: 0
    np.testing.assert_allclose(u, 0.5, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_value_unfairness_is_zero_without_an_item_both_groups_rated(self):
    pred = jnp.array([[4.0], [1.0]])
    items = jnp.array([[1], [2]])[..., None]
    u = self.variant(lambda *a: fairness.value_unfairness(*a, num_groups=2))(
        pred, jnp.zeros_like(pred), items, jnp.array([0, 1]))
    assert float(u) == 0.0


class IpwTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_ipw_weights_equal_normalised_inverse_group_shares(self):
    shares = np.array([0.7, 0.3])
    objective = ipw.objective(_toy_ctx(Config(method="ipw"), shares))
    group = jnp.array([0, 0, 0, 1, 0, 1])
    w = self.variant(lambda g: objective.weights(jax.random.key(0), g, jnp.full(2, 0.5)))(group)
    inverse = 1.0 / shares[np.asarray(group)]
    # Self-normalised: proportional to 1 / pi_g, mean 1 in the batch.
    np.testing.assert_allclose(w, inverse / inverse.mean(), rtol=1e-6)
    # So the outer loss is sum_u w_u l_u / sum_u w_u with w_u = 1 / pi_g(u).
    losses = np.arange(6.0)
    np.testing.assert_allclose(np.sum(np.asarray(w) * losses) / np.sum(w),
                               np.sum(inverse * losses) / inverse.sum(), rtol=1e-6)
