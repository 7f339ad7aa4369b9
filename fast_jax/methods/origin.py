"""Origin (docs/methods.md §5): plain meta-learning, uniform batches, every user counts once."""

from __future__ import annotations

from fast_jax.methods import fast
from fast_jax.methods.base import Context, Method

OBJECTIVE = fast.Objective("uniform", "none", fast.uniform_weights, fast.no_penalty)


def make(ctx: Context, *, by_length: bool = True) -> Method:
  return fast.meta_method(ctx, OBJECTIVE, by_length=by_length)
