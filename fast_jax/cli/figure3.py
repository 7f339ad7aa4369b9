"""The FAST paper's Figure 3: Origin vs Static vs FAST sampling.

    python experiments/figure3.py --data-dir ../shared/data          # ML-1M and Book-Crossing, 5 seeds
    python experiments/figure3.py --datasets ml100k --seeds 2

For each dataset and backbone, trains Origin (uniform batches), Static (group pools
with p = 1/2) and FAST (``--p-update``), and writes ``results/figure3.png`` (MAE, MSE,
GF(MAE), GF(MSE): one row of panels per metric, one column per dataset and backbone,
mean ± seed std)
and the CSV behind it, plus ``results/figure3_p.png``: FAST's p per epoch, one panel per
dataset and backbone, with the seeds' range as a band.
"""

from __future__ import annotations

import argparse
import sys

from fast_jax.cli import one_line_errors
from fast_jax.cli.grid import METRICS, Run, add_grid_args, parse_grid_args, run_and_collect
from fast_jax.cli import plots

from fast_jax.config import Config

STRATEGIES = ("origin", "static", "fast")


def make_runs(datasets, backbones, *, seeds, epochs, data_dir, p_update,
              preset: str = "validated") -> list[Run]:
  runs = []
  for d in datasets:
    for b in backbones:
      for s in STRATEGIES:
        # Static is the FAST code's sampler with p fixed (docs/methods.md §5).
        mode = "epoch" if s == "static" else p_update
        cfg = Config(dataset=d, backbone=b, method=s, p_update=mode, seeds=seeds, preset=preset,
                     data_dir=data_dir, **({"epochs": epochs} if epochs else {}))
        runs.append(Run(name=f"{d}/{b}-{s}" + ("" if s != "fast" else f"-{p_update}"),
                        cfg=cfg, row=f"{b}-{s}", label=s))
  return runs


@one_line_errors
def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--datasets", nargs="+", default=["ml1m", "bookcrossing"])
  p.add_argument("--backbones", nargs="+", default=["melu", "metacs"])
  add_grid_args(p, out_name="figure3")
  args = parse_grid_args(p, argv)
  runs = make_runs(args.datasets, args.backbones, seeds=args.seeds, epochs=args.epochs,
                   data_dir=args.data_dir, p_update=args.p_update, preset=args.preset)
  rows = run_and_collect(runs, args)
  seeds = sorted({int(r["seeds"]) for r in rows})
  plots.grouped_bars(rows, METRICS, panel_keys=("dataset", "backbone"), bar_key="label",
                     path=args.out.with_suffix(".png"),
                     title=f"Origin vs Static vs FAST ({args.p_update} mode): mean \u00b1 std "
                           f"over {'/'.join(map(str, seeds))} seeds; lower is better")
  # FAST's p per dataset (columns) and backbone (rows), as in the bars
  fast = [(r, args.root / r.name) for r in runs if r.label == "fast"]
  fast = [(r, d) for r, d in fast if (d / "metrics.jsonl").exists()]
  fast.sort(key=lambda x: (args.backbones.index(x[0].cfg.backbone),
                           args.datasets.index(x[0].cfg.dataset)))
  if fast:
    ncols = len({r.cfg.dataset for r, _ in fast})
    plots.p_trajectories(
        [d for _, d in fast], args.out.parent / (args.out.name + "_p.png"), ncols=ncols,
        losses=False, titles=[f"{plots._name(plots.DATASET_NAMES, r.cfg.dataset)}, "
                              f"{plots._name(plots.BACKBONE_NAMES, r.cfg.backbone)}"
                              for r, _ in fast],
        title=f"FAST's sampling probability per epoch ({args.p_update} mode)")
  print(f"wrote {args.out.with_suffix('.png')} and {args.out.with_suffix('.csv')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
