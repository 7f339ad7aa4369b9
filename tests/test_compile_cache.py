"""The persistent compilation cache serves a run's programs in any later process.

A run's programs must not depend on the process: JAX keys the cache by the program's
text, and a program built by iterating a set of strings changes with each process's
hash seed (``PYTHONHASHSEED``), so that every new process missed the cache. A tiny run
trains twice on one empty cache, in processes with different hash seeds; the second must
compile nothing (JAX names each miss with ``JAX_EXPLAIN_CACHE_MISSES``).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from conftest import cli_env
from data_prep import prepare

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = PROJECT_ROOT / "experiments" / "run.py"
TINY = dict(num_minority=12, num_majority=36)

# (backbone, method): MetaCS's inner step runs in kernel form (fast_jax.models
# .one_step_forward), whose layers once came from a set; MeLU's three steps do not.
SETTINGS = [("metacs", "fast"), ("melu", "origin")]
MISS = "PERSISTENT COMPILATION CACHE MISS"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> pathlib.Path:
  return prepare("synthetic", tmp_path_factory.mktemp("cache") / "tiny", progress=False, **TINY)


def _run(folder, backbone, method, out, cache, hash_seed) -> subprocess.CompletedProcess:
  env = cli_env(cache, PYTHONHASHSEED=str(hash_seed), JAX_EXPLAIN_CACHE_MISSES="1")
  return subprocess.run(
      [sys.executable, str(RUN), "--dataset", str(folder), "--backbone", backbone, "--method",
       method, "--epochs", "1", "--seeds", "1", "--batch-size", "16", "--quiet", "--no-attack",
       "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("backbone,method", SETTINGS)
def test_a_new_process_compiles_nothing_that_an_earlier_one_compiled(tiny, tmp_path, backbone,
                                                                    method):
  cache = tmp_path / "cache"  # empty: this test's runs alone fill it
  first = _run(tiny, backbone, method, tmp_path / "a", cache, hash_seed=1)
  assert first.returncode == 0, first.stderr[-3000:]
  assert MISS in first.stderr  # the check below can see a miss
  second = _run(tiny, backbone, method, tmp_path / "b", cache, hash_seed=2)
  assert second.returncode == 0, second.stderr[-3000:]
  misses = [line for line in second.stderr.splitlines() if MISS in line]
  assert not misses, "\n".join(m[:300] for m in misses)
