"""A batch split across two (CPU) devices gives the same training epoch as one device."""

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import jax, numpy as np, chex
    import data_prep
    from fast_jax.config import Config
    from fast_jax.dataset import load_prepared
    from fast_jax.train import Trainer
    assert jax.device_count() == 2, jax.devices()
    data = load_prepared(data_prep.ensure_prepared("synthetic", cache_dir={cache!r},
                                                   progress=False))
    results = {{}}
    for parallel in (False, True):
      trainer = Trainer(Config(dataset="synthetic", method="fast", lr=1e-3,
                               data_parallel=parallel), data)
      assert (trainer.mesh is not None) == parallel
      state = trainer.init_state(jax.random.key(0))
      state, metrics = trainer.train_epoch(state, trainer.train_data, jax.random.key(1))
      results[parallel] = (jax.device_get(state.params), np.asarray(state.p),
                           np.asarray(metrics["loss"]))
    sharded_leaf = jax.tree.leaves(state.params)[0]
    assert len(sharded_leaf.sharding.device_set) == 2
    chex.assert_trees_all_close(results[True], results[False], rtol=2e-4, atol=2e-5)
    print("OK")
""")


def test_sharded_epoch_equals_the_unsharded_one(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", SCRIPT.format(cache=str(tmp_path))],
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
