"""Checkpoints, --resume and divergence handling."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fast_jax import runfolder
from fast_jax.checkpoint import SeedCheckpoint
from fast_jax.config import Config, resolve
from fast_jax.experiment import UsageError, sweep_and_evaluate, train_and_evaluate
from fast_jax.methods import learner as learn
from fast_jax.runner import Diverged, Runner
from conftest import SMALL

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
QUIET = dict(progress=False, echo=lambda s: None)


def _cfg(**kw):
  base = dict(dataset="synthetic", method="fast", epochs=4, seeds=2, lr=1e-3,
              checkpoint_every=1, attack=False)
  return Config(**{**base, **kw})


def _records(path):
  out = []
  for line in (path / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    r.pop("seconds")
    out.append(r)
  return out


def test_resumed_run_gives_the_same_results_as_an_uninterrupted_one(prepared, tmp_path,
                                                                    monkeypatch):
  data = prepared("synthetic", **SMALL)
  full = train_and_evaluate(_cfg(), tmp_path / "full", data=data, **QUIET)

  # Interrupt the second seed after its epoch 2 (checkpointed), as a crash would.
  calls = {"n": 0}
  real_run_seed = Runner.run_seed

  def crashing_run_seed(self, seed, **kw):
    log = kw["log"]

    def log_and_crash(record):
      log(record)
      if seed == 3145 and record["epoch"] == 3:
        raise KeyboardInterrupt
    return real_run_seed(self, seed, **{**kw, "log": log_and_crash})
  monkeypatch.setattr(Runner, "run_seed", crashing_run_seed)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(_cfg(), tmp_path / "cut", data=data, **QUIET)
  monkeypatch.setattr(Runner, "run_seed", real_run_seed)
  assert not (tmp_path / "cut" / "results.json").exists()
  ckpt = SeedCheckpoint(tmp_path / "cut", 3145)
  assert ckpt.exists()

  resumed = train_and_evaluate(_cfg(), tmp_path / "cut", data=data, resume=True, **QUIET)
  assert (tmp_path / "cut" / "results.json").read_bytes() == \
      (tmp_path / "full" / "results.json").read_bytes()
  assert resumed == full
  assert _records(tmp_path / "cut") == _records(tmp_path / "full")


def test_more_seeds_extend_a_finished_run_without_retraining_its_seeds(prepared, tmp_path,
                                                                       monkeypatch):
  data = prepared("synthetic", **SMALL)
  full = train_and_evaluate(_cfg(epochs=2), tmp_path / "full", data=data, **QUIET)
  monkeypatch.setattr(runfolder, "_git_commit", lambda: "first")
  train_and_evaluate(_cfg(epochs=2, seeds=1), tmp_path / "grow", data=data, **QUIET)
  monkeypatch.setattr(runfolder, "_git_commit", lambda: "later")
  trained = []
  real_run_seed = Runner.run_seed

  def counting_run_seed(self, seed, **kw):
    trained.append(seed)
    return real_run_seed(self, seed, **kw)
  monkeypatch.setattr(Runner, "run_seed", counting_run_seed)
  grown = train_and_evaluate(_cfg(epochs=2), tmp_path / "grow", data=data, resume=True,
                             **QUIET)
  assert trained == [3145]  # seed 1024 was finished
  assert grown == full
  assert _records(tmp_path / "grow") == _records(tmp_path / "full")
  config = json.loads((tmp_path / "grow" / "config.json").read_text())
  assert (config["git_commit"], config["earlier_commits"]) == ("later", ["first"])
  with pytest.raises(UsageError, match="used seeds=2, not 1"):  # fewer seeds: a new run
    train_and_evaluate(_cfg(epochs=2, seeds=1), tmp_path / "grow", data=data, resume=True,
                       **QUIET)


def test_a_run_recorded_before_a_setting_existed_resumes_with_its_default(prepared, tmp_path):
  data = prepared("synthetic", **SMALL)
  done = train_and_evaluate(_cfg(epochs=1, seeds=1), tmp_path, data=data, **QUIET)
  path = tmp_path / "config.json"
  old = json.loads(path.read_text())
  del old["p_average"]  # an older fast-jax wrote no such key
  path.write_text(json.dumps(old))
  more = train_and_evaluate(_cfg(epochs=1, seeds=2), tmp_path, data=data, resume=True, **QUIET)
  assert more["per_seed"][0] == done["per_seed"][0]
  path.write_text(json.dumps(old))
  with pytest.raises(UsageError, match="used p_average=False, not True"):
    train_and_evaluate(_cfg(epochs=1, seeds=2, p_average=True), tmp_path, data=data,
                       resume=True, **QUIET)


def test_resume_refuses_a_run_with_other_settings(prepared, tmp_path):
  data = prepared("synthetic", **SMALL)
  train_and_evaluate(_cfg(epochs=1, seeds=1), tmp_path, data=data, **QUIET)
  with pytest.raises(UsageError, match="--resume: the run in .* used lr"):
    train_and_evaluate(_cfg(epochs=1, seeds=1, lr=5e-4), tmp_path, data=data, resume=True,
                       **QUIET)


def test_divergence_stops_the_seed_naming_epoch_and_step_and_keeps_the_last_checkpoint(
    prepared, tmp_path, monkeypatch):
  data = prepared("synthetic")
  runner = Runner(resolve(_cfg(), data.name), data)
  real_epoch = runner.method.epoch
  calls = {"n": 0}

  def epoch_that_breaks(state, data_, key):
    calls["n"] += 1
    state, metrics = real_epoch(state, data_, key)
    if calls["n"] == 3:
      loss = np.asarray(metrics["loss"]).copy()
      loss[4] = np.nan
      metrics = {**metrics, "loss": loss}
    return state, metrics
  runner.method = runner.method._replace(epoch=epoch_that_breaks)
  ckpt = SeedCheckpoint(tmp_path, 1024)
  with pytest.raises(Diverged, match="epoch 3, step 5"):
    runner.run_seed(1024, progress=False, checkpoint=ckpt, checkpoint_every=1)
  saved = ckpt.restore(runner.method.init(__import__("jax").random.key(0)))
  assert saved["epoch"] == 2 and len(saved["records"]) == 2


def test_an_absurd_learning_rate_is_reported_as_divergence(tmp_path):
  proc = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / "run.py"), "--dataset", "synthetic",
       "--epochs", "2", "--seeds", "1", "--inner-lr", "1e12", "--lr", "1e6", "--quiet",
       "--no-attack",
       "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
      env={**__import__("os").environ, "FAST_JAX_CACHE": str(tmp_path / "cache")})
  assert proc.returncode == 1, proc.stderr
  assert "diverged" in proc.stderr and "epoch 1, step" in proc.stderr
  assert "Traceback" not in proc.stderr


# Sweeps whose two points train as lanes of one program: FAST's gamma and tau (tau small
# enough that p cannot saturate within the epoch), Reg's weight; each with the record
# field its two points must differ in.
SWEEPS = [("fast", [dict(gamma=0.5, tau=0.002), dict(gamma=3.0, tau=0.01)], "p"),
          ("reg", [dict(reg_weight=0.0), dict(reg_weight=5.0)], "train_loss")]


@pytest.mark.parametrize("method, points, moved", SWEEPS)
def test_vmapped_seeds_and_sweep_points_match_sequential_runs(prepared, tmp_path, method,
                                                              points, moved):
  data = prepared("synthetic", **SMALL)
  base = dict(dataset="synthetic", method=method, epochs=1, seeds=1, lr=1e-3, attack=False)
  cfgs = [Config(**base, **point) for point in points]
  vec = sweep_and_evaluate(cfgs, [tmp_path / "vec-a", tmp_path / "vec-b"], data=data, **QUIET)
  seq = [train_and_evaluate(c, tmp_path / f"seq-{n}", data=data, **QUIET)
         for c, n in zip(cfgs, "ab")]
  for v, s in zip(vec, seq):
    for a, b in zip(s["per_seed"], v["per_seed"]):
      assert a["seed"] == b["seed"]
      for k in ("mae", "mse", "gf_mae"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4)
  r = {n: [r[moved] for r in _records(tmp_path / n)] for n in ("vec-a", "vec-b", "seq-a", "seq-b")}
  np.testing.assert_allclose(r["vec-a"], r["seq-a"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(r["vec-b"], r["seq-b"], rtol=1e-4, atol=1e-5)
  assert not np.allclose(r["vec-a"], r["vec-b"])  # the lanes really had their own settings
  assert (tmp_path / "vec-a" / "seeds" / "seed-1024.json").exists()

  with pytest.raises(UsageError, match=r"varies only gamma, tau, inner_lr, reg_weight .*; "
                                       r"lr is"):
    sweep_and_evaluate([cfgs[0], Config(**{**base, "lr": 1e-2})], data=data, **QUIET)


# The methods that train as lanes of one program (fast_jax.methods.rows), in a sweep of
# all four with two seeds each; on whole batches (all eight lanes at once) and by length
# (each seed's four lanes at once, the key and step counter shared: Runner.run_lanes).
ROW_METHODS = ["origin", "reg", "ipw", "fast"]
ROW_LANE_PARTS = [1, 2]


@pytest.mark.parametrize("length_parts", ROW_LANE_PARTS)
def test_rows_as_lanes_match_their_own_runs(prepared, tmp_path, monkeypatch, length_parts):
  data = prepared("synthetic", min_ratings=15, max_ratings=80, num_minority=40,
                  num_majority=160)  # lengths that 2 parts cut
  base = dict(dataset="synthetic", epochs=1, seeds=2, lr=1e-3, gamma=3.0, tau=0.01,
              reg_weight=1.0, attack=False, length_parts=length_parts)
  cfgs = [Config(**base, method=m) for m in ROW_METHODS]
  calls, run_lanes, stop = [], Runner.run_lanes, []
  folders = [tmp_path / f"vec-{m}" for m in ROW_METHODS]

  def spy(self, seeds, **kw):
    filed = {f.name for d in folders for f in (d / "seeds").glob("*.json")} if (
        folders[0] / "seeds").exists() else set()
    calls.append((list(seeds), bool(learn.row_budgets(self.ctx)), sorted(filed)))
    if stop and len(calls) == stop[0]:
      raise KeyboardInterrupt
    return run_lanes(self, seeds, **kw)
  monkeypatch.setattr(Runner, "run_lanes", spy)
  if length_parts == 2:  # stopped in the second seed: the first is filed, and a rerun resumes
    stop.append(2)
    with pytest.raises(KeyboardInterrupt):
      sweep_and_evaluate(cfgs, folders, data=data, **QUIET)
    assert calls[1][2] == ["seed-1024.json"]
    calls.clear(), stop.clear()
  vec = sweep_and_evaluate(cfgs, folders, data=data, **QUIET)
  if length_parts == 1:
    assert calls == [([1024, 3145] * 4, False, [])]
  else:  # by length: one seed's four rows at a time; here only the seed left
    assert calls == [([3145] * 4, True, ["seed-1024.json"])]
  for m, cfg, v in zip(ROW_METHODS, cfgs, vec):
    s = train_and_evaluate(cfg, tmp_path / f"seq-{m}", data=data, **QUIET)
    assert v["config"]["method"] == m
    for a, b in zip(s["per_seed"], v["per_seed"]):
      assert a["seed"] == b["seed"]
      for k in ("mae", "mse", "gf_mae"):
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=f"{m} {k}")
    np.testing.assert_allclose([r["p"] for r in _records(tmp_path / f"vec-{m}")],
                               [r["p"] for r in _records(tmp_path / f"seq-{m}")], atol=1e-5)
    assert [(r["seed"], r["epoch"]) for r in _records(tmp_path / f"vec-{m}")] == \
        [(r["seed"], r["epoch"]) for r in _records(tmp_path / f"seq-{m}")]  # each record once
  maes = [v["per_seed"][0]["mae"] for v in vec]
  assert min(abs(a - b) for i, a in enumerate(maes) for b in maes[i + 1:]) > 1e-6, maes
  assert _records(tmp_path / "vec-origin")[-1]["p"] == [0.5, 0.5]  # only FAST's p moves
  assert _records(tmp_path / "vec-fast")[-1]["p"] != [0.5, 0.5]

  with pytest.raises(UsageError, match="only origin, reg, ipw, fast"):
    sweep_and_evaluate([cfgs[0], Config(**base, method="static")], data=data, **QUIET)
  with pytest.raises(UsageError, match="only origin, reg, ipw, fast"):
    sweep_and_evaluate([Config(**base, method=m, p_update="epoch") for m in ROW_METHODS],
                       data=data, **QUIET)


# Backbones whose inner learning rate a sweep varies per lane: fixed (MeLU) and learned
# from its initial value (MetaCS).
INNER_LR_BACKBONES = ["melu", "metacs"]


@pytest.mark.parametrize("backbone", INNER_LR_BACKBONES)
def test_inner_lr_lanes_match_sequential_runs(prepared, tmp_path, backbone):
  data = prepared("synthetic", **SMALL)
  base = dict(dataset="synthetic", backbone=backbone, method="origin", epochs=1, seeds=1,
              lr=1e-3, attack=False)
  cfgs = [Config(**base, inner_lr=1e-3), Config(**base, inner_lr=5e-2)]
  vec = sweep_and_evaluate(cfgs, data=data, **QUIET)
  seq = [train_and_evaluate(c, data=data, **QUIET) for c in cfgs]
  for v, s in zip(vec, seq):
    for k in ("mae", "mse", "gf_mae"):
      np.testing.assert_allclose(v["per_seed"][0][k], s["per_seed"][0][k], rtol=1e-4)
  assert abs(vec[0]["mean"]["mae"] - vec[1]["mean"]["mae"]) > 1e-4  # the lanes' own rates


def test_vmapped_epoch_mode_lanes_carry_their_own_end_of_epoch_p(prepared, tmp_path):
  """FAST's epoch mode moves p after each epoch on the host: written back lane by lane,
  every lane's p per epoch equals its sequential run's."""
  data = prepared("synthetic", **SMALL)
  base = dict(dataset="synthetic", method="fast", p_update="epoch", epochs=3, seeds=1,
              lr=1e-3, tau=0.05, attack=False)
  # gamma 0.2: small enough that lane a's p stays under the cap tau on these 200 users
  cfgs = [Config(**base, gamma=0.2), Config(**base, gamma=5.0)]
  sweep_and_evaluate(cfgs, [tmp_path / "vec-a", tmp_path / "vec-b"], data=data, **QUIET)
  for c, n in zip(cfgs, "ab"):
    train_and_evaluate(c, tmp_path / f"seq-{n}", data=data, **QUIET)
  p = {n: [r["p"] for r in _records(tmp_path / n)] for n in ("vec-a", "vec-b", "seq-a", "seq-b")}
  # Up to float reassociation (whole batches under vmap), which gamma amplifies.
  np.testing.assert_allclose(p["vec-a"], p["seq-a"], atol=5e-4)
  np.testing.assert_allclose(p["vec-b"], p["seq-b"], atol=5e-4)
  assert abs(p["vec-a"][-1][0] - p["vec-b"][-1][0]) > 2e-3  # each lane its own p
