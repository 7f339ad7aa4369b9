"""The FAST paper's Figure 4: sensitivity of FAST to gamma and tau on Book-Crossing.

    python experiments/figure4.py --data-dir ../shared/data
    python experiments/figure4.py --backbones melu --seeds 2 --gammas 0.5 2 --taus 0.1
    python experiments/figure4.py --vmap     # each backbone's whole sweep as one program
    python experiments/figure4.py --p-average   # the same grid with a p that converges

gamma sweeps with tau at the paper's Table 3 value and tau sweeps with gamma at its
Table 3 value, for each backbone. Writes ``results/figure4.png`` (MAE, GF(MAE) and the
range of p0 over the last 10 epochs against the swept value) and ``results/figure4.csv``,
whose ``*_vs_origin`` columns compare each point with Origin (Table 2's run) seed by
seed, and whose ``p0_last10`` and ``p0_swing_last10`` say where FAST's sampling
probability of the first group ended and how far it still moved: over the last 10
epochs, the mean of ``p[0]`` and its range (max - min), each averaged over the point's
seeds.

``--p-average`` runs the grid with FAST's convergent p update (``run.py --p-average``,
:func:`fast_jax.fairness.update_p_decaying`) into ``sweep-<mode>-avg/`` run folders and
``results/figure4_avg.*``; its plot shows the paper rule's grid too, where it has been
run, with hollow markers.

With ``--vmap`` the points of a backbone's sweep (and their seeds) differ only in gamma
and tau, which live in the train state, so they train as the lanes of one vmapped
program (``fast_jax.experiment.sweep_and_evaluate``): one compilation, no mid-run
checkpoints (a stopped sweep restarts its unfinished points).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from fast_jax.cli import one_line_errors
from fast_jax.cli.grid import (Run, add_grid_args, load_results, paired_vs_origin,
                               parse_grid_args, run_and_collect, summary_rows, write_csv)
from fast_jax.cli import plots

from fast_jax.config import PAPER_GAMMA_TAU, Config, seed_list

GAMMAS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0)
TAUS = (0.01, 0.03, 0.05, 0.1, 0.2, 0.5, 0.8, 1.0)


def make_runs(dataset, backbones, gammas, taus, *, seeds, epochs, data_dir,
              p_update, preset: str = "validated", p_average: bool = False) -> list[Run]:
  runs = []
  for b in backbones:
    gamma0, tau0 = PAPER_GAMMA_TAU.get((b, dataset), (1.0, 0.1))
    points = [("gamma", g, g, tau0) for g in gammas] + [("tau", t, gamma0, t) for t in taus]
    for swept, value, gamma, tau in points:
      cfg = Config(dataset=dataset, backbone=b, method="fast", gamma=gamma, tau=tau,
                   p_update=p_update, p_average=p_average, seeds=seeds,
                   data_dir=data_dir, preset=preset, **({"epochs": epochs} if epochs else {}))
      sweep = f"sweep-{p_update}" + ("-avg" if p_average else "")
      runs.append(Run(name=f"{dataset}/{sweep}/{b}-g{gamma:g}-t{tau:g}", cfg=cfg,
                      row=f"{b}-fast", label=f"{swept}={value:g}"))
  return runs


def origin_per_seed(args) -> dict:
  """{backbone: {seed: Origin's results}} from Table 2's run in
  ``<root>/<dataset>/<backbone>-origin``, where it exists."""
  out = {}
  for b in args.backbones:
    f = args.root / args.dataset / f"{b}-origin" / "results.json"
    if f.exists():
      out[b] = {r["seed"]: r for r in json.loads(f.read_text())["per_seed"]}
  return out


def origin_means(origin: dict, seeds: list[int]) -> dict:
  """{backbone: Origin's mean MAE and GF(MAE)} over ``seeds``, where Origin has them all."""
  return {b: {m: float(np.mean([runs[s][m] for s in seeds])) for m in ("mae", "gf_mae")}
          for b, runs in origin.items() if set(seeds) <= runs.keys()}


def add_paired_differences(rows: list[dict], origin: dict, root: pathlib.Path) -> None:
  """Each point minus Origin on the same seed, over the point's seeds, for MAE and
  GF(MAE): the mean and the population std of the per-seed differences
  (``mae_vs_origin``, ``..._std``), and on how many seeds the point's GF(MAE) is lower
  (``seeds_fairer``). The seed-to-seed spread that a point shares with Origin cancels in
  these differences. Points with a seed Origin lacks get no such columns."""
  for row in rows:
    point = json.loads((root / row["name"] / "results.json").read_text())["per_seed"]
    paired = paired_vs_origin(point, list(origin.get(row["backbone"], {}).values()))
    if paired is None:
      continue
    row.update(paired)
    print(f"{row['backbone']} {row['label']}: against Origin seed by seed, "
          f"MAE {row['mae_vs_origin']:+.4f} ± {row['mae_vs_origin_std']:.4f}, "
          f"GF(MAE) {row['gf_mae_vs_origin']:+.4f} ± {row['gf_mae_vs_origin_std']:.4f} "
          f"(lower on {row['seeds_fairer']} of {len(point)} seeds)")


P_TAIL = 10  # the epochs p0_last10 and p0_swing_last10 look at


def add_p_stability(rows: list[dict], root: pathlib.Path) -> None:
  """``p0_last10``: the mean of ``p[0]`` over the last :data:`P_TAIL` epochs each seed reached,
  and ``p0_swing_last10``: its range there (max - min); each averaged over the seeds
  (``metrics.jsonl``). A p that has settled swings little; the paper's step rule moves p
  by up to tau every step, so its p can still swing by ``2 tau`` or more."""
  for row in rows:
    run_dir = root / row["name"]
    if not (run_dir / "metrics.jsonl").exists():
      continue
    _, p, _ = plots.read_p(run_dir)
    tail = p[:, -P_TAIL:, 0]  # [seeds, epochs]
    row["p0_last10"] = float(tail.mean())
    row["p0_swing_last10"] = float((tail.max(1) - tail.min(1)).mean())


def _swept(rows: list[dict]) -> list[dict]:
  """``rows`` with ``swept`` ("gamma" or "tau") and ``value`` read from each label."""
  for r in rows:
    r["swept"], value = r["label"].split("=")
    r["value"] = float(value)
  return rows


class _PAverage(argparse.Action):
  """``--p-average``: FAST's convergent p update, and the files named ``figure4_avg``."""

  def __call__(self, parser, namespace, values, option_string=None):
    namespace.p_average = True
    namespace.out_name = "figure4_avg"


@one_line_errors
def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="bookcrossing")
  p.add_argument("--backbones", nargs="+", default=["melu", "metacs"])
  p.add_argument("--gammas", nargs="+", type=float, default=list(GAMMAS))
  p.add_argument("--taus", nargs="+", type=float, default=list(TAUS))
  add_grid_args(p, out_name="figure4")
  p.add_argument("--p-average", nargs=0, action=_PAverage, default=False,
                 help="FAST's convergent p update (run.py --p-average); run folders "
                      "sweep-<mode>-avg/, files results/figure4_avg.*")
  args = parse_grid_args(p, argv)
  runs = make_runs(args.dataset, args.backbones, args.gammas, args.taus, seeds=args.seeds,
                   epochs=args.epochs, data_dir=args.data_dir, p_update=args.p_update,
                   preset=args.preset, p_average=args.p_average)
  rows = _swept(run_and_collect(runs, args))
  origin = origin_per_seed(args)
  add_paired_differences(rows, origin, args.root)
  add_p_stability(rows, args.root)
  write_csv(rows, args.out.with_suffix(".csv"))
  compare = []
  if args.p_average:  # the paper rule's grid, where it has been run, beside this one
    paper_rule = make_runs(args.dataset, args.backbones, args.gammas, args.taus,
                           seeds=args.seeds, epochs=args.epochs, data_dir=args.data_dir,
                           p_update=args.p_update, preset=args.preset)
    compare = _swept(summary_rows(paper_rule, load_results(args.root, paper_rule)))
    add_p_stability(compare, args.root)
  plots.sweeps(rows, args.out.with_suffix(".png"),
               reference=origin_means(origin, seed_list(args.seeds)),
               dataset=args.dataset,
               label="--p-average" if args.p_average else "",
               compare=compare, compare_label="paper rule")
  print(f"wrote {args.out.with_suffix('.png')} and {args.out.with_suffix('.csv')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
