"""Plots of the drivers (matplotlib, Agg backend): grouped bars, sweeps, p over
training, and the fairness-utility scatter.

    python experiments/plots.py scatter results/table2.csv results/scatter.png
    python experiments/plots.py p RUN_DIR [RUN_DIR ...] --out results/p.png
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

from fast_jax import files
from fast_jax.cli import one_line_errors
from fast_jax.config import UsageError
from fast_jax.dataset import DataError

LABELS = {"mae": "MAE", "mse": "MSE", "gf_mae": "GF(MAE)", "gf_mse": "GF(MSE)"}
DATASET_NAMES = {"ml1m": "ML-1M", "ml100k": "ML-100K", "bookcrossing": "Book-Crossing"}
BACKBONE_NAMES = {"melu": "MeLU", "metacs": "MetaCS"}
STRATEGY_NAMES = {"origin": "Origin", "static": "Static", "fast": "FAST"}
# The group names data_prep writes into meta.json for the paper's datasets (protocol
# clover); used when a run folder does not name its groups itself.
KNOWN_GROUPS = {"ml100k": ["M", "F"], "ml1m": ["M", "F"],
                "bookcrossing": ["age<40", "age>=40"]}
# Rows that are no recommender but a yardstick: drawn apart in the scatter.
REFERENCE_ROWS = {"global-mean": "global mean", "support-mean": "support mean",
                  "constant-mode": "constant mode"}


def _name(table: dict, key: str) -> str:
  return table.get(key, key)


def group_names(run_dir, num_groups: int = 2) -> list[str]:
  """The names of a run's sensitive groups, in group-index order.

  Looked up in the run folder (a ``group_names`` entry of results.json or config.json,
  or a ``meta.json`` beside them), then in :data:`KNOWN_GROUPS` by the run's dataset;
  ``G0``, ``G1``, ... when none of these names them.
  """
  d = pathlib.Path(run_dir)
  config = {}
  for name in ("results.json", "config.json", "meta.json"):
    f = d / name
    if not f.is_file():
      continue
    data = json.loads(f.read_text())
    names = data.get("group_names") or data.get("sensitive", {}).get("groups")
    if names and len(names) >= num_groups:
      return [str(n) for n in names]
    config = config or data.get("config", data if name == "config.json" else {})
  names = KNOWN_GROUPS.get(config.get("dataset", ""))
  if names and len(names) >= num_groups:
    return list(names)
  return [f"G{g}" for g in range(num_groups)]


def _zoomed_limits(lo: np.ndarray, hi: np.ndarray, *, from_zero: bool) -> tuple[float, float]:
  """y limits that show the spread of [lo, hi] (with room above); from 0 if asked."""
  top, bottom = float(np.nanmax(hi)), float(np.nanmin(lo))
  if from_zero:
    return 0.0, top * 1.12 if top > 0 else 1.0
  pad = max(top - bottom, 1e-3 * max(abs(top), 1e-9)) * 0.25
  return bottom - pad, top + pad


def grouped_bars(rows, metrics, *, panel_keys, bar_key, path, title=""):
  """Bars of mean ± std over seeds: one row of panels per metric, one column per value
  of ``panel_keys`` (e.g. dataset and backbone), one bar per ``bar_key`` value (e.g. the
  sampling strategy), each bar in one colour across all panels.

  Every panel has its own y axis, so that the bars compared side by side share a scale
  and nothing else. Error metrics (MAE, MSE) start the axis just below the lowest bar,
  so that differences of a few thousandths are visible (the y label says the axis is
  cut); the gaps (``gf_*``) start at 0.
  """
  panels = list(dict.fromkeys(tuple(r[k] for k in panel_keys) for r in rows))
  bars = list(dict.fromkeys(r[bar_key] for r in rows))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  fig, axes = plt.subplots(len(metrics), len(panels), squeeze=False,
                           figsize=(1.0 + 2.1 * len(panels), 0.9 + 2.2 * len(metrics)))
  x = np.arange(len(bars))
  for i, m in enumerate(metrics):
    for j, panel in enumerate(panels):
      ax = axes[i][j]
      found = [next((r for r in rows if tuple(r[k] for k in panel_keys) == panel
                     and r[bar_key] == b), None) for b in bars]
      vals = np.array([r[m] if r else np.nan for r in found], float)
      errs = np.array([r[m + "_std"] if r else 0.0 for r in found], float)
      ax.bar(x, vals, 0.7, yerr=errs, capsize=3, ecolor="0.25", error_kw={"lw": 0.8},
             color=[colors[k % len(colors)] for k in range(len(bars))])
      from_zero = m.startswith("gf_")
      ax.set_ylim(*_zoomed_limits(vals - errs, vals + errs, from_zero=from_zero))
      ax.set_xticks(x)
      ax.set_xticklabels([_name(STRATEGY_NAMES, b) for b in bars])
      ax.tick_params(labelsize=8)
      ax.grid(axis="y", lw=0.4, alpha=0.5)
      ax.set_axisbelow(True)
      if i == 0:
        ax.set_title("\n".join(_name({**DATASET_NAMES, **BACKBONE_NAMES}, v) for v in panel),
                     fontsize=10)
      if j == 0:  # bars of MAE and MSE start at the cut axis, not at 0: say so
        ax.set_ylabel(LABELS.get(m, m) + ("" if from_zero else "  (axis from above 0)"),
                      fontsize=9)
  _suptitle(fig, title)
  fig.tight_layout()
  save(fig, path)


SWEEP_METRICS = ("mae", "gf_mae", "p0_swing_last10")


def sweeps(rows, path, reference=None, dataset="bookcrossing", label="", compare=None,
           compare_label=""):
  """MAE, GF(MAE) and the range of FAST's p0 (the probability of sampling the dataset's
  first group, named from :data:`KNOWN_GROUPS`) over the last 10 epochs against gamma
  and tau, one line per backbone (``label`` appended to its name); ``reference``
  ({backbone: {"mae", "gf_mae"}}, e.g. Origin over the same seeds) is a dashed line, and
  ``compare`` (rows like ``rows``, e.g. the same grid under another p rule, named
  ``compare_label``) is drawn in the backbone's colour with hollow markers. The p0 row
  is left out when no row has the column."""
  compare = compare or []
  metrics = [m for m in SWEEP_METRICS if any(m in r for r in rows + compare)]
  fig, axes = plt.subplots(len(metrics), 2, figsize=(9, 2.1 + 2.2 * len(metrics)),
                           squeeze=False)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  backbones = sorted({r["backbone"] for r in rows + compare})
  group0 = KNOWN_GROUPS.get(dataset, ["group 0"])[0]
  ylabels = {**LABELS, "p0_swing_last10": f"range of p({group0}), last 10 epochs"}
  for col, swept in enumerate(("gamma", "tau")):
    for row, m in enumerate(metrics):
      ax = axes[row][col]
      for i, backbone in enumerate(backbones):
        color = colors[i % len(colors)]
        # The compared grid sits a little left of the same x, so the two rules' error
        # bars do not cover each other (the x axis is logarithmic).
        for these, name, shift, style in (
            (compare, compare_label, 0.96, dict(mfc="white", ls=":")), (rows, label, 1.0, {})):
          pts = sorted((r["value"], r[m], r.get(m + "_std", 0.0)) for r in these
                       if r["swept"] == swept and r["backbone"] == backbone and m in r)
          if pts:
            x, y, e = map(np.array, zip(*pts))
            ax.errorbar(x * shift, y, yerr=e, marker="o", capsize=2, color=color,
                        label=_name(BACKBONE_NAMES, backbone) + (f", {name}" if name else ""),
                        **style)
        if reference and backbone in reference and m in reference[backbone]:
          ax.axhline(reference[backbone][m], ls="--", lw=1, color=color,
                     label=f"{_name(BACKBONE_NAMES, backbone)} Origin, same seeds")
      ax.set_xscale("log")
      if m == "p0_swing_last10":
        ax.set_ylim(bottom=0)
      ax.set_xlabel(f"{swept} (the other at Table 3's value)")
      ax.set_ylabel(ylabels.get(m, m))
  handles, labels = axes[0][0].get_legend_handles_labels()  # one legend for all panels
  fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
  seeds = sorted({int(r["seeds"]) for r in rows + compare})
  fig.suptitle(f"FAST sensitivity ({_name(DATASET_NAMES, dataset)}; {'/'.join(map(str, seeds))} "
               f"seed{'s' if seeds != [1] else ''} per point)")
  fig.tight_layout(rect=(0, 0.05, 1, 1))
  save(fig, path)


def save(fig, path) -> None:
  """Write ``fig`` at ``path`` in the format its suffix names (PNG without one), atomically
  (:func:`fast_jax.files.write_bytes_atomic`), and close it."""
  path = pathlib.Path(path)
  buffer = io.BytesIO()
  try:
    fig.savefig(buffer, dpi=120, format=path.suffix.lstrip(".").lower() or "png")
  except ValueError as e:  # a suffix matplotlib cannot write
    raise UsageError(f"{path}: {e}") from None
  finally:
    plt.close(fig)
  files.write_bytes_atomic(path, buffer.getvalue())


def read_p(run_dir) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A run's sampling probabilities and group losses per epoch from metrics.jsonl.

  Returns ``epochs`` int[E], ``p`` float[S, E, G] and ``group_loss`` float[S, E, G] for
  the S seeds of the run, cut to the epochs every seed has reached.
  """
  path = pathlib.Path(run_dir) / "metrics.jsonl"
  try:
    lines = path.read_text().splitlines()
  except OSError as e:
    raise UsageError(f"{run_dir}: not a run folder ({path.name}: "
                     f"{e.strerror or e})") from None
  by_seed: dict = {}
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      r = json.loads(line)
      seed, epoch = r["seed"], r["epoch"]
    except (ValueError, KeyError, TypeError) as e:
      raise DataError(f"{path}, line {n}: not a metrics record ({e})") from None
    if "p" not in r or "group_loss" not in r:
      raise UsageError(f"{path}: its records have no p and group_loss (only FAST and "
                       f"Static runs sample the groups by p)")
    by_seed.setdefault(seed, {})[epoch] = r  # a resumed run may repeat an epoch: the last wins
  if not by_seed:
    raise UsageError(f"{path}: no epochs recorded yet")
  epochs = sorted(set.intersection(*(set(e) for e in by_seed.values())))
  p = np.array([[by_seed[s][e]["p"] for e in epochs] for s in by_seed], float)
  loss = np.array([[by_seed[s][e]["group_loss"] for e in epochs] for s in by_seed], float)
  return np.array(epochs), p, loss


def _band(ax, epochs, values, color, label):
  """Mean over seeds as a line, the seeds' min-max range as a shaded band."""
  ax.fill_between(epochs, values.min(0), values.max(0), color=color, alpha=0.2, lw=0)
  ax.plot(epochs, values.mean(0), color=color, lw=1.4, label=label)


def _plain_log_axis(ax):
  """A log y axis labelled 0.8, 1, 2, 5, 10 rather than in powers of ten."""
  ax.set_yscale("log")
  fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
  ax.yaxis.set_major_formatter(fmt)
  ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))
  ax.yaxis.set_minor_formatter(fmt)


def _suptitle(fig, title: str, *, fontsize: int = 11) -> None:
  """The figure's title, wrapped to the figure's width (a one-column figure is narrower
  than a long title)."""
  import textwrap
  width = max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))  # characters that fit
  fig.suptitle(textwrap.fill(title, width), fontsize=fontsize)


def p_trajectories(run_dirs, path, *, titles=None, ncols=None, losses=True, title=""):
  """FAST's sampling probability over training, one panel per run (``metrics.jsonl``).

  Each panel shows ``p[0]``, the probability of sampling a user of the run's first group
  (named from the run folder, see :func:`group_names`), as the mean over the run's seeds
  with the seeds' range as a band, and Static's fixed ``1/2`` for reference. With
  ``losses``, a second row of panels shows each group's training query loss the same
  way (log axis). Panels are laid out ``ncols`` to a row (default: all in one row).
  """
  run_dirs = [pathlib.Path(d) for d in run_dirs]
  titles = titles or ["/".join(d.parts[-2:]) for d in run_dirs]
  ncols = ncols or len(run_dirs)
  nrows = -(-len(run_dirs) // ncols)
  rows_per_run = 2 if losses else 1
  fig, axes = plt.subplots(nrows * rows_per_run, ncols, squeeze=False, sharex=True,
                           figsize=(0.6 + 3.3 * ncols, 0.7 + 2.6 * nrows * rows_per_run))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, (d, name) in enumerate(zip(run_dirs, titles)):
    row, col = divmod(i, ncols)
    epochs, p, loss = read_p(d)
    names = group_names(d, p.shape[-1])
    ax = axes[row * rows_per_run][col]
    _band(ax, epochs, p[..., 0], colors[0], f"p, mean of {p.shape[0]} seeds (band: range)")
    ax.axhline(1 / p.shape[-1], ls="--", lw=0.8, color="0.4", label="Static: p = 1/2"
               if p.shape[-1] == 2 else f"Static: p = 1/{p.shape[-1]}")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(name, fontsize=10)
    ax.set_ylabel(f"p = P(sample group {names[0]})", fontsize=9)
    if losses:
      ax = axes[row * rows_per_run + 1][col]
      for g in range(loss.shape[-1]):
        _band(ax, epochs, loss[..., g], colors[g % len(colors)], names[g])
      _plain_log_axis(ax)
      ax.set_ylabel("training query loss", fontsize=9)
      ax.legend(fontsize=8, title="group", title_fontsize=8)
  for ax in axes.flat:
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.tick_params(labelsize=8)
  for ax in axes[-1]:
    ax.set_xlabel("epoch", fontsize=9)
  for j in range(len(run_dirs), nrows * ncols):  # empty cells of the last row
    for k in range(rows_per_run):
      axes[(j // ncols) * rows_per_run + k][j % ncols].set_visible(False)
  handles, labels = axes[0][0].get_legend_handles_labels()
  one_column = ncols == 1  # a narrow figure: the legend's entries one under the other
  fig.legend(handles, labels, loc="lower center", ncol=1 if one_column else 2, fontsize=9,
             frameon=False)
  _suptitle(fig, title)
  fig.tight_layout(rect=(0, 0.09 if one_column else 0.05, 1, 1))
  save(fig, path)


METHOD_NAMES = {"origin": "Origin", "static": "Static", "fast": "FAST", "reg": "Reg",
                "ipw": "IPW", "clover": "CLOVER", "widedeep": "Wide&Deep",
                "dropoutnet": "DropoutNet", "nlba": "NLBA"}
# One colour per method in every scatter; FAST in red, apart from the greys of the
# reference predictors.
METHOD_COLORS = {"origin": "tab:blue", "static": "tab:cyan", "fast": "tab:red",
                 "reg": "tab:purple", "ipw": "tab:brown", "clover": "tab:pink",
                 "widedeep": "tab:olive", "dropoutnet": "tab:orange", "nlba": "tab:green"}
BACKBONE_MARKERS = {"melu": "o", "metacs": "s", "": "^"}


def _split_row(row: str) -> tuple[str, str]:
  """A Table 2 row key -> (backbone, method); backbone "" for the cold-start baselines."""
  backbone, _, method = row.partition("-")
  return (backbone, method) if backbone in BACKBONE_NAMES and method else ("", row)


def scatter(rows, path, *, note: str = ""):
  """Fairness-utility trade-off: GF(MAE) against MAE (mean ± std over seeds), one panel
  per dataset; lower-left is better on both.

  Colour is the method, marker the backbone (triangles: the cold-start baselines), told
  apart in one legend instead of labels beside the points, which collide where rows are
  close. The reference predictors (``global-mean``, ``support-mean``,
  ``constant-mode``) are grey marks and dashed lines at their MAE: a recommender should
  stay left of them. ``note`` is added to the title (e.g. which FAST mode the FAST rows
  ran).
  """
  datasets = list(dict.fromkeys(r["dataset"] for r in rows))
  present = {_split_row(r["row"] or r["label"])[1] for r in rows
             if (r["row"] or r["label"]) not in REFERENCE_ROWS}
  methods = [m for m in METHOD_COLORS if m in present] + sorted(present - METHOD_COLORS.keys())
  spare = iter(c for c in plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4
               if c not in METHOD_COLORS.values())
  color = {m: METHOD_COLORS.get(m) or next(spare) for m in methods}
  styles = (("X", "0.35"), ("P", "0.6"), ("D", "0.5"), ("*", "0.45"), ("v", "0.65"))
  ref_style = dict(zip(REFERENCE_ROWS, itertools.cycle(styles)))  # any number of them
  fig, axes = plt.subplots(1, len(datasets), figsize=(0.8 + 4.4 * len(datasets), 4.6),
                           squeeze=False)
  for ax, d in zip(axes[0], datasets):
    for r in (r for r in rows if r["dataset"] == d):
      key = r["row"] or r["label"]
      if key in REFERENCE_ROWS:
        marker, c = ref_style[key]
        ax.axvline(r["mae"], color=c, ls="--", lw=0.8, zorder=1)
        ax.plot(r["mae"], r["gf_mae"], marker=marker, color=c, ms=7, ls="none", zorder=1,
                alpha=0.8)
        continue
      backbone, method = _split_row(key)
      ax.errorbar(r["mae"], r["gf_mae"], xerr=r["mae_std"], yerr=r["gf_mae_std"],
                  fmt=BACKBONE_MARKERS.get(backbone, "o"), color=color[method], ms=6,
                  mec="black", mew=0.5, elinewidth=0.8, capsize=2, zorder=2)
    ax.set_title(_name(DATASET_NAMES, d), fontsize=10)
    ax.set_xlabel("\u2190 better      MAE", fontsize=9)
    ax.set_ylabel("\u2190 better      GF(MAE)", fontsize=9)
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    ax.grid(lw=0.4, alpha=0.5)
    ax.tick_params(labelsize=8)
  from matplotlib.lines import Line2D
  handles = [Line2D([], [], ls="none", marker="o", ms=7, color=color[m], mec="black", mew=0.5,
                    label=_name(METHOD_NAMES, m)) for m in methods]
  handles += [Line2D([], [], ls="none", marker=BACKBONE_MARKERS[b], ms=7, color="white",
                     mec="black", label=name)
              for b, name in (("melu", "MeLU"), ("metacs", "MetaCS"), ("", "cold-start baseline"))
              if any(_split_row(r["row"] or r["label"])[0] == b for r in rows
                     if (r["row"] or r["label"]) not in REFERENCE_ROWS)]
  handles += [Line2D([], [], ls="--", lw=0.8, marker=ref_style[k][0], ms=7,
                     color=ref_style[k][1], label=f"reference: {name}")
              for k, name in REFERENCE_ROWS.items()
              if any((r["row"] or r["label"]) == k for r in rows)]
  fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8,
             frameon=False, title="colour: method; marker: backbone", title_fontsize=8)
  seeds = sorted({int(r["seeds"]) for r in rows})
  fig.suptitle("Fairness against accuracy (mean \u00b1 std over "
               f"{'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''}); "
               f"lower-left is better{'; ' + note if note else ''}", fontsize=11)
  fig.tight_layout(rect=(0, 0.06 + 0.035 * (len(handles) > 8), 1, 1))
  save(fig, path)


@one_line_errors
def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  s = sub.add_parser("scatter", description="GF(MAE) against MAE from a table2 CSV (or any "
                     "CSV with dataset, row, mae, gf_mae and their _std), one panel per dataset")
  s.add_argument("csv"), s.add_argument("png")
  q = sub.add_parser("p", description="FAST's p (mean and range over seeds) and the group "
                     "losses per epoch, one column per run folder")
  q.add_argument("runs", nargs="+"), q.add_argument("--out", required=True)
  args = p.parse_args(argv)
  if args.cmd == "scatter":
    import pandas as pd
    try:
      table = pd.read_csv(args.csv)
    except (OSError, ValueError) as e:
      raise UsageError(f"{args.csv}: cannot read it as a CSV ({str(e).strip()})") from None
    missing = {"dataset", "row", "mae", "gf_mae", "mae_std", "gf_mae_std"} - set(table.columns)
    if missing:
      raise UsageError(f"{args.csv}: no column {', '.join(sorted(missing))} (expected a "
                       f"table2 CSV)")
    scatter(table.fillna("").to_dict("records"), args.png)
  else:
    p_trajectories(args.runs, args.out, losses=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
