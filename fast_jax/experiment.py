"""Run one configuration for N seeds and write its result files.

``train_and_evaluate(cfg, out_dir)`` is what ``experiments/run.py`` and the notebooks
call. It writes into ``out_dir``:

* ``config.json``: every setting used, library versions and the git commit;
* ``metrics.jsonl``: one JSON object per epoch and seed;
* ``results.json``: per-seed test metrics with per-group values (each group with its
  name; ``group_names`` lists them), a meta-learner's ``adaptation``
  (:mod:`fast_jax.diagnostics`), and mean / population std (ddof = 0) over seeds;
* ``predictions/seed-S.csv``: each test user's query rows with the selected state's
  adapted and unadapted predictions.

Files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Callable

import numpy as np

from fast_jax import compile_cache, diagnostics, sharding
from fast_jax import config as config_lib
from fast_jax.config import Config, UsageError
from fast_jax.methods import learner as learn
from fast_jax.methods import rows as row_lanes
from fast_jax.metrics import METRIC_KEYS
from fast_jax.runfolder import RunFolder
from fast_jax.runner import Diverged, Runner

SUMMARY_KEYS = tuple(METRIC_KEYS) + tuple(f"gf_{k}" for k in METRIC_KEYS)
ATTACK_KEYS = ("auc_attack", "auc_attack_max")  # fast_jax.attack; null when not applicable


def load_dataset(cfg: Config, *, progress: bool = True):
  """The prepared dataset of ``cfg.dataset``: a prepared folder, or a dataset name that
  is prepared (and cached) on first use."""
  from fast_jax.dataset import load_prepared
  path = pathlib.Path(cfg.dataset).expanduser()
  if (path / "meta.json").exists() or cfg.dataset not in config_lib.DATASETS:
    if not path.exists():
      raise UsageError(f"--dataset {cfg.dataset!r}: not one of {', '.join(config_lib.DATASETS)}"
                       f" and no such prepared dataset folder")
    return load_prepared(path)
  from fast_jax import data_prep
  folder = data_prep.ensure_prepared(cfg.dataset, data_dir=cfg.data_dir, protocol=cfg.protocol,
                                     progress=progress)
  return load_prepared(folder)


def check_config(cfg: Config) -> None:
  """Reject flag values that cannot work, with a clear message, before any data is read."""
  if cfg.backbone not in config_lib.BACKBONES:
    raise UsageError(f"--backbone {cfg.backbone!r}: expected one of {config_lib.BACKBONES}")
  if cfg.method not in config_lib.METHODS:
    raise UsageError(f"--method {cfg.method!r}: expected one of {config_lib.METHODS}")
  if cfg.preset not in config_lib.PRESETS:
    raise UsageError(f"--preset {cfg.preset!r}: expected one of {config_lib.PRESETS}")
  for name in ("gamma", "tau"):
    value = getattr(cfg, name)
    if value is not None and not value >= 0:  # also NaN
      raise UsageError(f"--{name} must be >= 0, got {value}")
  if cfg.tau is not None and cfg.tau > 1:
    raise UsageError(f"--tau caps a change of a probability and must be <= 1, got {cfg.tau}")
  for name in ("epochs", "seeds", "batch_size", "inner_steps", "length_parts"):
    if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
      raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
  config_lib.check_numbers(cfg)  # every other numeric flag: finite and in range
  if cfg.method != "clover":
    given = [f for f in ("clover_preset",) + config_lib.CLOVER_FIELDS
             if getattr(cfg, f) is not None]
    if given:
      raise UsageError(f"--{given[0].replace('_', '-')} is a CLOVER setting: it needs "
                       f"--method clover")


def check_data(cfg: Config, data) -> None:
  """Reject settings that do not fit the loaded dataset (``cfg`` resolved)."""
  n_train = data.train.x.shape[0]
  if cfg.batch_size > n_train:
    raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {n_train} "
                     f"training users of {cfg.dataset}")
  groups = np.unique(data.train.group)
  if groups.size < 2:
    raise UsageError(f"dataset {cfg.dataset} has one sensitive group only in its training "
                     f"users; fairness methods need at least two")


def make_runner(cfg: Config, data, *, make: Callable | None = None) -> Runner:
  """The runner of a resolved ``cfg`` on ``data``: every method trains through
  :class:`fast_jax.runner.Runner` (``run_seed``, ``run_lanes``); ``make`` builds another
  method than ``cfg.method`` (:func:`fast_jax.methods.rows.maker`)."""
  return Runner(cfg, data, make=make)


def finish(folder: RunFolder, cfg: Config, per_seed: list[dict], diverged: list[dict],
           group_names: list[str]) -> dict:
  """Aggregate the seeds and write ``results.json``; return its content."""
  if not per_seed:
    raise Diverged("every seed diverged: " + "; ".join(d["message"] for d in diverged))
  results = {"config": cfg.to_dict(), "group_names": list(group_names), "per_seed": per_seed,
             **aggregate(per_seed)}
  if diverged:
    results["diverged"] = diverged
  folder.write_results(results)
  return results


def train_and_evaluate(cfg: Config, out_dir: str | os.PathLike | None = None, *, data=None,
                       progress: bool = True, resume: bool = False, overwrite: bool = False,
                       echo: Callable[[str], None] = print) -> dict:
  """Train ``cfg`` for ``cfg.seeds`` seeds, evaluate on the test users, write the files.

  With ``out_dir``, every seed is checkpointed every ``cfg.checkpoint_every`` epochs
  (``checkpoints/seed-S.msgpack``) and a finished seed's report is kept in
  ``seeds/seed-S.json``. ``resume=True`` continues an interrupted run in ``out_dir``:
  finished seeds are not retrained, the unfinished one restarts from its checkpoint, and
  the result files end up identical to an uninterrupted run's. A folder that holds a run
  is refused unless ``resume`` or ``overwrite`` (remove its result files first) is given,
  and so is a folder another run is using (:class:`fast_jax.runfolder.RunFolder`).

  A seed whose loss becomes NaN/inf is stopped (its last good checkpoint is kept), named
  in ``results.json["diverged"]`` and left out of the mean; if every seed diverges,
  :class:`fast_jax.runner.Diverged` is raised.

  Returns:
    the content of ``results.json``.
  """
  check_config(cfg)
  compile_cache.enable()
  if not sharding.is_writer():  # other processes of a multi-process job: quiet
    progress, echo = False, lambda text: None
  if data is None:
    data = load_dataset(cfg, progress=progress)
  cfg = config_lib.resolve(cfg, data.meta.get("dataset"))
  check_data(cfg, data)
  folder = RunFolder(out_dir, cfg, data, resume=resume, overwrite=overwrite,
                     write=sharding.is_writer())
  runner = make_runner(cfg, data)
  if cfg.vmap_seeds and runner.method.lanes:
    [(per_seed, diverged)] = _run_lanes(runner, [(cfg, folder)], [cfg.method],
                                        progress=progress)
  else:
    def train(seed: int):
      records: list[dict] = []
      rows: list[dict] = []

      def log_seed(r: dict) -> None:
        records.append(r)
        folder.log(r)
      try:
        report = runner.run_seed(seed, log=log_seed, progress=progress,
                                 checkpoint=folder.checkpoint(seed),
                                 checkpoint_every=cfg.checkpoint_every,
                                 predictions=rows.append)[1]
        return report, records, rows[0]
      except Diverged as e:
        return e, records, None
    per_seed, diverged = _collect(folder, config_lib.seed_list(cfg.seeds), train)
  results = finish(folder, cfg, per_seed, diverged, runner.group_names)
  echo(format_table(results, data.meta))
  return results


# Config fields a vectorised sweep may vary: they live in the train state (FAST's gamma
# and tau and Reg's weight in ``state.hyper``, the inner learning rate as the initial
# alpha), not the program.
# The method may vary too among the rows of :mod:`fast_jax.methods.rows` (Origin, Reg,
# IPW, FAST in step mode): each lane's in ``state.hyper["row"]``.
SWEEPABLE = ("gamma", "tau", "inner_lr", "reg_weight")


def sweep_and_evaluate(cfgs: list[Config], out_dirs: list | None = None, *, data=None,
                       progress: bool = True, echo: Callable[[str], None] = print) -> list[dict]:
  """Train configurations that differ only in :data:`SWEEPABLE` settings (FAST's ``gamma``
  and ``tau``, the inner learning rate, Reg's weight) and in their method among the rows of
  :mod:`fast_jax.methods.rows` as one vectorised program: each (configuration, seed) is
  a lane of a ``vmap``-ped epoch.

  Each configuration gets the files of :func:`train_and_evaluate` in its ``out_dirs``
  entry (None: no files); results match running them one by one. A folder holding part
  of a run of the same settings is resumed: its finished seeds are not retrained.

  Returns:
    each configuration's ``results.json`` content, in order.
  """
  if not cfgs:
    return []
  compile_cache.enable()
  out_dirs = list(out_dirs) if out_dirs is not None else [None] * len(cfgs)
  if len(out_dirs) != len(cfgs):
    raise ValueError(f"{len(cfgs)} configurations but {len(out_dirs)} output folders")
  for cfg in cfgs:
    check_config(cfg)
  if data is None:
    data = load_dataset(cfgs[0], progress=progress)
  cfgs = [config_lib.resolve(c, data.meta.get("dataset")) for c in cfgs]
  base = cfgs[0].to_dict()
  methods = list(dict.fromkeys(c.method for c in cfgs))
  varied = SWEEPABLE + (("method",) if len(methods) > 1 else ())
  for cfg in cfgs:
    check_data(cfg, data)
    other = {k: v for k, v in cfg.to_dict().items() if k not in varied and v != base[k]}
    if other:
      k = next(iter(other))
      raise UsageError(f"a vectorised sweep varies only {', '.join(SWEEPABLE)} (and the "
                       f"method among {', '.join(row_lanes.OBJECTIVES)}); {k} is "
                       f"{base[k]!r} in one configuration and {other[k]!r} in another")
  if len(methods) > 1 and not all(row_lanes.joins(c) for c in cfgs):
    raise UsageError(f"--method {', '.join(methods)}: only "
                     f"{', '.join(row_lanes.OBJECTIVES)} (FAST in step mode) train as lanes "
                     "of one program")
  runner = make_runner(cfgs[0], data,
                       make=row_lanes.maker(methods) if len(methods) > 1 else None)
  if not runner.method.lanes:
    raise UsageError(f"--method {cfgs[0].method} is not meta-learned: it has no "
                     f"vectorised seeds or sweeps")
  folders = [RunFolder(o, c, data, resume=o is not None and
                       (pathlib.Path(o) / "config.json").exists(), write=sharding.is_writer())
             for c, o in zip(cfgs, out_dirs)]
  outcomes = _run_lanes(runner, list(zip(cfgs, folders)), methods, progress=progress)
  results = []
  for cfg, folder, (per_seed, diverged) in zip(cfgs, folders, outcomes):
    results.append(finish(folder, cfg, per_seed, diverged, runner.group_names))
    weight = f" reg_weight={cfg.reg_weight:g}" if cfg.method == "reg" else ""
    echo(f"{cfg.method} gamma={cfg.gamma:g} tau={cfg.tau:g} inner_lr={cfg.inner_lr:g}{weight}: "
         + format_table(results[-1], data.meta))
  return results


def _run_lanes(runner, runs: list[tuple[Config, RunFolder]], methods: list[str], *,
               progress: bool) -> list[tuple[list[dict], list[dict]]]:
  """Every unfinished (run, seed) of ``runs`` as one lane of ``runner.run_lanes``;
  per run, its per-seed reports and diverged seeds, with the folders' seed files written
  as soon as their group of lanes has trained (where lanes go one seed at a time, an
  interrupted run resumes from its finished seeds); they are then read back as a resume
  reads them.
  ``methods``: the runs' methods, in the order of the runner's rows (when several)."""

  def hypers(cfg: Config) -> dict:  # a lane's: its sweep point, and its row if they vary
    row = {"row": methods.index(cfg.method)} if len(methods) > 1 else {}
    return {**{k: getattr(cfg, k) for k in SWEEPABLE}, **row}
  lanes = [(i, seed) for i, (cfg, folder) in enumerate(runs)
           for seed in config_lib.seed_list(cfg.seeds) if folder.finished_seed(seed) is None]
  records: dict[tuple[int, int], list[dict]] = {lane: [] for lane in lanes}
  columns: dict[tuple[int, int], dict] = {}
  # Where a run goes by length (a CPU, learner.row_budgets) and its batches do not depend
  # on p (the uniform sampler of the rows' methods), the lanes of each seed share their
  # batches and train together by length, one seed after another; otherwise all lanes at
  # once, on whole batches.
  if (len(runs) > 1 and all(row_lanes.joins(cfg) for cfg, _ in runs)
      and learn.row_budgets(runner.ctx)):
    seeds = dict.fromkeys(seed for _, seed in lanes)
    groups = [[lane for lane in lanes if lane[1] == seed] for seed in seeds]
  else:
    groups = [lanes] if lanes else []
  by_lane = {}
  for group in groups:
    reports = runner.run_lanes(
        [seed for _, seed in group],
        hypers=[hypers(runs[i][0]) for i, _ in group],
        log=lambda k, record, group=group: records[group[k]].append(record),
        progress=progress,
        predictions=lambda k, cols, group=group: columns.__setitem__(group[k], cols))
    by_lane.update(zip(group, reports))
    for (i, seed), report in zip(group, reports):  # filed now: a stop loses this group only
      if not isinstance(report, Diverged):  # (reported with the rest, below)
        runs[i][1].save_seed({"seed": seed, **report}, records[(i, seed)],
                             columns.get((i, seed)))

  def collected(i: int, cfg: Config, folder: RunFolder):
    def train(seed: int):
      for r in records[(i, seed)]:
        folder.log(r)
      return by_lane[(i, seed)], records[(i, seed)], columns.get((i, seed))
    return _collect(folder, config_lib.seed_list(cfg.seeds), train)
  return [collected(i, cfg, folder) for i, (cfg, folder) in enumerate(runs)]


def _collect(folder: RunFolder, seeds: list[int], train: Callable) -> tuple[list, list]:
  """Per-seed reports and diverged seeds of a run: a seed finished before a resume is
  replayed from its folder (its predictions file stays), any other comes from
  ``train(seed) -> (report or Diverged, epoch records, test prediction columns)`` and is
  filed (its report kept in ``seeds/``, its predictions in ``predictions/``)."""
  per_seed, diverged = [], []
  for seed in seeds:
    done = folder.replay(seed)
    if done is not None:
      per_seed.append(done)
      continue
    outcome, records, predictions = train(seed)
    if isinstance(outcome, Diverged):
      print(f"warning: {outcome}", file=sys.stderr)
      diverged.append({"seed": seed, "message": str(outcome)})
      continue
    entry = {"seed": seed, **outcome}
    per_seed.append(entry)
    folder.save_seed(entry, records, predictions)
  return per_seed, diverged


def aggregate(per_seed: list[dict]) -> dict:
  """Mean and population std (ddof = 0) over seeds of every metric, overall, per group
  (a group's name is kept, not averaged) and of the adaptation diagnostics."""
  mean, std = {}, {}
  for key in SUMMARY_KEYS:
    values = np.array([r[key] for r in per_seed], dtype=np.float64)
    mean[key], std[key] = float(np.mean(values)), float(np.std(values))
  # Attacker AUCs are null for methods without a user representation: skip the nulls,
  # and leave the key out when no seed has a value.
  for key in ATTACK_KEYS:
    values = np.array([r[key] for r in per_seed if r.get(key) is not None], dtype=np.float64)
    if values.size:
      mean[key], std[key] = float(np.mean(values)), float(np.std(values))
  # Adaptation diagnostics: meta-learners only (seeds replayed from an older run may
  # lack them); a value is null where it is undefined.
  adaptation = [r["adaptation"] for r in per_seed if r.get("adaptation")]
  if adaptation:
    mean["adaptation"], std["adaptation"] = {}, {}
    for key in diagnostics.ADAPTATION_KEYS:
      values = np.array([a[key] for a in adaptation if a.get(key) is not None], np.float64)
      mean["adaptation"][key] = float(np.mean(values)) if values.size else None
      std["adaptation"][key] = float(np.std(values)) if values.size else None
  groups = per_seed[0].get("group", {})
  mean["group"], std["group"] = {}, {}
  for g in groups:
    mean["group"][g], std["group"][g] = {}, {}
    for key, value in groups[g].items():
      if isinstance(value, str):  # the group's name
        mean["group"][g][key] = std["group"][g][key] = value
        continue
      values = np.array([r["group"][g][key] for r in per_seed], dtype=np.float64)
      mean["group"][g][key], std["group"][g][key] = float(np.mean(values)), float(np.std(values))
  return {"mean": mean, "std": std}


def format_table(results: dict, meta: dict) -> str:
  """The finished run's numbers as a small text table."""
  cfg = results["config"]
  names = (meta.get("sensitive") or {}).get("groups") or []
  name = cfg["method"] if cfg["method"] in config_lib.BASELINES else \
      f"{cfg['backbone']}+{cfg['method']}"
  lines = [f"{name} on {meta.get('dataset', cfg['dataset'])}, "
           f"{len(results['per_seed'])} seed(s): mean ± std (ddof=0)"]
  lines.append("  ".join(f"{k:>15s}" for k in SUMMARY_KEYS))
  lines.append("  ".join(f"{results['mean'][k]:7.3f} ± {results['std'][k]:5.3f}"
                         for k in SUMMARY_KEYS))
  for g, vals in results["mean"]["group"].items():
    label = names[int(g)] if int(g) < len(names) else g
    lines.append(f"group {g} ({label}, n={vals['n']:.0f}): " + ", ".join(
        f"{k} {vals[k]:.3f}" for k in METRIC_KEYS if k in vals))
  if "adaptation" in results["mean"]:
    summary = {k: float("nan") if v is None else v
               for k, v in results["mean"]["adaptation"].items()}
    lines.append(diagnostics.format_line(summary, results["mean"]["mae"]))
  if "auc_attack" in results["mean"]:
    lines.append(f"attacker AUC: {results['mean']['auc_attack']:.3f} ± "
                 f"{results['std']['auc_attack']:.3f}")
  else:
    notes = {r["auc_attack_note"] for r in results["per_seed"] if r.get("auc_attack_note")}
    if notes:
      lines.append(f"attacker AUC: n/a ({'; '.join(sorted(notes))})")
  return "\n".join(lines)


