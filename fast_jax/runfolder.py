"""The run folder of one configuration (DESIGN.md): its files and how they are written.

``config.json`` (every setting, the data, library versions and the git commit),
``metrics.jsonl`` (one JSON object per epoch and seed), ``results.json`` (per-seed test
metrics and their mean / std), ``seeds/seed-S.json`` (a finished seed's report and epoch
records) and ``checkpoints/seed-S.msgpack`` (an unfinished seed). Files are written
atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

from fast_jax import config as config_lib
from fast_jax.checkpoint import SeedCheckpoint
from fast_jax.config import Config, UsageError


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
    return SeedCheckpoint(self.out, seed, read_only=not self.write) if (
        self.out is not None) else None

  def save_seed(self, entry: dict, records: list[dict]) -> None:
    if self.out is not None and self.write:
      (self.out / "seeds").mkdir(exist_ok=True)
      write_json_atomic(self.out / "seeds" / f"seed-{entry['seed']}.json",
                        {"report": entry, "records": records})

  def write_results(self, results: dict) -> None:
    """Write ``results.json`` (atomically)."""
    if self.out is not None and self.write:
      write_json_atomic(self.out / "results.json", results)


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
