"""The reference predictors (docs/methods.md §7): nothing to learn, one record with epoch 0.

    global-mean   the mean training rating on every query row
    support-mean  the mean rating of the user's own support rows
"""

from __future__ import annotations

import jax.numpy as jnp

from fast_jax import metrics
from fast_jax.methods.base import Context, Method, TrainState


def _method(ctx: Context, predict) -> Method:
  mean = ctx.train_mean

  def record(state, train: dict) -> dict:
    """A method without epochs records its training split's report."""
    return {"train_loss": train["mse"],
            "group_loss": [train["group"][str(g)]["mse"] for g in range(ctx.num_groups)]}
  return Method(
      init=lambda key: TrainState(params={"mean": jnp.float32(mean)}, opt_state=(),
                                  step=jnp.zeros((), jnp.int32)),
      epoch=None, predict=predict, record=record,
      splits={**ctx.splits, "fit": ctx.splits["train"]},
      choices=lambda s, selected_epoch, epochs_run: {"train_mean": mean})


def global_mean(ctx: Context, *, by_length: bool = True) -> Method:
  return _method(ctx, lambda s, x, y, support, q, group: jnp.full(q.shape, s.params["mean"]))


def support_mean(ctx: Context, *, by_length: bool = True) -> Method:
  return _method(ctx, lambda s, x, y, support, q, group: jnp.broadcast_to(
      metrics.masked_mean(y, support)[:, None], q.shape))
