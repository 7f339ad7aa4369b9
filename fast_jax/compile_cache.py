"""A persistent XLA compilation cache shared by every run on a machine.

A fast-jax run spends seconds compiling its programs (the epoch scan, the evaluator, the
attacker) and, on ML-100K, as long again training. The programs depend only on the
shapes and the static settings, so the next run of the same configuration (another
seed list, a resume, a ``--jobs`` worker of a table driver) can load them from disk
instead of compiling them again. JAX's own persistent cache does this; :func:`enable`
points it at ``<cache>/xla`` with ``<cache>`` = ``$FAST_JAX_CACHE`` or
``~/.cache/fast_jax`` (the folder the prepared datasets live in).

``FAST_JAX_COMPILATION_CACHE=0`` switches it off; a cache folder the user configured
for JAX (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) is left as it is.
"""

from __future__ import annotations

import os
import pathlib

# Every program gets a disk entry, however fast it compiles: a run's small programs (the
# attacker, the evaluator's helpers, host-side ops) together take about 1 s to compile
# and a few kB each to keep (the main command at 2 seeds x 5 epochs: 57 entries, 1.3 MB;
# its rerun 7.5 s against 8.5 s with the earlier floor of 0.5 s; JAX's default is 1 s).
MIN_COMPILE_SECONDS = 0.0


def default_folder() -> pathlib.Path:
  root = os.environ.get("FAST_JAX_CACHE") or pathlib.Path.home() / ".cache" / "fast_jax"
  return pathlib.Path(root) / "xla"


def enable(folder: str | os.PathLike | None = None) -> str | None:
  """Turn on the persistent compilation cache (idempotent); return its folder, or None
  when it is switched off or the folder cannot be written."""
  import jax
  if os.environ.get("FAST_JAX_COMPILATION_CACHE", "1").lower() in ("0", "off", "false", "no"):
    return None
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  path = pathlib.Path(folder) if folder is not None else default_folder()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError:
    return None  # a read-only home: compile as before
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return str(path)
