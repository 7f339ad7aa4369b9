"""Files written so that nothing is lost: atomically (temporary file, fsync, rename),
readable as ``open`` would make them, and with a full disk reported in one line.

Used by the run folder (:mod:`fast_jax.runfolder`) and the checkpoints
(:mod:`fast_jax.checkpoint`).
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any

import numpy as np

from fast_jax.config import UsageError


class WriteError(UsageError):
  """A result file could not be written (a full disk, a lost mount); one line."""


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
  """Write JSON to a temporary file beside ``path`` and rename it into place."""
  text = json.dumps(jsonable(obj), indent=1)
  write_bytes_atomic(path, text.encode())


def write_text_atomic(path: pathlib.Path, text: str) -> None:
  """:func:`write_bytes_atomic` of ``text`` in UTF-8."""
  write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: pathlib.Path, data: bytes) -> None:
  """Write ``data`` to a temporary file beside ``path``, fsync it and rename it into place,
  readable as ``open`` would make it (0666 less the umask: 0644 under the usual umask 022;
  ``mkstemp`` alone gives 0600).

  Raises:
    WriteError: the write failed (e.g. a full disk); ``path`` keeps its old content and
      no temporary file is left.
  """
  path = pathlib.Path(path)
  with writing(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      os.chmod(tmp, 0o666 & ~_umask())
      os.replace(tmp, path)
    except BaseException:
      pathlib.Path(tmp).unlink(missing_ok=True)
      raise


class writing:
  """Turn an OSError while writing ``path`` into a one-line WriteError."""

  def __init__(self, path: pathlib.Path):
    self.path = path

  def __enter__(self):
    return self

  def __exit__(self, kind, error, tb):
    if isinstance(error, OSError):
      raise WriteError(f"cannot write {self.path} ({reason(error)}); the files already "
                       f"in {self.path.parent} are intact") from None
    return False


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def reason(e: BaseException) -> str:
  if isinstance(e, OSError):
    return e.strerror or str(e)
  text = str(e).splitlines()[0] if str(e) else ""
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def jsonable(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, (np.floating, float)):
    return None if not np.isfinite(obj) else float(obj)
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.ndarray):
    return jsonable(obj.tolist())
  return obj
