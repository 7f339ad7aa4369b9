"""The run folder of one configuration: its files, how they are written, who may write.

``config.json`` (every setting, the data, library versions and the git commit),
``metrics.jsonl`` (one JSON object per epoch and seed), ``results.json`` (per-seed test
metrics and their mean / std), ``seeds/seed-S.json`` (a finished seed's report and epoch
records), ``predictions/seed-S.csv`` (a finished seed's test query rows, :func:`predictions_csv`)
and ``checkpoints/seed-S.msgpack`` (an unfinished seed, with a checksum).

The rules that keep a folder from being corrupted:

* Files are written atomically (temporary file, then rename), with the mode ``open``
  gives (0644 under the usual umask 022), so colleagues on a shared file system can read
  them.
  A failed write (a full disk) is one line naming the file; the files already there stay
  intact.
* One run at a time: a run holds an advisory lock (``fcntl.flock``) on ``.lock`` in the
  folder for its life; the OS releases it when the process ends, even on a crash. A
  second run on the folder is refused.
* A folder that holds a run is continued only with ``resume=True`` and replaced only
  with ``overwrite=True`` (which removes the old result files first); otherwise refused.
* A resume checks ``config.json``, every ``seeds/*.json`` and every checkpoint before it
  changes anything on disk, then removes the temporary files a killed run left behind.
"""

from __future__ import annotations

import errno
import fcntl
import dataclasses
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
from typing import Any

import numpy as np

from fast_jax import config as config_lib
from fast_jax.checkpoint import SeedCheckpoint
from fast_jax.config import Config, UsageError
from fast_jax.files import jsonable as _jsonable
from fast_jax.files import reason, write_bytes_atomic, write_json_atomic, writing

LOCK_NAME = ".lock"
# What a run writes into its folder (wall_time.txt: fast_jax.cli.grid's timing note).
RUN_ENTRIES = ("config.json", "metrics.jsonl", "results.json", "seeds", "checkpoints",
               "predictions", "wall_time.txt")
# Temporary files of the atomic writes (".results.json.x1y2.tmp", ".seed-3.msgpack.x1y2")
# and the writability probe, left behind when a run is killed mid-write.
_TEMPORARY = re.compile(r"^\.(?:.+\.(?:json|jsonl|msgpack|csv)\..+|write_test)$")
_HELD: dict[str, Any] = {}  # real path of a run folder -> this process's open lock file


class RunFolder:
  """The result files of one run in ``out``; does nothing when ``out`` is None.

  Opening it locks the folder, writes ``config.json`` and starts ``metrics.jsonl``. A
  folder that already holds a run needs ``resume=True`` (continue it, refusing other
  settings: finished seeds are kept in ``seeds/seed-S.json`` and unfinished ones in
  ``checkpoints/``) or ``overwrite=True`` (remove its result files and start afresh).

  ``write=False`` (the other processes of a multi-process job) writes nothing and takes
  no lock; it reads the folder only to resume, which then needs the folder on a shared
  file system.

  Raises:
    UsageError: another run holds the folder, the folder holds a run and neither
      ``resume`` nor ``overwrite`` is given, or a resume finds a file it cannot use.
  """

  def __init__(self, out: str | os.PathLike | None, cfg: Config, data, *, resume: bool,
               overwrite: bool = False, write: bool = True):
    self.out = pathlib.Path(out) if out is not None else None
    self.write = write
    if resume and overwrite:
      raise UsageError("--resume and --overwrite exclude each other: continue the run in "
                       "--out, or replace it")
    if resume and self.out is None:
      raise UsageError("--resume needs --out: the folder of the run to continue")
    if not write and not resume:
      self.out = None  # nothing to read: the writer is starting this folder afresh
    if self.out is None or not write:
      return
    _prepare_out(self.out)
    _lock(self.out)
    record = run_record(cfg, data)
    if resume:
      before = check_resumable(self.out, record)
      # a resume at another commit keeps the commits that trained the earlier seeds
      commits = [*before.get("earlier_commits", []), before.get("git_commit")]
      earlier = [c for c in dict.fromkeys(commits) if c and c != record["git_commit"]]
      if earlier:
        record["earlier_commits"] = earlier
    else:
      held = holds_run(self.out)
      if held is not None and not overwrite:
        raise UsageError(f"--out {self.out} already holds a run ({held}); add --resume to "
                         "continue it, --overwrite to replace it, or choose another --out")
      for name in RUN_ENTRIES:
        _remove(self.out / name)
    remove_temporary_files(self.out)
    write_json_atomic(self.out / "config.json", record)
    _write_text(self.out / "metrics.jsonl", "")

  def log(self, record: dict) -> None:
    if self.out is not None and self.write:
      path = self.out / "metrics.jsonl"
      with writing(path), open(path, "a") as f:
        f.write(json.dumps(_jsonable(record)) + "\n")

  def finished_seed(self, seed: int) -> dict | None:
    """``{"report", "records"}`` of a seed finished before a resume, else None."""
    path = self.out / "seeds" / f"seed-{seed}.json" if self.out is not None else None
    return _read_seed_file(path) if path is not None and path.exists() else None

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
    return SeedCheckpoint(self.out, seed, read_only=not self.write) if (
        self.out is not None) else None

  def save_seed(self, entry: dict, records: list[dict], predictions: dict | None = None) -> None:
    """File a finished seed: its test predictions (``predictions/seed-S.csv``), then its
    report and records (``seeds/seed-S.json``, which marks it finished for a resume)."""
    if self.out is not None and self.write:
      if predictions is not None:
        write_bytes_atomic(self.out / "predictions" / f"seed-{entry['seed']}.csv",
                           predictions_csv(predictions))
      with writing(self.out / "seeds"):
        (self.out / "seeds").mkdir(exist_ok=True)
      write_json_atomic(self.out / "seeds" / f"seed-{entry['seed']}.json",
                        {"report": entry, "records": records})

  def write_results(self, results: dict) -> None:
    """Write ``results.json`` (atomically); the run is complete, so release the folder."""
    if self.out is not None and self.write:
      write_json_atomic(self.out / "results.json", results)
      self.release()

  def release(self) -> None:
    """Let other runs use the folder (also done by the OS when the process ends)."""
    if self.out is not None and self.write:
      f = _HELD.pop(os.path.realpath(self.out), None)
      if f is not None:
        f.close()


PREDICTION_COLUMNS = ("user_id", "group", "item_row", "y", "y_hat", "y_hat_unadapted")


def predictions_csv(columns: dict) -> bytes:
  """``predictions/seed-S.csv``: a header of :data:`PREDICTION_COLUMNS`, then one line per
  test query row (:meth:`fast_jax.runner.Runner.predictions`). Predictions are written with
  9 significant digits, which a float32 survives exactly; ``y_hat_unadapted`` is empty
  for a method without an inner loop."""
  n = len(columns["y"])
  unadapted = columns.get("y_hat_unadapted")
  cells = {"user_id": [str(int(v)) for v in columns["user_id"]],
           "group": [_csv_field(str(v)) for v in columns["group"]],
           "item_row": [str(int(v)) for v in columns["item_row"]],
           "y": [f"{float(v):.9g}" for v in columns["y"]],
           "y_hat": [f"{float(v):.9g}" for v in columns["y_hat"]],
           "y_hat_unadapted": ([""] * n if unadapted is None
                               else [f"{float(v):.9g}" for v in unadapted])}
  lines = [",".join(PREDICTION_COLUMNS)]
  lines += [",".join(cells[c][i] for c in PREDICTION_COLUMNS) for i in range(n)]
  return ("\n".join(lines) + "\n").encode()


def _csv_field(text: str) -> str:
  return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def holds_run(out: pathlib.Path) -> str | None:
  """The first result file or folder of a run in ``out`` (an empty metrics.jsonl does
  not count), or None."""
  for name in RUN_ENTRIES:
    path = out / name
    if path.exists() and not (path.is_file() and path.stat().st_size == 0):
      return name
  return None


def check_resumable(out: pathlib.Path, record: dict) -> dict:
  """Everything a resume of ``record`` in ``out`` reads, checked before anything changes:
  ``config.json`` is readable and holds the same settings (or fewer seeds of the same
  list: a run of more seeds extends it), every ``seeds/*.json`` is readable, and every
  checkpoint matches its checksum. Returns the run's config.json.

  Raises:
    UsageError: naming the file and what to do.
  """
  path = out / "config.json"
  if not path.exists():
    raise UsageError(f"--resume: {out} holds no run to continue (no config.json)")
  try:
    before = json.loads(path.read_text())
    if not isinstance(before, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as e:
    raise UsageError(f"--resume: {path} is unreadable ({reason(e)}); the run cannot be "
                     "continued: start it again with --overwrite") from None
  _check_same_settings(out, before, record)
  for seed_file in sorted((out / "seeds").glob("seed-*.json")):
    _read_seed_file(seed_file)
  for ckpt in sorted((out / "checkpoints").glob("seed-*.msgpack")):
    seed = ckpt.name[len("seed-"):-len(".msgpack")]
    SeedCheckpoint(out, int(seed) if seed.isdigit() else seed).payload()
  return before


def _check_same_settings(out: pathlib.Path, before: dict, record: dict) -> None:
  """--resume continues only a run of the same configuration, or adds seeds to it (the
  seeds are a prefix of one fixed list, so a run of more seeds extends it)."""
  # data_dir says where the raw files were found; the data itself is compared ("data")
  skip = {"versions", "git_commit", "checkpoint_every", "length_parts", "eval_chunk",
          "data_dir"}
  old_seeds = before.get("seed_list")
  if old_seeds is not None and _jsonable(record["seed_list"])[:len(old_seeds)] == old_seeds:
    skip |= {"seeds", "seed_list"}  # the same seeds first, maybe more after them
  changed = changed_settings(before, record, skip)
  if changed:
    k, (was, now) = next(iter(changed.items()))
    raise UsageError(f"--resume: the run in {out} used {k}={was!r}, not {now!r}; resume "
                     "with the same settings or use a new --out")


def changed_settings(before: dict, record: dict, skip=frozenset()) -> dict[str, tuple]:
  """The settings of ``record`` (a config.json, or ``Config.to_dict()``) that a recorded
  run's ``before`` does not share, leaving out ``skip``: {setting: (its value then, its
  value in ``record``)}, in ``record``'s order. A setting missing from an older record did
  not exist when that run was made: it ran with what is now the setting's default, so
  that value is its value then."""
  defaults = _defaults_for(before, record)
  then = {k: before[k] if k in before else defaults.get(k) for k in record if k not in skip}
  return {k: (was, _jsonable(record[k])) for k, was in then.items()
          if _jsonable(record[k]) != was}


def _defaults_for(before: dict, record: dict) -> dict:
  """The resolved defaults of the settings ``before`` (an older config.json) lacks, given
  the settings it has."""
  missing = [k for k in record if k not in before]
  if not missing:
    return {}
  fields = {f.name for f in dataclasses.fields(Config)}
  try:
    settings = {k: v for k, v in before.items() if k in fields}
    cfg = config_lib.resolve(Config(**{**settings, "preset": config_lib.preset_of(before)}),
                             (before.get("data") or {}).get("dataset"))
  except (TypeError, ValueError):
    return {}
  return {k: _jsonable(getattr(cfg, k)) for k in missing if k in fields}


def _read_seed_file(path: pathlib.Path) -> dict:
  """``{"report", "records"}`` of a finished seed's file; UsageError naming a bad one."""
  try:
    saved = json.loads(path.read_text())
    if not (isinstance(saved, dict) and isinstance(saved.get("report"), dict)
            and isinstance(saved.get("records"), list)):
      raise ValueError("expected {\"report\": {...}, \"records\": [...]}")
  except (OSError, ValueError) as e:
    raise UsageError(f"--resume: {path} is unreadable ({reason(e)}); delete it to train "
                     "that seed again") from None
  return saved


def saved_state(out: pathlib.Path) -> str:
  """What an interrupted run left in ``out``, in words: finished seeds and checkpoints."""
  done = sorted(int(p.stem[5:]) for p in (out / "seeds").glob("seed-*.json")
                if p.stem[5:].isdigit())
  parts = [f"seed{'s' * (len(done) > 1)} {', '.join(map(str, done))} finished"] if done else []
  for ckpt in sorted((out / "checkpoints").glob("seed-*.msgpack")):
    seed = ckpt.stem[5:]
    if seed.isdigit() and int(seed) not in done:
      try:
        parts.append(f"seed {seed} checkpointed at epoch "
                     f"{SeedCheckpoint(out, int(seed)).epoch()}")
      except UsageError:
        pass
  return "; ".join(parts)


def remove_temporary_files(out: pathlib.Path) -> list[pathlib.Path]:
  """Delete the temporary files that killed writes left in ``out`` and its ``seeds``,
  ``checkpoints`` and ``predictions``; return them."""
  removed = []
  for folder in (out, out / "seeds", out / "checkpoints", out / "predictions"):
    if folder.is_dir():
      for path in folder.iterdir():
        if _TEMPORARY.match(path.name) and path.is_file():
          path.unlink(missing_ok=True)
          removed.append(path)
  return removed


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


def _write_text(path: pathlib.Path, text: str) -> None:
  with writing(path):
    path.write_text(text)


def _remove(path: pathlib.Path) -> None:
  with writing(path):
    if path.is_dir() and not path.is_symlink():
      shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
      path.unlink()


def _lock(out: pathlib.Path) -> None:
  """Hold an exclusive advisory lock on ``out/.lock`` until the process ends (or
  :meth:`RunFolder.release`). A folder this process holds already is taken over: a run
  that failed in this process (a notebook, a test) does not block the next one."""
  key = os.path.realpath(out)
  if key in _HELD and not _HELD[key].closed:
    return
  path = out / LOCK_NAME
  with writing(path):
    f = open(path, "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip()
    f.close()
    raise UsageError(f"--out {out}: another run is using this folder ({holder or 'a process'}"
                     f" holds {path}); wait for it to end, or choose another --out") from None
  except OSError as e:  # a file system without locks (some NFS): run unlocked
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
      f.close()
      raise
  f.seek(0)
  f.truncate()
  f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
  f.flush()
  _HELD[key] = f


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
