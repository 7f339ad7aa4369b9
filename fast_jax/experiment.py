"""Run one configuration for N seeds and write the result files of DESIGN.md.

``train_and_evaluate(cfg, out_dir)`` is what ``experiments/run.py`` and the notebooks
call. It writes into ``out_dir``:

* ``config.json``: every setting used, library versions and the git commit;
* ``metrics.jsonl``: one JSON object per epoch and seed;
* ``results.json``: per-seed test metrics with per-group values, and mean / population
  std (ddof = 0) over seeds.

Files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Callable

import numpy as np

from fast_jax import config as config_lib
from fast_jax.config import Config
from fast_jax.metrics import METRIC_KEYS

SUMMARY_KEYS = tuple(METRIC_KEYS) + tuple(f"gf_{k}" for k in METRIC_KEYS)
ATTACK_KEYS = ("auc_attack", "auc_attack_max")  # fast_jax.attack; null when not applicable


class UsageError(ValueError):
  """A bad setting or input, reported to the user as one line (exit code 2)."""


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
  import data_prep
  folder = data_prep.ensure_prepared(cfg.dataset, data_dir=cfg.data_dir, protocol=cfg.protocol,
                                     progress=progress)
  return load_prepared(folder)


def check_config(cfg: Config) -> None:
  """Reject flag values that cannot work, with a clear message, before any data is read."""
  if cfg.backbone not in config_lib.BACKBONES:
    raise UsageError(f"--backbone {cfg.backbone!r}: expected one of {config_lib.BACKBONES}")
  if cfg.method not in config_lib.METHODS:
    raise UsageError(f"--method {cfg.method!r}: expected one of {config_lib.METHODS}")
  for name in ("gamma", "tau"):
    value = getattr(cfg, name)
    if value is not None and not value >= 0:  # also NaN
      raise UsageError(f"--{name} must be >= 0, got {value}")
  if cfg.tau is not None and cfg.tau > 1:
    raise UsageError(f"--tau caps a change of a probability and must be <= 1, got {cfg.tau}")
  for name in ("epochs", "seeds", "batch_size", "inner_steps", "length_parts"):
    if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
      raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
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


def make_runner(cfg: Config, data):
  """An object with ``run_seed(seed, log=..., progress=...) -> (state, test_report)``."""
  if cfg.method in config_lib.BASELINES:
    from fast_jax import baselines
    return baselines.make_runner(cfg, data)
  if cfg.method == "clover":
    from fast_jax import clover
    return clover.make_runner(cfg, data)
  from fast_jax.train import Trainer
  return Trainer(cfg, data)


class RunFolder:
  """The result files of one run in ``out`` (DESIGN.md); does nothing when ``out`` is None.

  Opening it writes ``config.json`` and starts ``metrics.jsonl``. With ``resume=True`` it
  continues a run of the same settings (refusing other settings): finished seeds are kept
  in ``seeds/seed-S.json`` and unfinished ones in ``checkpoints/``.

  ``write=False`` (the other processes of a multi-process job) writes nothing; it reads
  the folder only to resume, which then needs the folder on a shared file system.
  """

  def __init__(self, out: str | os.PathLike | None, cfg: Config, data, *, resume: bool,
               write: bool = True):
    self.out = pathlib.Path(out) if out is not None else None
    self.write = write
    if resume and self.out is None:
      raise UsageError("--resume needs --out: the folder of the run to continue")
    if not write and not resume:
      self.out = None  # nothing to read: the writer is starting this folder afresh
    if self.out is None or not write:
      return
    _prepare_out(self.out)
    record = run_record(cfg, data)
    if resume:
      before = _check_same_settings(self.out, record)
      # a resume at another commit keeps the commits that trained the earlier seeds
      commits = [*before.get("earlier_commits", []), before.get("git_commit")]
      earlier = [c for c in dict.fromkeys(commits) if c and c != record["git_commit"]]
      if earlier:
        record["earlier_commits"] = earlier
    else:
      for stale in ("checkpoints", "seeds"):
        shutil.rmtree(self.out / stale, ignore_errors=True)
    write_json_atomic(self.out / "config.json", record)
    (self.out / "metrics.jsonl").write_text("")

  def log(self, record: dict) -> None:
    if self.out is not None and self.write:
      with open(self.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(_jsonable(record)) + "\n")

  def finished_seed(self, seed: int) -> dict | None:
    """``{"report", "records"}`` of a seed finished before a resume, else None."""
    path = self.out / "seeds" / f"seed-{seed}.json" if self.out is not None else None
    return json.loads(path.read_text()) if path is not None and path.exists() else None

  def replay(self, seed: int) -> dict | None:
    """A seed finished before a resume: log its records again and return its report.
    None when the seed has not finished."""
    saved = self.finished_seed(seed)
    if saved is None:
      return None
    for r in saved["records"]:
      self.log(r)
    return saved["report"]

  def checkpoint(self, seed: int):
    from fast_jax.checkpoint import SeedCheckpoint
    return SeedCheckpoint(self.out, seed, read_only=not self.write) if (
        self.out is not None) else None

  def save_seed(self, entry: dict, records: list[dict]) -> None:
    if self.out is not None and self.write:
      (self.out / "seeds").mkdir(exist_ok=True)
      write_json_atomic(self.out / "seeds" / f"seed-{entry['seed']}.json",
                        {"report": entry, "records": records})

  def finish(self, cfg: Config, per_seed: list[dict], diverged: list[dict]) -> dict:
    """Aggregate the seeds and write ``results.json``; return its content."""
    from fast_jax.train import Diverged
    if not per_seed:
      raise Diverged("every seed diverged: " + "; ".join(d["message"] for d in diverged))
    results = {"config": cfg.to_dict(), "per_seed": per_seed, **aggregate(per_seed)}
    if diverged:
      results["diverged"] = diverged
    if self.out is not None and self.write:
      write_json_atomic(self.out / "results.json", results)
    return results


def train_and_evaluate(cfg: Config, out_dir: str | os.PathLike | None = None, *, data=None,
                       progress: bool = True, resume: bool = False,
                       echo: Callable[[str], None] = print) -> dict:
  """Train ``cfg`` for ``cfg.seeds`` seeds, evaluate on the test users, write the files.

  With ``out_dir``, every seed is checkpointed every ``cfg.checkpoint_every`` epochs
  (``checkpoints/seed-S.msgpack``) and a finished seed's report is kept in
  ``seeds/seed-S.json``. ``resume=True`` continues an interrupted run in ``out_dir``:
  finished seeds are not retrained, the unfinished one restarts from its checkpoint, and
  the result files end up identical to an uninterrupted run's.

  A seed whose loss becomes NaN/inf is stopped (its last good checkpoint is kept), named
  in ``results.json["diverged"]`` and left out of the mean; if every seed diverges,
  :class:`fast_jax.train.Diverged` is raised.

  Returns:
    the content of ``results.json``.
  """
  from fast_jax import sharding
  from fast_jax.train import Diverged, Trainer
  check_config(cfg)
  if not sharding.is_writer():  # other processes of a multi-process job: quiet
    progress, echo = False, lambda text: None
  if data is None:
    data = load_dataset(cfg, progress=progress)
  cfg = config_lib.resolve(cfg, data.meta.get("dataset"))
  check_data(cfg, data)
  folder = RunFolder(out_dir, cfg, data, resume=resume, write=sharding.is_writer())
  runner = make_runner(cfg, data)
  if cfg.vmap_seeds and isinstance(runner, Trainer):
    [(per_seed, diverged)] = _run_lanes(runner, [(cfg, folder)], progress=progress)
  else:
    def train(seed: int):
      records: list[dict] = []

      def log_seed(r: dict) -> None:
        records.append(r)
        folder.log(r)
      kwargs = {}
      if folder.out is not None and isinstance(runner, Trainer):
        kwargs = {"checkpoint": folder.checkpoint(seed),
                  "checkpoint_every": cfg.checkpoint_every}
      try:
        return runner.run_seed(seed, log=log_seed, progress=progress, **kwargs)[1], records
      except Diverged as e:
        return e, records
    per_seed, diverged = _collect(folder, config_lib.seed_list(cfg.seeds), train)
  results = folder.finish(cfg, per_seed, diverged)
  echo(format_table(results, data.meta))
  return results


# Config fields a vectorised sweep may vary: they live in the train state, not the program.
SWEEPABLE = ("gamma", "tau")


def sweep_and_evaluate(cfgs: list[Config], out_dirs: list | None = None, *, data=None,
                       progress: bool = True, echo: Callable[[str], None] = print) -> list[dict]:
  """Train configurations that differ only in FAST's ``gamma`` and ``tau`` as one
  vectorised program: each (configuration, seed) is a lane of a ``vmap``-ped epoch.

  Each configuration gets the files of :func:`train_and_evaluate` in its ``out_dirs``
  entry (None: no files); results match running them one by one. A folder holding part
  of a run of the same settings is resumed: its finished seeds are not retrained.

  Returns:
    each configuration's ``results.json`` content, in order.
  """
  from fast_jax.train import Trainer
  if not cfgs:
    return []
  out_dirs = list(out_dirs) if out_dirs is not None else [None] * len(cfgs)
  if len(out_dirs) != len(cfgs):
    raise ValueError(f"{len(cfgs)} configurations but {len(out_dirs)} output folders")
  for cfg in cfgs:
    check_config(cfg)
  if data is None:
    data = load_dataset(cfgs[0], progress=progress)
  cfgs = [config_lib.resolve(c, data.meta.get("dataset")) for c in cfgs]
  base = cfgs[0].to_dict()
  for cfg in cfgs:
    check_data(cfg, data)
    other = {k: v for k, v in cfg.to_dict().items() if k not in SWEEPABLE and v != base[k]}
    if other:
      k = next(iter(other))
      raise UsageError(f"a vectorised sweep varies only {' and '.join(SWEEPABLE)}; "
                       f"{k} is {base[k]!r} in one configuration and {other[k]!r} in another")
  runner = make_runner(cfgs[0], data)
  if not isinstance(runner, Trainer):
    raise UsageError(f"--method {cfgs[0].method} is not meta-learned: it has no "
                     f"vectorised seeds or sweeps")
  from fast_jax import sharding
  folders = [RunFolder(o, c, data, resume=o is not None and
                       (pathlib.Path(o) / "config.json").exists(), write=sharding.is_writer())
             for c, o in zip(cfgs, out_dirs)]
  outcomes = _run_lanes(runner, list(zip(cfgs, folders)), progress=progress)
  results = []
  for cfg, folder, (per_seed, diverged) in zip(cfgs, folders, outcomes):
    results.append(folder.finish(cfg, per_seed, diverged))
    echo(f"gamma={cfg.gamma:g} tau={cfg.tau:g}: " + format_table(results[-1], data.meta))
  return results


def _run_lanes(runner, runs: list[tuple[Config, RunFolder]], *,
               progress: bool) -> list[tuple[list[dict], list[dict]]]:
  """Every unfinished (run, seed) of ``runs`` as one lane of ``runner.run_vmapped``;
  per run, its per-seed reports and diverged seeds, with the folders' seed files written."""
  lanes = [(i, seed) for i, (cfg, folder) in enumerate(runs)
           for seed in config_lib.seed_list(cfg.seeds) if folder.finished_seed(seed) is None]
  records: dict[tuple[int, int], list[dict]] = {lane: [] for lane in lanes}
  reports = runner.run_vmapped(
      [seed for _, seed in lanes], hypers=[(runs[i][0].gamma, runs[i][0].tau) for i, _ in lanes],
      log=lambda k, record: records[lanes[k]].append(record),
      progress=progress) if lanes else []
  by_lane = dict(zip(lanes, reports))

  def collected(i: int, cfg: Config, folder: RunFolder):
    def train(seed: int):
      for r in records[(i, seed)]:
        folder.log(r)
      return by_lane[(i, seed)], records[(i, seed)]
    return _collect(folder, config_lib.seed_list(cfg.seeds), train)
  return [collected(i, cfg, folder) for i, (cfg, folder) in enumerate(runs)]


def _collect(folder: RunFolder, seeds: list[int], train: Callable) -> tuple[list, list]:
  """Per-seed reports and diverged seeds of a run: a seed finished before a resume is
  replayed from its folder, any other comes from ``train(seed) -> (report or Diverged,
  epoch records)`` and is filed (its report kept in ``seeds/``)."""
  from fast_jax.train import Diverged
  per_seed, diverged = [], []
  for seed in seeds:
    done = folder.replay(seed)
    if done is not None:
      per_seed.append(done)
      continue
    outcome, records = train(seed)
    if isinstance(outcome, Diverged):
      print(f"warning: {outcome}", file=sys.stderr)
      diverged.append({"seed": seed, "message": str(outcome)})
      continue
    entry = {"seed": seed, **outcome}
    per_seed.append(entry)
    folder.save_seed(entry, records)
  return per_seed, diverged


def _check_same_settings(out: pathlib.Path, record: dict) -> dict:
  """--resume continues only a run of the same configuration, or adds seeds to it (the
  seeds are a prefix of one fixed list, so a run of more seeds extends it). Returns the
  run's config.json."""
  path = out / "config.json"
  if not path.exists():
    raise UsageError(f"--resume: {out} holds no run to continue (no config.json)")
  before = json.loads(path.read_text())
  skip = {"versions", "git_commit", "checkpoint_every", "length_parts", "eval_chunk"}
  old_seeds = before.get("seed_list")
  if old_seeds is not None and _jsonable(record["seed_list"])[:len(old_seeds)] == old_seeds:
    skip |= {"seeds", "seed_list"}  # the same seeds first, maybe more after them
  changed = [k for k in record if k not in skip and _jsonable(record[k]) != before.get(k)]
  if changed:
    k = changed[0]
    raise UsageError(f"--resume: the run in {out} used {k}={before.get(k)!r}, not "
                     f"{_jsonable(record[k])!r}; resume with the same settings or use a new --out")
  return before


def aggregate(per_seed: list[dict]) -> dict:
  """Mean and population std (ddof = 0) over seeds of every metric, overall and per group."""
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
  groups = per_seed[0].get("group", {})
  mean["group"], std["group"] = {}, {}
  for g in groups:
    mean["group"][g], std["group"][g] = {}, {}
    for key in groups[g]:
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
  if "auc_attack" in results["mean"]:
    lines.append(f"attacker AUC: {results['mean']['auc_attack']:.3f} ± "
                 f"{results['std']['auc_attack']:.3f}")
  else:
    notes = {r["auc_attack_note"] for r in results["per_seed"] if r.get("auc_attack_note")}
    if notes:
      lines.append(f"attacker AUC: n/a ({'; '.join(sorted(notes))})")
  return "\n".join(lines)


def run_record(cfg: Config, data) -> dict:
  """config.json: the settings, the data used, library versions and the git commit."""
  import flax
  import jax
  import optax
  return {
      **cfg.to_dict(),
      "data": {"path": str(getattr(data, "path", "") or ""), "dataset": data.meta.get("dataset"),
               "protocol": data.meta.get("protocol"), "counts": data.meta.get("counts")},
      "seed_list": config_lib.seed_list(cfg.seeds),
      "versions": {"python": sys.version.split()[0], "jax": jax.__version__,
                   "flax": flax.__version__, "optax": optax.__version__,
                   "numpy": np.__version__, "backend": jax.default_backend()},
      "git_commit": _git_commit(),
  }


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
  """Write JSON to a temporary file beside ``path`` and rename it into place."""
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(_jsonable(obj), f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _prepare_out(out: pathlib.Path) -> None:
  try:
    out.mkdir(parents=True, exist_ok=True)
    probe = out / ".write_test"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise UsageError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def _git_commit() -> str | None:
  try:
    root = pathlib.Path(__file__).resolve().parent.parent
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                          text=True, timeout=5).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def _jsonable(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (np.floating, float)):
    return None if not np.isfinite(obj) else float(obj)
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.ndarray):
    return _jsonable(obj.tolist())
  return obj
