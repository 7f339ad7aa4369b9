"""Plots of the drivers (matplotlib, Agg backend): grouped bars, sweeps, p over
training, and the fairness-utility scatter.

    python experiments/plots.py scatter results/table2.csv results/scatter.png
    python experiments/plots.py p RUN_DIR [RUN_DIR ...] --out results/p.png
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

LABELS = {"mae": "MAE", "mse": "MSE", "gf_mae": "GF(MAE)", "gf_mse": "GF(MSE)"}


def grouped_bars(rows, metrics, *, group_keys, bar_key, path, title=""):
  """One panel per metric; bars per ``bar_key`` inside groups of ``group_keys``."""
  groups = sorted({tuple(r[k] for k in group_keys) for r in rows})
  bars = list(dict.fromkeys(r[bar_key] for r in rows))
  fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6), squeeze=False)
  width = 0.8 / max(len(bars), 1)
  for ax, m in zip(axes[0], metrics):
    for i, b in enumerate(bars):
      vals, errs = [], []
      for g in groups:
        r = next((r for r in rows if tuple(r[k] for k in group_keys) == g and r[bar_key] == b),
                 None)
        vals.append(r[m] if r else np.nan)
        errs.append(r[m + "_std"] if r else 0)
      ax.bar(np.arange(len(groups)) + i * width, vals, width, yerr=errs, label=b, capsize=2)
    ax.set_xticks(np.arange(len(groups)) + width * (len(bars) - 1) / 2)
    ax.set_xticklabels(["\n".join(g) for g in groups], fontsize=8)
    ax.set_title(LABELS.get(m, m))
  axes[0][0].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def sweeps(rows, path, reference=None, dataset="Book-Crossing"):
  """MAE and GF(MAE) against gamma and tau, one line per backbone; ``reference``
  ({backbone: {"mae", "gf_mae"}}, e.g. Origin over the same seeds) is a dashed line."""
  fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), squeeze=False)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for col, swept in enumerate(("gamma", "tau")):
    for row, m in enumerate(("mae", "gf_mae")):
      ax = axes[row][col]
      for i, backbone in enumerate(sorted({r["backbone"] for r in rows})):
        pts = sorted((r["value"], r[m], r[m + "_std"]) for r in rows
                     if r["swept"] == swept and r["backbone"] == backbone)
        if pts:
          x, y, e = map(np.array, zip(*pts))
          ax.errorbar(x, y, yerr=e, marker="o", capsize=2, label=backbone,
                      color=colors[i % len(colors)])
        if reference and backbone in reference:
          ax.axhline(reference[backbone][m], ls="--", lw=1, color=colors[i % len(colors)],
                     label=f"{backbone} Origin, same seeds")
      ax.set_xscale("log")
      ax.set_xlabel(swept)
      ax.set_ylabel(LABELS[m])
      ax.legend(fontsize=8)
  seeds = sorted({int(r["seeds"]) for r in rows})
  fig.suptitle(f"FAST sensitivity ({dataset}; {'/'.join(map(str, seeds))} "
               f"seed{'s' if seeds != [1] else ''} per point)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def p_trajectories(run_dirs, path, seed: int | None = None):
  """p[0] and the per-group losses per epoch (first seed of each run) from metrics.jsonl."""
  fig, (ax_p, ax_l) = plt.subplots(1, 2, figsize=(10, 3.6))
  for d in run_dirs:
    d = pathlib.Path(d)
    recs = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    first = seed if seed is not None else recs[0]["seed"]
    recs = [r for r in recs if r["seed"] == first]
    ep = [r["epoch"] for r in recs]
    name = "/".join(d.parts[-2:])
    ax_p.plot(ep, [r["p"][0] for r in recs], label=name)
    losses = np.array([r["group_loss"] for r in recs])
    for g in range(losses.shape[1]):
      ax_l.plot(ep, losses[:, g], ls="-" if g == 0 else "--", label=f"{name} G{g}")
  ax_p.set_xlabel("epoch"), ax_p.set_ylabel("p[0] = P(sample group 0)")
  ax_l.set_xlabel("epoch"), ax_l.set_ylabel("group loss")
  ax_l.set_yscale("log")
  ax_p.legend(fontsize=7), ax_l.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def scatter(rows, path):
  """Fairness-utility trade-off: GF(MAE) against MAE, one panel per dataset."""
  datasets = list(dict.fromkeys(r["dataset"] for r in rows))
  fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
  for ax, d in zip(axes[0], datasets):
    for r in (r for r in rows if r["dataset"] == d):
      ax.errorbar(r["mae"], r["gf_mae"], xerr=r["mae_std"], yerr=r["gf_mae_std"], fmt="o",
                  capsize=2)
      ax.annotate(r["row"] or r["label"], (r["mae"], r["gf_mae"]), fontsize=7)
    ax.set_xlabel("MAE"), ax.set_ylabel("GF(MAE)"), ax.set_title(d)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  s = sub.add_parser("scatter")
  s.add_argument("csv"), s.add_argument("png")
  q = sub.add_parser("p")
  q.add_argument("runs", nargs="+"), q.add_argument("--out", required=True)
  args = p.parse_args(argv)
  if args.cmd == "scatter":
    import pandas as pd
    scatter(pd.read_csv(args.csv).fillna("").to_dict("records"), args.png)
  else:
    p_trajectories(args.runs, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
