"""Static (docs/methods.md §5): FAST's sampler with p fixed at 1/G.

Each batch is drawn from per-group pools with ``p = 1/G`` (Binomial(B, 1/2) users per
group for two groups; :func:`fast_jax.fairness.group_pool_batches`, the FAST code's
sampler), so the minority is sampled as often as the majority; p never moves.
``--p-update`` does not apply: with p fixed there is no update to time, and Static
always draws its batches from the pools (the committed Static rows ran this way).
"""

from __future__ import annotations

from fast_jax.methods import fast
from fast_jax.methods.base import Context, Method

OBJECTIVE = fast.Objective("group", "none", fast.uniform_weights, fast.no_penalty)


def make(ctx: Context, *, by_length: bool = True) -> Method:
  return fast.meta_method(ctx, OBJECTIVE, by_length=by_length)
