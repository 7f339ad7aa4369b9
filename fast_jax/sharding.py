"""Data parallelism: the users of a batch split across all devices.

One 1-D mesh with axis ``"data"`` over ``jax.devices()`` (every local device, and on a
multi-host job every device of every host after ``jax.distributed.initialize()``).
Parameters, optimizer states, p and the dataset are replicated; inside the jitted epoch
each batch is constrained to be split along its user axis, so every device adapts and
scores its share of the users and XLA inserts the all-reduce of the meta-gradient.
The result equals the single-device computation up to floating-point summation order.

Several processes (hosts) run the same program after :func:`init_distributed`; the mesh
then spans every process's devices, and only process 0 writes files.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
  """Join a multi-process (multi-host) job: ``jax.distributed.initialize`` with the given
  coordinator ``host:port``, process count and this process's id, or, all None, with
  what a Slurm, Open MPI or TPU-pod environment provides. On CPU the processes exchange
  gradients through Gloo. Call it before any other JAX work.
  """
  if coordinator is None and (num_processes is not None or process_id is not None):
    raise ValueError("num_processes and process_id need the coordinator address")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)


def is_writer() -> bool:
  """Whether this process writes the result files: process 0 of a multi-process job."""
  return jax.process_index() == 0


def data_mesh(batch_size: int, devices=None) -> Mesh | None:
  """A mesh over the devices that evenly divide ``batch_size``; None for one device."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  while n > 1 and batch_size % n:
    n -= 1
  return Mesh(np.array(devices[:n]), (AXIS,)) if n > 1 else None


def replicate(tree, mesh: Mesh | None):
  """Place every array of ``tree`` (host or device) on all devices of the mesh, or on the
  default device without a mesh: ``jax.device_put``, one transfer, no program compiled
  (``jnp.asarray`` of a host array compiles one per shape)."""
  return jax.device_put(tree, None if mesh is None else NamedSharding(mesh, P()))


def split_users(batch, mesh: Mesh | None):
  """Inside jit: split a batch's leading (user) axis across the mesh."""
  if mesh is None:
    return batch
  return jax.lax.with_sharding_constraint(batch, NamedSharding(mesh, P(AXIS)))
