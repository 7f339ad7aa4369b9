"""The FAST paper's Table 2: every method on ML-1M, Book-Crossing and ML-100K.

    python experiments/table2.py --data-dir ../shared/data            # everything, 5 seeds
    python experiments/table2.py --datasets ml100k --rows melu-fast melu-origin
    python experiments/table2.py --collect-only                        # tables from finished runs

Rows: the cold-start baselines, MeLU and MetaCS each with Origin, Reg, IPW, CLOVER and
FAST, and the reference predictors. Runs go to ``--root`` (default ``results/runs``),
one folder per (row, dataset), and are resumable. Writes ``results/table2.md`` and
``results/table2.csv``: our mean ± std beside the paper's value and the difference, with
the best (**bold**) and runner-up (_italic_) of each column marked per backbone, as the
paper does, and ``results/table2_scatter.png``: GF(MAE) against MAE for every row.
"""

from __future__ import annotations

import argparse
import sys

from fast_jax.cli.grid import (METRICS, PAPER_DATASETS, Run, add_grid_args, parse_grid_args,
                               provenance, run_and_collect)

from fast_jax import files
from fast_jax.cli import one_line_errors, plots

from fast_jax.config import BASELINES, Config

BASELINE_ROWS = BASELINES  # the cold-start baselines, then the reference predictors
META_ROWS = tuple(f"{b}-{m}" for b in ("melu", "metacs")
                  for m in ("origin", "reg", "ipw", "clover", "fast"))
ROWS = BASELINE_ROWS + META_ROWS


def make_runs(datasets, rows, *, seeds: int, epochs: int | None, data_dir: str | None,
              p_update: str, preset: str = "validated") -> list[Run]:
  runs = []
  for dataset in datasets:
    for row in rows:
      kw = dict(dataset=dataset, seeds=seeds, data_dir=data_dir)
      if epochs is not None:
        kw["epochs"] = epochs
      if row in BASELINE_ROWS:
        cfg = Config(method=row, **kw)
      else:
        backbone, method = row.split("-", 1)
        cfg = Config(backbone=backbone, method=method, p_update=p_update, preset=preset, **kw)
      # FAST runs carry their mode in the folder name (shared with figure3.py).
      name = f"{dataset}/{row}" + (f"-{p_update}" if row.endswith("-fast") else "")
      runs.append(Run(name=name, cfg=cfg, row=row))
  return runs


def markdown(rows: list[dict], datasets) -> str:
  """One table per dataset: ours ± std, paper, difference; best/runner-up per backbone."""
  out = []
  for dataset in datasets:
    part = [r for r in rows if r["dataset"] == dataset]
    if not part:
      continue
    marks = _marks(part)
    out.append(f"\n### {dataset}\n")
    out.append("| method | seeds | " + " | ".join(
        f"{m.upper().replace('GF_', 'GF(') + (')' if m.startswith('gf') else '')} (paper, Δ)"
        for m in METRICS) + " |")
    out.append("|---|---|" + "---|" * len(METRICS))
    for r in part:
      cells = []
      for m in METRICS:
        ours = f"{r[m]:.3f} ± {r[m + '_std']:.3f}"
        mark = marks.get((r["name"], m), "")
        ours = f"**{ours}**" if mark == "best" else f"_{ours}_" if mark == "second" else ours
        paper = r[m + "_paper"]
        ref = "—" if paper != paper else f"{paper:.3f}, {r[m] - paper:+.3f}"
        cells.append(f"{ours} ({ref})")
      out.append(f"| {r['row']} | {r['seeds']} | " + " | ".join(cells) + " |")
    out.extend(_paired_table(part))
  return "\n".join(out) + "\n"


def _paired_table(rows: list[dict]) -> list[str]:
  """Per-group MAE of every row and, for each fairness method, its change against the
  same backbone's Origin seed by seed (:func:`fast_jax.cli.grid.paired_vs_origin`)."""
  groups = sorted(k[1:-4] for k in rows[0] if k.startswith("g") and k.endswith("_mae")
                  and k[1:-4].isdigit())
  if not groups:
    return []
  names = " / ".join(f"G{g}" for g in groups)
  out = [f"\nPer group, and against Origin seed by seed (mean ± std of the per-seed "
         f"difference; on how many seeds it is lower). *Levelling down*: GF(MAE) fell, "
         f"mostly because the group Origin serves better got worse (its MAE rose by more "
         f"than the other group's fell).\n",
         f"| method | MAE {names} | Δ MAE | Δ GF(MAE) | Δ MAE {names} | |",
         "|---|---|---|---|---|---|"]
  for r in rows:
    per_group = " / ".join(f"{r.get(f'g{g}_mae', float('nan')):.3f}" for g in groups)
    if "mae_vs_origin" in r and r["mae_vs_origin"] == r["mae_vs_origin"]:
      n = r["seeds"]
      d_mae = f"{r['mae_vs_origin']:+.3f} ± {r['mae_vs_origin_std']:.3f} ({r['seeds_lower_mae']}/{n})"
      d_gf = (f"{r['gf_mae_vs_origin']:+.3f} ± {r['gf_mae_vs_origin_std']:.3f} "
              f"({r['seeds_fairer']}/{n})")
      d_groups = " / ".join(f"{r.get(f'g{g}_mae_vs_origin', float('nan')):+.3f}" for g in groups)
      mark = "levelling down" if r.get("levelling_down") is True else ""
    else:
      d_mae = d_gf = d_groups = mark = ""
    out.append(f"| {r['row']} | {per_group} | {d_mae} | {d_gf} | {d_groups} | {mark} |")
  return out


def _marks(rows: list[dict]) -> dict:
  """Best and runner-up of each metric among the rows of each backbone (lower is better)."""
  marks = {}
  for backbone in ("melu", "metacs"):
    group = [r for r in rows if r["row"].startswith(backbone + "-")]
    for m in METRICS:
      ranked = sorted(group, key=lambda r: r[m])
      for r, mark in zip(ranked, ("best", "second")):
        marks[(r["name"], m)] = mark
  return marks


@one_line_errors
def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--datasets", nargs="+", default=list(PAPER_DATASETS))
  p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
  add_grid_args(p, out_name="table2")
  args = parse_grid_args(p, argv)
  runs = make_runs(args.datasets, args.rows, seeds=args.seeds, epochs=args.epochs,
                   data_dir=args.data_dir, p_update=args.p_update, preset=args.preset)
  rows = run_and_collect(runs, args)
  text = (f"# Table 2 reproduction\n\n{provenance(sys.argv)}\n\n"
          "Ours: mean ± population std over seeds; in brackets the paper's mean and our "
          "difference. **Bold** / _italic_: best / runner-up per backbone.\n"
          + markdown(rows, args.datasets))
  files.write_text_atomic(args.out.with_suffix(".md"), text)
  if rows:  # the fairness-utility trade-off of every row, one panel per dataset
    plots.scatter(rows, args.out.parent / f"{args.out.name}_scatter.png",
                  note=f"FAST in {args.p_update} mode")
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
