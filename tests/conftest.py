"""Shared fixtures: the shared real data and prepared datasets, once per session.

``prepared(name, protocol=None, **options)`` prepares a dataset into a session cache on
first use and returns the loaded :class:`fast_jax.dataset.TaskData`; later calls reuse it.
Real datasets read ``<project root>/../shared/data`` (override with
``$FAST_JAX_SHARED_DATA``) and skip when it is absent; ``synthetic`` needs no files.
Tests never download: ``$FAST_JAX_OFFLINE`` is set for the session.
"""

from __future__ import annotations

import os
import pathlib

import pytest

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]

# XLA's CPU fusion emitters off for the suite (this process, the xdist workers and the
# tests' subprocesses): on its small programs compiling dominates, and without them a
# CLOVER step compiles in 3.6 s instead of 6.3 s (optimised: 6.5 s instead of 11.1 s,
# its steps 20% slower). Set before JAX starts its backend, and only where this XLA knows
# the flag (an unknown flag aborts it): probed once, by the first process.
FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"
if "FAST_JAX_TEST_XLA_FLAGS" not in os.environ:
  import subprocess
  import sys
  flags = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAG}".strip()
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1)"],
                         env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"},
                         capture_output=True)
  os.environ["FAST_JAX_TEST_XLA_FLAGS"] = flags if probe.returncode == 0 else os.environ.get(
      "XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = os.environ["FAST_JAX_TEST_XLA_FLAGS"]

from data_prep import ensure_prepared
from fast_jax.dataset import load_prepared


def pytest_configure(config):
  """With ``-n`` (pytest-xdist), each test file's tests run in one worker (``--dist
  loadfile`` in place of xdist's default ``load``), so a module fixture (prepared
  folders, executed notebooks, compiled programs) is built once. Set here rather than in
  ``addopts``, so that pytest without xdist still runs the suite."""
  if getattr(config.option, "dist", "no") == "load":
    config.option.dist = "loadfile"
    config.option.loadscopereorder = False  # the files in HEAVY_FIRST's order instead


# The test files, the longest first (their seconds with `-n 2` on a 2-core machine,
# 2026-12-04: test_resume 203, test_train 129, ... test_tune 0). pytest-xdist hands whole
# files to the two workers in this order, so the long files start first and the short ones
# even out the end: longest-first list scheduling, against xdist's default of the files
# with the most tests first, which left one worker idle for 53 s at the end. A file missing
# here runs after these; a stale order costs only balance.
HEAVY_FIRST = [
    "test_resume.py", "test_train.py", "test_clover.py", "test_methods.py", "test_safety.py",
    "test_rows.py", "test_bench.py", "test_query_first.py", "test_kernel_form.py",
    "test_sharding.py", "test_drivers.py", "test_presets.py", "test_compile_cache.py",
    "test_cli_errors.py", "test_notebooks.py", "test_packaging.py", "test_baselines.py",
    "test_eval_chunks.py", "test_docs.py", "test_predictions.py", "test_data_prep.py",
    "test_meta.py", "test_reg_ipw.py", "test_user_tower.py", "test_fairness.py",
    "test_attack.py", "test_metrics.py", "test_download.py", "test_dataset.py",
    "test_diagnostics.py", "test_tune.py",
]


def pytest_collection_modifyitems(config, items):
  """The files in :data:`HEAVY_FIRST`'s order (each file's tests in their own order)."""
  rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def shared_data_path() -> pathlib.Path:
  return pathlib.Path(os.environ.get("FAST_JAX_SHARED_DATA")
                      or PROJECT_ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  """One persistent XLA compilation cache for the session, shared by the pytest-xdist
  workers and the tests' subprocesses: the many tests that build the same small programs
  compile them once. (JAX's cache keys hold the cache folder, so the workers share
  programs only through one folder.)"""
  import jax
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # the session's folder, above each worker's own
  folder = base / "jax_compilation_cache"
  folder.mkdir(exist_ok=True)
  folder = str(folder)
  before = {k: getattr(jax.config, k) for k in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
      "jax_persistent_cache_min_entry_size_bytes")}
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAX_COMPILATION_CACHE_DIR", folder)
    mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    yield
  for k, v in before.items():
    jax.config.update(k, v)


@pytest.fixture(scope="session", autouse=True)
def _no_downloads():
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("FAST_JAX_OFFLINE", "1")
    mp.delenv("FAST_JAX_DATA_URL", raising=False)
    yield


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
  path = shared_data_path()
  if not path.is_dir():
    pytest.skip(f"shared data not found at {path} (set FAST_JAX_SHARED_DATA)")
  return path


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("fast_jax_cache")


@pytest.fixture(scope="session")
def prepared(data_cache):
  """prepared(name, protocol=None, **options) -> TaskData, memoised for the session."""
  memo = {}

  def get(name: str, protocol: str | None = None, **options):
    key = (name, protocol, tuple(sorted(options.items())))
    if key not in memo:
      data_dir = None
      if name not in ("synthetic", "custom"):
        data_dir = shared_data_path()
        if not data_dir.is_dir():
          pytest.skip(f"shared data not found at {data_dir} (set FAST_JAX_SHARED_DATA)")
      folder = ensure_prepared(name, protocol=protocol, data_dir=data_dir, cache_dir=data_cache,
                               progress=False, **options)
      memo[key] = load_prepared(folder)
    return memo[key]

  return get


# A small synthetic dataset for runs through the whole runner.
TINY = dict(num_minority=12, num_majority=36)
# 200 users in place of the default 750, for tests that compare runs with each other:
# compiling, not the number of users, is what they need.
SMALL = dict(num_minority=40, num_majority=160)


@pytest.fixture(scope="session", autouse=True)
def _fast_compilation():
  """XLA without most optimisations, in this process and the tests' subprocesses: on the
  suite's tiny runs compiling, not running, dominates (the whole suite ran 548 s instead
  of 618 s). A test marked ``optimized`` compiles as users do."""
  import jax
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(autouse=True)
def _optimized_when_marked(request):
  if request.node.get_closest_marker("optimized") is None:
    yield
    return
  import jax
  jax.config.update("jax_disable_most_optimizations", False)
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
    yield
  jax.config.update("jax_disable_most_optimizations", True)


def cli_env(cache: pathlib.Path, **extra) -> dict:
  """The environment of a command-line subprocess: this project first on PYTHONPATH,
  ``cache`` as its cache folder, offline, on the CPU, and no data URL or data folder from
  the caller's environment unless ``extra`` (added last) sets one."""
  env = dict(os.environ, FAST_JAX_OFFLINE="1", FAST_JAX_CACHE=str(cache),
             JAX_PLATFORMS="cpu", **extra)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
  for key in ("FAST_JAX_DATA_URL", "FAST_JAX_DATA_DIR"):
    if key not in extra:
      env.pop(key, None)
  return env


def assert_one_line_error(result, *names: str, program: str) -> str:
  """Exit code 2 and exactly one stderr line `<program>: error: ...` (argparse's form)
  naming each of ``names``; ``program``: the command's name the line must start with."""
  lines = result.stderr.splitlines()
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith(f"{program}: error: "), (
      program, result.stderr[-2000:])
  for name in names:
    assert name in lines[0], (name, lines[0])
  return lines[0]
