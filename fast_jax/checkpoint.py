"""Atomic per-seed checkpoints (flax msgpack serialization, temp file + rename).

A checkpoint holds everything needed to continue a seed exactly: the train state
(params, optimizer states, p, learned inner rate, step counter, method state), the
best-validation state and score, the last finished epoch, and the epoch records
already logged. PRNG keys are not stored: every epoch's key is
``fold_in(key(seed), epoch)``, so it follows from the seed and the epoch.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any

from flax import serialization


class SeedCheckpoint:
  """The checkpoint file of one seed of a run: ``<run dir>/checkpoints/seed-<seed>.msgpack``."""

  def __init__(self, run_dir: str | os.PathLike, seed: int, *, read_only: bool = False):
    self.path = pathlib.Path(run_dir) / "checkpoints" / f"seed-{seed}.msgpack"
    self.read_only = read_only  # another process of a multi-process job writes it

  def exists(self) -> bool:
    return self.path.exists()

  def save(self, *, state: Any, best_state: Any, best_score: float, epoch: int,
           records: list[dict]) -> None:
    if self.read_only:
      return
    payload = {"state": serialization.to_state_dict(state),
               "best_state": serialization.to_state_dict(best_state),
               "best_score": float(best_score), "epoch": int(epoch),
               "records": json.dumps(records)}
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(serialization.msgpack_serialize(payload))
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)
    except BaseException:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise

  def restore(self, template_state: Any) -> dict:
    """Load into the structure of ``template_state``.

    Returns:
      {"state", "best_state", "best_score", "epoch", "records"}.
    """
    try:
      payload = serialization.msgpack_restore(self.path.read_bytes())
      return {"state": serialization.from_state_dict(template_state, payload["state"]),
              "best_state": serialization.from_state_dict(template_state,
                                                          payload["best_state"]),
              "best_score": float(payload["best_score"]), "epoch": int(payload["epoch"]),
              "records": json.loads(payload["records"])}
    except (KeyError, ValueError, TypeError) as e:
      raise ValueError(f"checkpoint {self.path} is unreadable or from another "
                       f"configuration ({e}); delete it to start the seed again") from None
