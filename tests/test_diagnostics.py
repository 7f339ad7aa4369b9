"""Adaptation diagnostics on hand-built cases with known shift and closed share."""

import numpy as np
import pytest

from fast_jax import diagnostics

# (name, pred, pred0, y, support_mean, expected shift, closed, mae_unadapted) per user.
CASES = [
    # support mean 4, unadapted 3 everywhere, adapted 3.5: half the gap closed.
    ("half", [[3.5, 3.5]], [[3.0, 3.0]], [[4.0, 5.0]], [4.0], [0.5], [0.5], [1.5]),
    # moves away from the support mean: clipped at 0.
    ("away", [[2.0, 2.0]], [[3.0, 3.0]], [[3.0, 3.0]], [4.0], [1.0], [0.0], [0.0]),
    # overshoots it: clipped at 1.
    ("overshoot", [[5.0, 5.0]], [[3.0, 3.0]], [[3.0, 3.0]], [4.0], [2.0], [1.0], [0.0]),
    # rows on both sides of the mean: distance 1 + 1, movement towards it 0.5 + 0.5.
    ("both sides", [[3.5, 4.5]], [[3.0, 5.0]], [[3.0, 5.0]], [4.0], [0.5], [0.5], [0.0]),
    # already at the support mean: no share (NaN, left out of the mean).
    ("at mean", [[4.2, 4.2]], [[4.0, 4.0]], [[4.0, 4.0]], [4.0], [0.2], [np.nan], [0.0]),
]


@pytest.mark.parametrize("name,pred,pred0,y,m,shift,closed,mae0", CASES,
                         ids=[c[0] for c in CASES])
def test_adaptation_per_user_matches_hand_computed_values(name, pred, pred0, y, m, shift,
                                                          closed, mae0):
  out = diagnostics.adaptation_per_user(np.array(pred), np.array(pred0), np.array(y),
                                        np.array(m))
  np.testing.assert_allclose(out["shift"], shift)
  np.testing.assert_allclose(out["closed"], closed)
  np.testing.assert_allclose(out["mae_unadapted"], mae0)


def test_summary_averages_users_and_skips_users_without_a_share():
  pred = np.array([c[1][0] for c in CASES])
  pred0 = np.array([c[2][0] for c in CASES])
  y = np.array([c[3][0] for c in CASES])
  m = np.array([c[4][0] for c in CASES])
  s = diagnostics.summarize(diagnostics.adaptation_per_user(pred, pred0, y, m))
  assert s["shift"] == pytest.approx(np.mean([0.5, 1.0, 2.0, 0.5, 0.2]))
  assert s["closed"] == pytest.approx(np.mean([0.5, 0.0, 1.0, 0.5]))
  assert s["mae_unadapted"] == pytest.approx(1.5 / 5)
  assert "closes 50%" in diagnostics.format_line(s)


def test_support_means_use_the_rows_before_the_last_query():
  y = np.array([[1.0, 2.0, 3.0, 5.0, 5.0, 0.0], [4.0, 4.0, 2.0, 2.0, 0.0, 0.0]])
  np.testing.assert_allclose(diagnostics.support_means(y, np.array([5, 4]), 2), [2.0, 4.0])
