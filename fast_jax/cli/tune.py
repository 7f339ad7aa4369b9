"""The validated protocol: choose the meta-learners' inner loop on validation users only.

    fast-jax tune --datasets ml100k --data-dir ../shared/data --jobs 2
    fast-jax tune --datasets ml100k ml1m bookcrossing --backbones melu metacs --seeds 3
    fast-jax tune --collect-only                     # pick from finished runs
    # two stages: every point with 1 seed, then the 4 best per backbone x dataset with 3
    fast-jax tune --datasets ml100k --backbones metacs --seeds 1 --out results/tune_screen
    fast-jax tune --datasets ml100k --backbones metacs --seeds 3 \
        --screen results/tune_screen.csv --top 4 --out results/tune

At the authors' run.sh settings (inner lr 1e-4, one inner step) the inner step barely
moves a prediction, so the meta-learners do not personalise. This driver trains Origin
for every backbone x dataset over a grid of

* the inner learning rate: 1e-4, 1e-3, 3e-3, 1e-2, 3e-2;
* the output bias at initialisation: from the initialiser, or the training mean rating;
* 1 or 3 inner steps;
* for MetaCS also the outer learning rate: 1e-5, 1e-4, 1e-3 (MeLU keeps 1e-4);

with ``--seeds`` seeds (default 3), and picks, per backbone x dataset, the point with the
lowest **validation** MAE (mean over seeds, each seed's validation MAE at the epoch its run
tests: the last one, or the best one with ``--select best-valid``). Test metrics are
written beside it for the record but never used to choose.

``--method clover`` sweeps CLOVER's own inner loop the same way. CLOVER trains a different
loss (cross-entropy over the rating classes, whose gradient is bounded where the squared
error's grows with the error), so Origin's setting can leave its inner loop inert: on
Book-Crossing, MeLU's Origin setting (inner lr 3e-3, 1 step) moves a CLOVER prediction by
0.004 and CLOVER sits at the global mean. A CLOVER sweep's winner goes to
``fast_jax.config.VALIDATED_CLOVER``; CLOVER takes Origin's setting where it has none.

Writes ``<out>.csv`` (every point: settings, validation MAE and its std over seeds, test
MAE, MSE, GF(MAE)) and ``<out>_best.csv`` (the chosen point per backbone x dataset). Runs go
to ``--root`` (default ``runs/tune``: hundreds of run folders, not meant to be committed)
and resume like every grid driver's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys

import numpy as np

from fast_jax.cli import one_line_errors
from fast_jax.cli.grid import Run, collect_finished, run_grid, write_csv
from fast_jax.config import Config, UsageError, seed_list

INNER_LRS = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2)
OUT_BIASES = ("init", "mean")
INNER_STEPS = (1, 3)
OUTER_LRS = {"melu": (1e-4,), "metacs": (1e-5, 1e-4, 1e-3)}
SETTINGS = ("lr", "inner_lr", "out_bias", "inner_steps")


def make_runs(datasets, backbones, *, seeds: int, epochs: int | None,
              data_dir: str | None, grid: dict | None = None,
              method: str = "origin") -> list[Run]:
  """``method`` (Origin, or CLOVER) at every point of the grid (module docstring), per
  backbone and dataset; ``grid`` restricts a setting to some of its values
  ({"inner_lr": (1e-2, 3e-2)}, ...)."""
  grid = grid or {}
  runs = []
  for dataset, backbone in itertools.product(datasets, backbones):
    values = [grid.get("lr") or OUTER_LRS[backbone], grid.get("inner_lr") or INNER_LRS,
              grid.get("out_bias") or OUT_BIASES, grid.get("inner_steps") or INNER_STEPS]
    for lr, inner_lr, out_bias, steps in itertools.product(*values):
      kw = dict(epochs=epochs) if epochs is not None else {}
      cfg = Config(dataset=dataset, backbone=backbone, method=method, seeds=seeds,
                   data_dir=data_dir, lr=lr, inner_lr=inner_lr, out_bias=out_bias,
                   inner_steps=steps, attack=False, **kw)
      tag = "" if method == "origin" else f"-{method}"
      name = f"{dataset}/{backbone}{tag}-lr{lr:g}-ilr{inner_lr:g}-{out_bias}-k{steps}"
      runs.append(Run(name=name, cfg=cfg, row=f"{backbone}-{method}"))
  return runs


def validation_maes(folder: pathlib.Path, select: str,
                    seeds: set[int] | None = None) -> list[float]:
  """Each seed's validation MAE at the epoch its run tests (``select``: "last" or
  "best-valid"), read from the run's ``metrics.jsonl``; only ``seeds`` if given."""
  by_seed: dict[int, list[tuple[int, float]]] = {}
  for line in (folder / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if seeds is None or record["seed"] in seeds:
      by_seed.setdefault(record["seed"], []).append((record["epoch"], record["valid"]["mae"]))
  out = []
  for records in by_seed.values():
    maes = [mae for _, mae in sorted(records)]
    out.append(min(maes) if select == "best-valid" else maes[-1])
  return out


def summarize(runs: list[Run], root: pathlib.Path, results: dict[str, dict]) -> list[dict]:
  """One row per finished point: its settings, validation and test metrics, over the
  stage's seeds only (``run.cfg.seeds``: a screen's point that a second stage has since
  given more seeds still reads as it was screened)."""
  rows = []
  for run in runs:
    if run.name not in results:
      continue
    seeds = set(seed_list(run.cfg.seeds))
    valid = validation_maes(root / run.name, run.cfg.select, seeds)
    test = [s for s in results[run.name]["per_seed"] if s["seed"] in seeds]
    rows.append({"dataset": run.cfg.dataset, "backbone": run.cfg.backbone,
                 "method": run.cfg.method, **{k: getattr(run.cfg, k) for k in SETTINGS},
                 "seeds": len(valid),
                 "valid_mae": float(np.mean(valid)), "valid_mae_std": float(np.std(valid)),
                 **{f"test_{k}": float(np.mean([s[k] for s in test]))
                    for k in ("mae", "mse", "gf_mae")},
                 "name": run.name})
  return rows


def pick(rows: list[dict]) -> list[dict]:
  """Per (dataset, backbone, method), the row with the lowest validation MAE (the first
  such row on a tie). Test metrics play no part."""
  best: dict[tuple, dict] = {}
  for row in rows:
    key = (row["dataset"], row["backbone"], row["method"])
    if key not in best or row["valid_mae"] < best[key]["valid_mae"]:
      best[key] = row
  return list(best.values())


def top_points(rows: list[dict], k: int) -> set[str]:
  """The names of the ``k`` points with the lowest validation MAE per (dataset,
  backbone, method) among ``rows`` (a screening stage's CSV; one written before CLOVER
  sweeps existed has no method column and is Origin's)."""
  group = lambda r: (r["dataset"], r["backbone"], r.get("method", "origin"))
  keep = set()
  for key in {group(r) for r in rows}:
    part = sorted((r for r in rows if group(r) == key),
                  key=lambda r: float(r["valid_mae"]))
    keep |= {r["name"] for r in part[:k]}
  return keep


@one_line_errors
def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="fast-jax tune", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--datasets", nargs="+", default=["ml100k", "ml1m", "bookcrossing"])
  p.add_argument("--backbones", nargs="+", default=["melu", "metacs"],
                 choices=tuple(OUTER_LRS))
  p.add_argument("--method", choices=("origin", "clover"), default="origin",
                 help="whose inner loop to choose (default origin; see above for clover)")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--epochs", type=int, default=None, help="default: a run's own (50)")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--root", type=pathlib.Path, default=pathlib.Path("runs") / "tune")
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results") / "tune")
  p.add_argument("--collect-only", action="store_true", help="only pick from finished runs")
  p.add_argument("--outer-lrs", nargs="+", type=float, default=None,
                 help="only these outer lrs (default: 1e-4 for MeLU, 1e-5 1e-4 1e-3 for MetaCS)")
  p.add_argument("--inner-lrs", nargs="+", type=float, default=None,
                 help=f"only these inner lrs (default: {' '.join(map(str, INNER_LRS))})")
  p.add_argument("--out-biases", nargs="+", choices=OUT_BIASES, default=None)
  p.add_argument("--inner-steps", nargs="+", type=int, default=None)
  p.add_argument("--top", type=int, default=None, metavar="K",
                 help="with --screen: only the K points of lowest validation MAE per backbone "
                      "x dataset in that CSV (a second stage with more --seeds; finished "
                      "seeds are kept)")
  p.add_argument("--screen", type=pathlib.Path, default=None,
                 help="a first stage's <out>.csv (see --top)")
  p.add_argument("--jobs", type=int, default=1, help="runs training at once")
  p.add_argument("--no-vmap", dest="vmap", action="store_false",
                 help="train every point on its own (default: the inner lrs of a point and "
                      "its seeds train as lanes of one vectorised program)")
  args = p.parse_args(argv)
  if args.seeds < 1 or args.jobs < 1:
    p.error("--seeds and --jobs must be at least 1")
  if (args.top is None) != (args.screen is None):
    p.error("--top and --screen go together")
  grid = {"lr": args.outer_lrs, "inner_lr": args.inner_lrs, "out_bias": args.out_biases,
          "inner_steps": args.inner_steps}
  runs = make_runs(args.datasets, args.backbones, seeds=args.seeds, epochs=args.epochs,
                   data_dir=args.data_dir, grid=grid, method=args.method)
  if args.screen is not None:
    import pandas as pd
    if not args.screen.is_file():
      raise UsageError(f"--screen {args.screen}: no such file")
    try:
      screened = pd.read_csv(args.screen)
    except (OSError, ValueError) as e:
      raise UsageError(f"--screen {args.screen}: cannot read it as a CSV "
                       f"({str(e).strip()})") from None
    missing = {"name", "dataset", "backbone", "valid_mae"} - set(screened.columns)
    if missing:
      raise UsageError(f"--screen {args.screen}: no column {', '.join(sorted(missing))} "
                       f"(expected the CSV of a screening stage, {{--out}}.csv)")
    keep = top_points(screened.to_dict("records"), args.top)
    runs = [r for r in runs if r.name in keep]
    if not runs:
      raise UsageError(f"--screen {args.screen}: none of its points is a run of this grid "
                       f"(other --datasets, --backbones or --method?)")
  results = (collect_finished(runs, args.root) if args.collect_only
             else run_grid(runs, args.root, vmap=args.vmap, jobs=args.jobs))
  rows = summarize(runs, args.root, results)
  best = pick(rows)
  write_csv(rows, args.out.with_suffix(".csv"))
  write_csv(best, args.out.parent / f"{args.out.name}_best.csv")
  for row in best:
    print(f"{row['dataset']} {row['backbone']} {row['method']}: "
          + ", ".join(f"{k} {row[k]}" for k in SETTINGS)
          + f" -> valid MAE {row['valid_mae']:.4f} ± {row['valid_mae_std']:.4f} "
            f"(test MAE {row['test_mae']:.4f}) of {len(rows)} points")
  return 0


if __name__ == "__main__":
  sys.exit(main())
