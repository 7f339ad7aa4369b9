"""IPW (docs/methods.md §5): each user's query loss weighted by ``1 / pi_g``, the inverse of
its group's share of the training users, self-normalised within the batch."""

from __future__ import annotations

import jax.numpy as jnp

from fast_jax import fairness
from fast_jax.methods import fast
from fast_jax.methods.base import Context, Method


def objective(ctx: Context) -> fast.Objective:
  shares = jnp.asarray(ctx.group_shares, jnp.float32)
  return fast.Objective("uniform", "none", lambda k, g, p: fairness.ipw_weights(g, shares),
                        fast.no_penalty)


def make(ctx: Context, *, by_length: bool = True) -> Method:
  return fast.meta_method(ctx, objective(ctx), by_length=by_length)
