"""Atomic, checksummed per-seed checkpoints (flax msgpack serialization, temp file + rename).

A checkpoint holds everything needed to continue a seed exactly: the train state
(params, optimizer states, p, learned inner rate, step counter, method state), the
best-validation state and score, the last finished epoch, and the epoch records
already logged. PRNG keys are not stored: every epoch's key is
``fold_in(key(seed), epoch)``, so it follows from the seed and the epoch.

File layout: the line ``fast-jax checkpoint 1 sha256=<hex>\\n``, then the msgpack
payload whose SHA-256 the line holds. A checkpoint whose payload does not match its
checksum (flipped bytes, a truncated copy) is refused with a :class:`CheckpointError`
naming the file, instead of resuming silently with other numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
from typing import Any

from flax import serialization

from fast_jax.config import UsageError
from fast_jax.files import write_bytes_atomic

_HEADER = re.compile(rb"fast-jax checkpoint 1 sha256=([0-9a-f]{64})\n")


class CheckpointError(UsageError):
  """A checkpoint that cannot be used (corrupt, truncated, from another configuration);
  reported as one line naming the file."""


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
    payload = serialization.msgpack_serialize(
        {"state": serialization.to_state_dict(state),
         "best_state": serialization.to_state_dict(best_state),
         "best_score": float(best_score), "epoch": int(epoch), "records": json.dumps(records)})
    header = b"fast-jax checkpoint 1 sha256=%s\n" % hashlib.sha256(payload).hexdigest().encode()
    write_bytes_atomic(self.path, header + payload)

  def payload(self) -> dict:
    """The verified raw payload (nested dicts of arrays); CheckpointError if the file is
    unreadable or its checksum does not match."""
    try:
      blob = self.path.read_bytes()
    except OSError as e:
      raise CheckpointError(f"checkpoint {self.path} cannot be read ({e.strerror or e})") from None
    head = _HEADER.match(blob[:120])
    if head is None:
      raise CheckpointError(f"checkpoint {self.path} has no fast-jax checksum line (truncated, "
                            "or written by an older fast-jax); delete it to train that seed "
                            "again from its start")
    body = blob[head.end():]
    if hashlib.sha256(body).hexdigest() != head.group(1).decode():
      raise CheckpointError(f"checkpoint {self.path} is corrupt (its sha256 does not match "
                            "the checksum stored in it); delete it to train that seed again "
                            "from its start")
    try:
      payload = serialization.msgpack_restore(body)
      json.loads(payload["records"])
      int(payload["epoch"]), float(payload["best_score"])
      payload["state"], payload["best_state"]
    except Exception as e:  # noqa: BLE001 -- msgpack raises many kinds on bad input
      raise CheckpointError(f"checkpoint {self.path} is unreadable ({type(e).__name__}); "
                            "delete it to train that seed again from its start") from None
    return payload

  def epoch(self) -> int:
    """The last epoch the (verified) checkpoint holds."""
    return int(self.payload()["epoch"])

  def restore(self, template_state: Any) -> dict:
    """Load into the structure of ``template_state``.

    Returns:
      {"state", "best_state", "best_score", "epoch", "records"}.
    Raises:
      CheckpointError: a corrupt file, or one from another configuration.
    """
    payload = self.payload()
    try:
      state, best = (_with_hypers_of(template_state, payload[k]) for k in ("state", "best_state"))
      return {"state": serialization.from_state_dict(template_state, state),
              "best_state": serialization.from_state_dict(template_state, best),
              "best_score": float(payload["best_score"]), "epoch": int(payload["epoch"]),
              "records": json.loads(payload["records"])}
    except (KeyError, ValueError, TypeError) as e:
      raise CheckpointError(f"checkpoint {self.path} is from another configuration "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                            "delete it to train that seed again from its start") from None


def _with_hypers_of(template_state: Any, saved: Any) -> Any:
  """The saved state with the template's value for any hyperparameter the checkpoint does
  not hold (``state.hyper``: a checkpoint written before Origin, Reg, IPW and FAST shared
  one program has no ``row``, which the run's configuration gives)."""
  template = serialization.to_state_dict(template_state)
  if not (isinstance(saved, dict) and isinstance(template, dict)
          and isinstance(saved.get("hyper"), dict) and isinstance(template.get("hyper"), dict)):
    return saved
  return {**saved, "hyper": {**template["hyper"], **saved["hyper"]}}
