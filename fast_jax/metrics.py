"""Masked losses and the evaluation metrics shared by every method and baseline.

One masked mean is used everywhere: ``sum(where(mask, v, 0)) / max(sum(mask), 1)``.
Per-user metrics follow the FAST/CLOVER evaluation code (docs/methods.md §2):
MAE and MSE over the user's query rows, NDCG@3 with gain ``r**2 - 1``, a log2
discount and ties between equal predictions broken in favour of the later row. The gain
must grow with the rating, which ``r**2 - 1`` does only for r >= 0: a query list holding
a rating below 1 (custom or synthetic data) is shifted so that its lowest rating is 1,
gain ``(r + c)**2 - 1`` with ``c = 1 - min(r)``. Lists whose ratings are all >= 1 (every
list of the paper's datasets, ratings 1-5 or 1-10) keep the paper's gain exactly.
Group fairness is ``GF(M) = |mean_{G0} M - mean_{G1} M|`` (paper Eq. 2); with more than
two groups it is ``max_g - min_g`` of the group means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NDCG_K = 3


def masked_mean(values: jax.Array, mask: jax.Array, axis=-1) -> jax.Array:
  """Mean of ``values`` over the rows where ``mask`` is true (0 when none are)."""
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_mse(pred: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean squared error over the masked rows of the last axis. pred, y, mask: [..., L]."""
  return masked_mean(jnp.square(pred - y), mask)


def masked_mae(pred: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean absolute error over the masked rows of the last axis. pred, y, mask: [..., L]."""
  return masked_mean(jnp.abs(pred - y), mask)


def ndcg_at_k(pred: jax.Array, y: jax.Array, k: int = NDCG_K) -> jax.Array:
  """NDCG@k of one ranked list, as in the FAST/CLOVER code.

  Args:
    pred: float[Q] predicted ratings of the query items.
    y: float[Q] true ratings.
  The gain is ``(r + c)**2 - 1`` with ``c = max(0, 1 - min(y))``: the paper's ``r**2 - 1``
  when every rating is >= 1, otherwise shifted so that the lowest rating gains 0 and the
  gain grows with the rating (see the module docstring).

  Returns:
    scalar; NaN when the ideal DCG is 0 (every rating 1, or every rating equal when the
    list is shifted), which the aggregation helpers skip.
  """
  q = pred.shape[-1]
  # lax.top_k puts the lower index first among equals; reversing the list makes the
  # later row win a tie, which is what the reference implementation does.
  _, rev_idx = jax.lax.top_k(pred[::-1], k)
  top = (q - 1) - rev_idx
  discount = 1.0 / jnp.log2(jnp.arange(2, k + 2, dtype=pred.dtype))
  shift = jnp.maximum(0.0, 1.0 - jnp.min(y))
  gain = lambda r: jnp.square(r + shift) - 1.0
  dcg = jnp.sum(gain(y[top]) * discount)
  ideal = jnp.sort(y)[::-1][:k]
  idcg = jnp.sum(gain(ideal) * discount)
  return jnp.where(idcg > 0, dcg / jnp.where(idcg > 0, idcg, 1.0), jnp.nan)


def user_metrics(pred_q: jax.Array, y_q: jax.Array) -> dict[str, jax.Array]:
  """Per-user metrics on fixed-size query sets. pred_q, y_q: float[U, Q] -> each float[U]."""
  err = pred_q - y_q
  return {
      "mae": jnp.mean(jnp.abs(err), axis=-1),
      "mse": jnp.mean(jnp.square(err), axis=-1),
      "ndcg3": jax.vmap(ndcg_at_k)(pred_q, y_q),
  }


METRIC_KEYS = ("mae", "mse", "ndcg3")


def group_report(per_user: dict[str, np.ndarray], group: np.ndarray,
                 num_groups: int, *, names: list[str] | None = None) -> dict:
  """Overall, per-group and GF values of per-user metrics (host side, NumPy).

  Args:
    per_user: metric name -> float[U].
    group: int[U] group of each user.
    num_groups: G; groups without users report n = 0 and NaN means.
    names: the G group names (``meta["sensitive"]["groups"]``), kept as each group's
      ``"name"`` beside its numbers; None: no names.
  Returns:
    ``{"mae": .., "mse": .., "ndcg3": .., "gf_mae": .., "gf_mse": .., "gf_ndcg3": ..,
    "group": {"0": {"n": .., "mae": .., ..., "name": ..}, ...}}``.
  """
  group = np.asarray(group)
  report: dict = {}
  groups: dict = {str(g): {"n": int(np.sum(group == g))} for g in range(num_groups)}
  for name, values in per_user.items():
    values = np.asarray(values, dtype=np.float64)
    report[name] = _nanmean(values)
    means = []
    for g in range(num_groups):
      m = _nanmean(values[group == g])
      groups[str(g)][name] = m
      if not np.isnan(m):
        means.append(m)
    report[f"gf_{name}"] = float(max(means) - min(means)) if len(means) >= 2 else float("nan")
  if names is not None:
    for g in range(num_groups):
      groups[str(g)]["name"] = str(names[g])
  report["group"] = groups
  return report


def _nanmean(values: np.ndarray) -> float:
  values = values[~np.isnan(values)]
  return float(values.mean()) if values.size else float("nan")
