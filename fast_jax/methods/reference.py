"""The reference predictors (docs/methods.md §7): nothing to learn, one record with epoch 0.

    global-mean    the mean training rating on every query row
    support-mean   the mean rating of the user's own support rows
    constant-mode  the most frequent training rating on every query row (on ML-1M "always
                   4" is as good as a MAE-trained regressor that ignores the user)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fast_jax import metrics
from fast_jax.methods.base import Context, Method, TrainState


def most_frequent_rating(ctx: Context) -> float:
  """The most frequent rating over all rows of the training users (ties: the lowest; on
  continuous ratings, such as the synthetic data's, every value is unique and this is the
  lowest)."""
  train = ctx.data.train
  values, counts = np.unique(train.y[train.mask], return_counts=True)
  return float(values[np.argmax(counts)])


def _method(ctx: Context, predict, *, constant: float | None = None) -> Method:
  """A reference predictor; ``state.params["value"]`` holds ``constant`` (default the
  training mean)."""
  value = ctx.train_mean if constant is None else constant

  def record(state, train: dict) -> dict:
    """A method without epochs records its training split's report."""
    return {"train_loss": train["mse"],
            "group_loss": [train["group"][str(g)]["mse"] for g in range(ctx.num_groups)]}
  return Method(
      init=lambda key: TrainState(params={"value": jnp.float32(value)}, opt_state=(),
                                  step=jnp.zeros((), jnp.int32)),
      epoch=None, predict=predict, record=record,
      splits={**ctx.splits, "fit": ctx.splits["train"]},
      choices=lambda s, selected_epoch, epochs_run: {
          "train_mean" if constant is None else "train_mode": value})


def global_mean(ctx: Context, *, by_length: bool = True) -> Method:
  return _method(ctx, lambda s, x, y, support, q, group: jnp.full(q.shape, s.params["value"]))


def support_mean(ctx: Context, *, by_length: bool = True) -> Method:
  return _method(ctx, lambda s, x, y, support, q, group: jnp.broadcast_to(
      metrics.masked_mean(y, support)[:, None], q.shape))


def constant_mode(ctx: Context, *, by_length: bool = True) -> Method:
  return _method(ctx, lambda s, x, y, support, q, group: jnp.full(q.shape, s.params["value"]),
                 constant=most_frequent_rating(ctx))
