"""Adaptation diagnostics: does the inner loop personalise at all?

A meta-learner whose inner step barely moves a prediction is a plain feature regressor,
and a fairness comparison between such models says nothing about meta-learning. Every
run therefore reports, next to its metrics, how far adaptation moved the predictions
(on the query rows of the users it scores):

* ``shift``: mean over query rows of ``|y_hat - y_hat_0|``, with ``y_hat`` the adapted
  and ``y_hat_0`` the unadapted prediction (the meta-parameters before the inner loop).
* ``closed``: the share of the distance from the unadapted predictions to the user's
  support mean ``m_u`` (the mean rating of the support rows the inner loop saw) that
  adaptation closes. Per user, with ``a_r``, ``b_r`` the unadapted and adapted
  predictions of query row ``r``::

      closed_u = clip( sum_r sign(m_u - a_r) (b_r - a_r)  /  sum_r |m_u - a_r| , 0, 1)

  a movement towards ``m_u`` counts, one away from it is clipped at 0, and overshooting
  it is clipped at 1. Users with ``sum_r |m_u - a_r| = 0`` (already at their support
  mean) have no share and are left out of the mean.
* ``mae_unadapted``: the MAE of ``y_hat_0`` (the test MAE with the inner loop switched
  off), to read beside the MAE of ``y_hat``.

``closed`` near 0 means the model ignores the user's support set; a model that moved
every prediction onto the support mean would score 1.
"""

from __future__ import annotations

import numpy as np

ADAPTATION_KEYS = ("shift", "closed", "mae_unadapted")


def adaptation_per_user(pred: np.ndarray, pred0: np.ndarray, y: np.ndarray,
                        support_mean: np.ndarray) -> dict[str, np.ndarray]:
  """Per-user adaptation diagnostics.

  Args:
    pred: float[U, Q] adapted query predictions.
    pred0: float[U, Q] unadapted query predictions.
    y: float[U, Q] query ratings.
    support_mean: float[U] mean support rating of each user.
  Returns:
    ``{"shift", "closed", "mae_unadapted"}``, each float[U]; ``closed`` is NaN for a
    user already at its support mean.
  """
  pred, pred0, y = (np.asarray(a, np.float64) for a in (pred, pred0, y))
  gap = np.asarray(support_mean, np.float64)[:, None] - pred0
  distance = np.abs(gap).sum(-1)
  towards = (np.sign(gap) * (pred - pred0)).sum(-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    closed = np.where(distance > 0, np.clip(towards / distance, 0.0, 1.0), np.nan)
  return {"shift": np.abs(pred - pred0).mean(-1), "closed": closed,
          "mae_unadapted": np.abs(pred0 - y).mean(-1)}


def summarize(per_user: dict[str, np.ndarray]) -> dict[str, float]:
  """Means over users (NaN users skipped) of :func:`adaptation_per_user`'s values."""
  out = {}
  for key in ADAPTATION_KEYS:
    values = np.asarray(per_user[key], np.float64)
    values = values[~np.isnan(values)]
    out[key] = float(values.mean()) if values.size else float("nan")
  return out


def support_means(y: np.ndarray, length: np.ndarray, query_size: int) -> np.ndarray:
  """Mean rating of each user's evaluation support rows (all valid rows before the last
  ``query_size``). y: float[U, L]; length: int[U] -> float[U]."""
  y = np.asarray(y, np.float64)
  n = np.asarray(length) - query_size
  support = np.arange(y.shape[1])[None, :] < n[:, None]
  return (y * support).sum(-1) / np.maximum(n, 1)


def format_line(summary: dict[str, float], mae: float | None = None) -> str:
  """One line for a run summary: is meta-learning doing anything?"""
  line = (f"adaptation: shift {summary['shift']:.4f}, closes {100 * summary['closed']:.0f}% "
          f"of the gap to the support mean, MAE unadapted {summary['mae_unadapted']:.4f}")
  if mae is not None:
    line += f" (adapted {mae:.4f})"
  return line
