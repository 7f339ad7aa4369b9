"""Tabulate finished runs (folders holding results.json) beside the paper's Table 2.

    python experiments/collect.py runs/core/* --out results/core

Writes ``<out>.md`` and ``<out>.csv``: one row per run with mean ± std of MAE, MSE,
GF(MAE), GF(MSE), the paper's value where Table 2 has the row, seeds, epochs, FAST mode,
group MAEs and the wall time if the run recorded one.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from fast_jax import config as config_lib
from fast_jax.cli.grid import METRICS, PAPER_TABLE2, write_csv


def row_of(folder: pathlib.Path) -> dict:
  res = json.loads((folder / "results.json").read_text())
  cfg = res["config"]
  method = cfg["method"]
  paper_row = method if cfg["method"] in ("widedeep", "dropoutnet", "nlba") else \
      f"{cfg['backbone']}-{'fast' if method == 'fast' else method}"
  mode = cfg["p_update"] if method in ("fast", "static") else ""
  row = {"run": folder.name, "dataset": cfg["dataset"], "backbone": cfg["backbone"],
         "method": method, "mode": mode, "seeds": len(res["per_seed"]), "epochs": cfg["epochs"]}
  for m in METRICS:
    row[m], row[m + "_std"] = res["mean"][m], res["std"][m]
    paper = PAPER_TABLE2.get((paper_row if method != "static" else "", cfg["dataset"], m))
    row[m + "_paper"] = paper[0] if paper else float("nan")
  for g, vals in res["mean"]["group"].items():
    row[f"g{g}_mae"] = vals.get("mae")
  row["auc_attack"] = res["mean"].get("auc_attack")
  wall = folder / "wall_time.txt"
  row["wall"] = wall.read_text().strip().splitlines()[-1] if wall.exists() else ""
  return row


def markdown(rows: list[dict]) -> str:
  head = ("| dataset | backbone | method | mode | seeds | MAE | MSE | GF(MAE) | GF(MSE) | "
          "MAE G0 / G1 | attacker AUC |")
  lines = [head, "|---" * 11 + "|"]
  for r in rows:
    cells = []
    for m in METRICS:
      paper = r[m + "_paper"]
      cells.append(f"{r[m]:.3f} ± {r[m + '_std']:.3f}" +
                   ("" if paper != paper else f" (paper {paper:.3f})"))
    auc = "" if r["auc_attack"] is None else f"{r['auc_attack']:.3f}"
    lines.append(f"| {r['dataset']} | {r['backbone'] if r['method'] not in NO_BACKBONE else '—'}"
                 f" | {r['method']} | {r['mode']} | {r['seeds']} | " + " | ".join(cells) +
                 f" | {r.get('g0_mae', float('nan')):.3f} / {r.get('g1_mae', float('nan')):.3f}"
                 f" | {auc} |")
  return "\n".join(lines) + "\n"


NO_BACKBONE = config_lib.BASELINES


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("runs", nargs="+", type=pathlib.Path)
  p.add_argument("--out", type=pathlib.Path, required=True)
  args = p.parse_args(argv)
  rows = [row_of(f) for f in args.runs if (f / "results.json").exists()]
  rows.sort(key=lambda r: (r["dataset"], r["backbone"], r["method"], r["mode"]))
  write_csv(rows, args.out.with_suffix(".csv"))
  args.out.with_suffix(".md").write_text(markdown(rows))
  print(markdown(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
