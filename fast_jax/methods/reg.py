"""Reg (docs/methods.md §5): ``mean_u l_u + lambda * pen``, lambda = ``--reg-weight``.

lambda is the lane's ``state.hyper["reg_weight"]``, a value of the train state rather
than a constant of the program: runs at other weights (and the other rows, which share
Reg's program) reuse one compiled epoch, and a sweep of weights trains as lanes.

``pen`` is the spread of the group means of the query MSE (``--reg-kind loss``;
differentiable through the inner step, 0 when a group is missing from the batch) or Yao
& Huang's value unfairness over the batch's query rows (``--reg-kind value``, items
identified by their item-field columns).
"""

from __future__ import annotations

import jax.numpy as jnp

from fast_jax import fairness
from fast_jax.methods import fast
from fast_jax.methods.base import Context, Method


def objective(ctx: Context) -> fast.Objective:
  g, kind = ctx.num_groups, ctx.cfg.reg_kind
  if kind == "loss":
    def penalty(t: fast.OuterTerms):
      return t.hyper["reg_weight"] * fairness.gap_penalty(t.mse, t.group, g, t.weights)
  elif kind == "value":
    if not ctx.item_columns:
      raise ValueError("reg_kind='value' needs the item columns of x")
    cols = jnp.asarray(ctx.item_columns)

    def penalty(t: fast.OuterTerms):
      return t.hyper["reg_weight"] * fairness.value_unfairness(t.pred, t.y, t.x[..., cols],
                                                               t.group, g)
  else:
    raise ValueError(f"reg_kind {kind!r}: expected 'loss' or 'value'")
  return fast.Objective("uniform", "none", fast.uniform_weights, penalty)


def make(ctx: Context, *, by_length: bool = True) -> Method:
  return fast.meta_method(ctx, objective(ctx), by_length=by_length)
