"""A batch split across two (CPU) devices gives the same training epoch as one device."""

import os
import pathlib
import subprocess
import sys
import textwrap

from conftest import FAST_COMPILE_FLAG, SMALL

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The suite's compile flag where this XLA has it (conftest), without the device count of
# XLA_FLAGS: each test sets the devices its processes have.
COMPILE_FLAGS = FAST_COMPILE_FLAG if FAST_COMPILE_FLAG in os.environ["XLA_FLAGS"] else ""

SCRIPT = textwrap.dedent("""
    import jax, numpy as np, chex
    import data_prep
    from fast_jax.config import Config, resolve
    from fast_jax.dataset import load_prepared
    from fast_jax.runner import Runner
    assert jax.device_count() == 2, jax.devices()
    data = load_prepared(data_prep.ensure_prepared("synthetic", cache_dir={cache!r},
                                                   progress=False, **{small!r}))
    results = {{}}
    for parallel in (False, True):
      runner = Runner(resolve(Config(dataset="synthetic", method="fast", lr=1e-3,
                                     data_parallel=parallel)), data)
      assert (runner.ctx.mesh is not None) == parallel
      state = runner.method.init(jax.random.key(0))
      state, metrics = runner.method.epoch(state, runner.ctx.splits["train"],
                                           jax.random.key(1))
      results[parallel] = (jax.device_get(state.params), np.asarray(state.p),
                           np.asarray(metrics["loss"]))
    sharded_leaf = jax.tree.leaves(state.params)[0]
    assert len(sharded_leaf.sharding.device_set) == 2
    chex.assert_trees_all_close(results[True], results[False], rtol=2e-4, atol=2e-5)
    print("OK")
""")


def test_sharded_epoch_equals_the_unsharded_one(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {COMPILE_FLAGS}"}
  proc = subprocess.run([sys.executable, "-c", SCRIPT.format(cache=str(tmp_path), small=SMALL)],
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one_and_only_process_0_writes(tmp_path, prepared):
  """The multi-host launch on one host: two run.py processes (one CPU device each, Gloo
  collectives) joined by --coordinator split each batch's users between them. Their run
  gives the single-process results, and only process 0 writes files."""
  import json

  import numpy as np

  import data_prep
  from fast_jax.config import Config
  from fast_jax.experiment import train_and_evaluate
  data_prep.ensure_prepared("synthetic", cache_dir=tmp_path, progress=False)
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         "FAST_JAX_CACHE": str(tmp_path), "XLA_FLAGS": COMPILE_FLAGS}
  settings = ["--dataset", "synthetic", "--epochs", "1", "--seeds", "1", "--batch-size", "16",
              "--lr", "1e-3", "--no-attack", "--quiet"]
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(ROOT / "experiments" / "run.py"), *settings,
       "--out", str(tmp_path / f"out{i}"), "--coordinator", f"127.0.0.1:{port}",
       "--num-processes", "2", "--process-id", str(i)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in (0, 1)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert not (tmp_path / "out1").exists()
  assert "mae" in outs[0][0] and "mae" not in outs[1][0]  # only process 0 prints the table
  two = json.loads((tmp_path / "out0" / "results.json").read_text())
  cfg = Config(dataset="synthetic", epochs=1, seeds=1, batch_size=16, lr=1e-3, attack=False)
  one = train_and_evaluate(cfg, data=prepared("synthetic"), progress=False,
                           echo=lambda text: None)
  for key in ("mae", "mse", "gf_mae", "gf_mse"):
    np.testing.assert_allclose(two["mean"][key], one["mean"][key], rtol=1e-4, atol=1e-6)
