"""The validated-protocol sweep picks by validation MAE, never by test."""

import json

import pytest

from fast_jax.cli import tune
from fast_jax.cli.grid import Run
from fast_jax.config import Config

# (inner lr, per-seed last-epoch validation MAE, test MAE): the best on test is not the
# best on validation.
POINTS = [(1e-4, [0.95, 0.97], 0.90), (1e-2, [0.90, 0.92], 0.93), (3e-2, [0.91, 0.91], 0.85)]


def _fake_run(root, lr, valid, test_mae, seeds=2):
  """A finished point with ``len(valid)`` seeds, of a stage that asked for ``seeds``."""
  cfg = Config(dataset="ml100k", backbone="melu", method="origin", inner_lr=lr, seeds=seeds)
  run = Run(name=f"ml100k/melu-ilr{lr:g}", cfg=cfg)
  folder = root / run.name
  folder.mkdir(parents=True)
  lines, per_seed = [], []
  for seed, last in zip((1024, 3145, 123), valid):
    for epoch, mae in ((1, 0.5), (2, last)):  # epoch 1 lower: "last" must not use it
      lines.append(json.dumps({"seed": seed, "epoch": epoch, "valid": {"mae": mae}}))
    per_seed.append({"seed": seed, "mae": test_mae, "mse": 1.0, "gf_mae": 0.1})
  (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  return run, {"per_seed": per_seed}


def test_the_sweep_picks_the_lowest_validation_mae_not_the_lowest_test_mae(tmp_path):
  runs, results = [], {}
  for lr, valid, test_mae in POINTS:
    run, res = _fake_run(tmp_path, lr, valid, test_mae)
    runs.append(run)
    results[run.name] = res
  rows = tune.summarize(runs, tmp_path, results)
  assert [r["valid_mae"] for r in rows] == pytest.approx([0.96, 0.91, 0.91])
  [best] = tune.pick(rows)
  assert best["inner_lr"] == 1e-2  # lowest validation MAE (first of the tie), not 3e-2
  assert min(rows, key=lambda r: r["test_mae"])["inner_lr"] == 3e-2


def test_best_valid_runs_are_judged_at_their_best_epoch(tmp_path):
  run, _ = _fake_run(tmp_path, 1e-3, [0.9, 0.8], 0.9)
  assert tune.validation_maes(tmp_path / run.name, "best-valid") == [0.5, 0.5]
  assert tune.validation_maes(tmp_path / run.name, "last") == [0.9, 0.8]


def test_the_grid_covers_the_issues_settings_for_each_backbone():
  runs = tune.make_runs(["ml100k"], ["melu", "metacs"], seeds=3, epochs=None, data_dir=None)
  melu = [r.cfg for r in runs if r.cfg.backbone == "melu"]
  metacs = [r.cfg for r in runs if r.cfg.backbone == "metacs"]
  assert len(melu) == 5 * 2 * 2 and len(metacs) == 3 * 5 * 2 * 2
  assert {c.inner_lr for c in melu} == set(tune.INNER_LRS)
  assert {c.lr for c in metacs} == {1e-5, 1e-4, 1e-3}
  assert all(c.method == "origin" and c.seeds == 3 and not c.attack for c in melu + metacs)
  assert len({r.name for r in runs}) == len(runs)


def test_a_clover_sweep_trains_clover_and_is_picked_apart_from_origin():
  clover = tune.make_runs(["bookcrossing"], ["melu"], seeds=1, epochs=None, data_dir=None,
                          grid={"inner_lr": [3e-3, 3e-2]}, method="clover")
  origin = tune.make_runs(["bookcrossing"], ["melu"], seeds=1, epochs=None, data_dir=None,
                          grid={"inner_lr": [3e-3, 3e-2]})
  assert len(clover) == 2 * 2 * 2 and all(r.cfg.method == "clover" for r in clover)
  assert all(r.row == "melu-clover" and "-clover-" in r.name for r in clover)
  assert not {r.name for r in clover} & {r.name for r in origin}  # own run folders
  rows = [{"dataset": "bookcrossing", "backbone": "melu", "method": m, "inner_lr": lr,
           "valid_mae": v} for m, lr, v in (("origin", 3e-3, 1.29), ("origin", 3e-2, 1.30),
                                            ("clover", 3e-3, 1.48), ("clover", 3e-2, 1.29))]
  best = {r["method"]: r["inner_lr"] for r in tune.pick(rows)}
  assert best == {"origin": 3e-3, "clover": 3e-2}


def test_a_second_stage_keeps_the_best_points_of_the_screen_by_validation():
  rows = [{"dataset": "ml100k", "backbone": "metacs", "name": n, "valid_mae": v,
           "test_mae": t} for n, v, t in (("a", 0.90, 0.99), ("b", 0.85, 0.80), ("c", 0.88, 0.70),
                                          ("d", 0.95, 0.60))]
  rows.append({"dataset": "ml100k", "backbone": "melu", "name": "e", "valid_mae": 0.99,
               "test_mae": 0.5})
  assert tune.top_points(rows, 2) == {"b", "c", "e"}


def test_the_grid_can_be_restricted_to_some_values():
  runs = tune.make_runs(["ml100k"], ["metacs"], seeds=1, epochs=None, data_dir=None,
                        grid={"lr": [1e-3], "inner_steps": [3]})
  assert len(runs) == 5 * 2 and {(r.cfg.lr, r.cfg.inner_steps) for r in runs} == {(1e-3, 3)}


def test_a_screened_point_reads_as_screened_after_a_second_stage_added_seeds(tmp_path):
  """Re-collecting a 1-seed screen must not mix in the seeds a second stage added."""
  run, res = _fake_run(tmp_path, 1e-2, [0.80, 0.90, 1.00], 0.9, seeds=1)
  res["per_seed"][1]["mae"] = 2.0
  [row] = tune.summarize([run], tmp_path, {run.name: res})
  assert (row["seeds"], row["valid_mae"], row["test_mae"]) == (1, 0.80, 0.9)
