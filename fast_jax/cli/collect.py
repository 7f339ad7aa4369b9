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
from fast_jax import files
from fast_jax.cli import one_line_errors
from fast_jax.cli.grid import METRICS, PAPER_TABLE2, write_csv
from fast_jax.config import UsageError
from fast_jax.dataset import DataError


def row_of(folder: pathlib.Path) -> dict:
  path = folder / "results.json"
  try:
    res = json.loads(path.read_text())
    return _row(folder, res)
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise DataError(f"{path}: not a results file of fast-jax ({type(e).__name__}: {e})") \
        from None


def _row(folder: pathlib.Path, res: dict) -> dict:
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


def finished(folders: list[pathlib.Path]) -> list[pathlib.Path]:
  """The folders that hold a finished run (``results.json``); a folder that does not exist
  is an error, one without results (an unfinished run) a warning line on stderr."""
  done = []
  for f in folders:
    if not f.is_dir():
      raise UsageError(f"{f}: no such run folder")
    if (f / "results.json").is_file():
      done.append(f)
    else:
      print(f"warning: {f}: no results.json (an unfinished run?); left out", file=sys.stderr)
  if not done:
    raise UsageError(f"none of the {len(folders)} folder(s) holds a finished run "
                     f"(results.json)")
  return done


@one_line_errors
def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("runs", nargs="+", type=pathlib.Path)
  p.add_argument("--out", type=pathlib.Path, required=True)
  args = p.parse_args(argv)
  rows = [row_of(f) for f in finished(args.runs)]
  rows.sort(key=lambda r: (r["dataset"], r["backbone"], r["method"], r["mode"]))
  write_csv(rows, args.out.with_suffix(".csv"))
  files.write_text_atomic(args.out.with_suffix(".md"), markdown(rows))
  print(markdown(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
