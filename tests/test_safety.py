"""Run folders that cannot be corrupted, and one-line errors (issue 18; issue 19 items 3, 5).

The command-line cases run the real CLI (`experiments/run.py`, `python -m data_prep`) in
a subprocess on a small synthetic prepared folder; one finished 2-seed run, made without
`--out`, is copied by the tests that need a run folder.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_prep import build, prepare
from fast_jax import config as config_lib
from fast_jax import runfolder
from fast_jax.checkpoint import CheckpointError, SeedCheckpoint
from fast_jax import cli
from fast_jax.cli import run as run_cli
from fast_jax.config import Config, UsageError
from fast_jax.data_prep import sources
from fast_jax.dataset import DataError, load_prepared
from conftest import assert_one_line_error, cli_env as _env

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = PROJECT_ROOT / "experiments" / "run.py"
SMALL = dict(num_minority=20, num_majority=60)  # 56 training users
QUICK = ["--epochs", "2", "--seeds", "2", "--checkpoint-every", "1", "--batch-size", "16",
         "--quiet", "--no-attack"]


def _run(args, cwd, timeout=300, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *map(str, args)], cwd=cwd,
                        env=_env(pathlib.Path(cwd) / "cache", **env), capture_output=True,
                        text=True, timeout=timeout)




# Runs the CLI with Ctrl-C handled as a shell's foreground command has it: a process
# started from a background job (nohup, a non-interactive runner) inherits an ignored
# SIGINT, and Python then leaves it ignored.
AS_IN_A_TERMINAL = ("import runpy, signal, sys; signal.signal(signal.SIGINT, "
                    "signal.default_int_handler); sys.argv = sys.argv[1:]; "
                    "runpy.run_path(sys.argv[0], run_name='__main__')")


def _interrupt(proc: subprocess.Popen) -> str:
  """Send SIGINT (Ctrl-C) and wait for the end; kill a process that ignores it. -> stderr."""
  proc.send_signal(signal.SIGINT)
  try:
    return proc.communicate(timeout=120)[1]
  except subprocess.TimeoutExpired:
    proc.kill()
    return proc.communicate()[1] + "\n(killed: SIGINT did not stop it)"


def _wait_for(path: pathlib.Path, proc: subprocess.Popen, seconds: float = 240) -> None:
  """Wait until ``path`` exists while ``proc`` runs; fail (stopping it) otherwise."""
  deadline = time.monotonic() + seconds
  while not path.exists():
    if proc.poll() is not None:
      pytest.fail(f"the run ended (exit {proc.returncode}) before {path.name} appeared: "
                  f"{proc.communicate()[1][-2000:]}")
    if time.monotonic() > deadline:
      pytest.fail(f"no {path.name} after {seconds} s: {_interrupt(proc)[-2000:]}")
    time.sleep(0.1)


def _snapshot(folder: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
          if p.is_file() and p.name != runfolder.LOCK_NAME}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> pathlib.Path:
  return prepare("synthetic", tmp_path_factory.mktemp("safety") / "small", progress=False,
                 **SMALL)


@pytest.fixture(scope="module")
def finished(small, tmp_path_factory) -> dict:
  """A finished 2-seed run of `run.py` without --out: {"folder", "stdout"}."""
  cwd = tmp_path_factory.mktemp("finished")
  result = _run([RUN, "--dataset", small, *QUICK], cwd)
  assert result.returncode == 0, result.stderr[-3000:]
  (folder,) = (cwd / "runs").iterdir()
  return {"folder": folder, "stdout": result.stdout, "cwd": cwd}


@pytest.fixture
def run_copy(finished, tmp_path) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(finished["folder"], tmp_path / "run"))


def _cfg(small, **kw) -> Config:
  return Config(**{"dataset": str(small), "epochs": 2, "seeds": 2, "checkpoint_every": 1,
                   "batch_size": 16, "attack": False, **kw})


# ----------------------------------------------------------------------------- results by default


def test_without_out_a_run_writes_a_dated_folder_under_runs_and_prints_it(finished):
  folder = finished["folder"]
  assert re.fullmatch(r"small-melu-fast-\d{8}-\d{6}", folder.name), folder.name
  assert (folder / "results.json").is_file() and (folder / "config.json").is_file()
  assert finished["stdout"].splitlines()[-1] == f"run folder: runs/{folder.name}"


def test_result_files_are_readable_by_others_as_the_umask_allows(finished):
  umask = os.umask(0o022)
  os.umask(umask)
  folder = finished["folder"]
  for name in ("results.json", "config.json", "metrics.jsonl", "seeds/seed-1024.json",
               "checkpoints/seed-1024.msgpack"):
    assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_config_json_never_stores_a_numeric_setting_as_null(finished):
  record = json.loads((finished["folder"] / "config.json").read_text())
  for name in ("gamma", "tau", "lr", "inner_lr", "reg_weight", "baseline_lr", "dropout"):
    assert isinstance(record[name], float), (name, record[name])


def test_config_json_loads_back_into_the_same_config(finished, small):
  record = json.loads((finished["folder"] / "config.json").read_text())
  cfg = config_lib.from_record(record)
  assert cfg == config_lib.resolve(_cfg(small), "synthetic")
  with pytest.raises(UsageError, match="unknown setting 'colour'"):
    config_lib.from_record({**record, "colour": "blue"})


def test_config_reruns_a_recorded_run_and_flags_beside_it_override(finished, tmp_path):
  # --seeds 1 overrides; --reg-weight does nothing for FAST, which a warning says and the
  # same first seed confirms, bit for bit (the weight is a value of the train state that
  # only the Reg row reads, not a constant of the program the four rows share).
  result = _run([RUN, "--config", finished["folder"] / "config.json", "--seeds", "1",
                 "--reg-weight", "0.5", "--quiet", "--out", tmp_path / "again"], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stderr.splitlines() == [
      "warning: --reg-weight has no effect with --method fast (it acts on reg)"]
  before = json.loads((finished["folder"] / "results.json").read_text())
  again = json.loads((tmp_path / "again" / "results.json").read_text())
  assert again["per_seed"] == before["per_seed"][:1]
  assert again["config"] == {**before["config"], "seeds": 1, "reg_weight": 0.5}


def test_config_looks_the_raw_data_up_on_this_machine(finished, tmp_path, monkeypatch):
  # A recorded data_dir is where that run found the files (here relative to the folder it
  # started in); re-running it takes --data-dir, else $FAST_JAX_DATA_DIR, else the cache.
  record = json.loads((finished["folder"] / "config.json").read_text())
  path = tmp_path / "config.json"
  path.write_text(json.dumps({**record, "data_dir": "../where/it/ran"}))
  cfg = lambda argv: run_cli.config_from_args(run_cli.build_parser().parse_args(argv),
                                              run_cli.given_flags(argv))
  monkeypatch.delenv("FAST_JAX_DATA_DIR", raising=False)
  assert cfg(["--config", str(path)]).data_dir is None
  assert cfg(["--config", str(path), "--data-dir", str(tmp_path)]).data_dir == str(tmp_path)
  monkeypatch.setenv("FAST_JAX_DATA_DIR", str(tmp_path / "env"))
  assert cfg(["--config", str(path)]).data_dir == str(tmp_path / "env")
  assert cfg(["--config", str(path)]).replace(data_dir=None) == cfg(
      ["--config", str(finished["folder"] / "config.json")]).replace(data_dir=None)


def test_a_flag_without_effect_for_the_method_is_named_in_a_warning():
  warn = lambda argv: run_cli.ineffective_flags(
      run_cli.config_from_args(run_cli.build_parser().parse_args(argv)),
      run_cli.given_flags(argv))
  assert warn(["--method", "origin", "--gamma", "1"]) == [
      "warning: --gamma has no effect with --method origin (it acts on fast)"]
  assert warn(["--method", "fast", "--gamma", "1", "--tau", "0.1"]) == []
  assert warn(["--method", "clover", "--p-average"]) == [
      "warning: --p-average has no effect with --method clover (it acts on fast)"]
  assert warn(["--method", "fast", "--p-average"]) == []
  assert warn(["--method", "support-mean", "--lr", "1e-3"]) == [
      "warning: --lr has no effect with --method support-mean (it acts on the meta-learning "
      "methods)"]
  assert warn(["--method", "reg", "--alpha-mode", "per-param"]) == [
      "warning: --alpha-mode has no effect with --backbone melu (it acts on metacs)"]
  named = ", ".join(config_lib.DATASETS)
  assert warn(["--dataset", "prepared/bx", "--protocol", "raw", "--data-dir", "data"]) == [
      f"warning: --{flag} has no effect with a prepared folder as --dataset (it acts on the "
      f"named datasets, {named})" for flag in ("data-dir", "protocol")]
  assert warn(["--dataset", "ml100k", "--protocol", "raw", "--data-dir", "data"]) == []


def test_a_bad_config_file_is_one_line(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  result = _run([RUN, "--config", tmp_path / "config.json"], tmp_path)
  assert_one_line_error(result, "--config", "config.json", program="run.py")


# ----------------------------------------------------------------------------- one run per folder


def test_a_second_run_on_a_folder_in_use_is_refused_and_the_first_is_untouched(small,
                                                                               tmp_path):
  out = tmp_path / "shared"
  first = subprocess.Popen(
      [sys.executable, "-c", AS_IN_A_TERMINAL, str(RUN), "--dataset", str(small), "--epochs",
       "100000", "--seeds", "1",
       "--quiet", "--no-attack", "--out", str(out)], cwd=tmp_path,
      env=_env(tmp_path / "cache"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for(out / "config.json", first)
    second = _run([RUN, "--dataset", small, "--epochs", "1", "--seeds", "1", "--gamma", "0.5",
                   "--quiet", "--out", out], tmp_path)
    assert first.poll() is None  # the first run was still training: the lock refused
    assert_one_line_error(second, "another run", str(out), program="run.py")
  finally:
    _interrupt(first)
  assert json.loads((out / "config.json").read_text())["epochs"] == 100000
  records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == list(range(1, len(records) + 1))
  # The OS released the lock when the first run ended.
  runfolder.RunFolder(out, config_lib.resolve(_cfg(small), "synthetic"), load_prepared(small),
                      resume=False, overwrite=True).release()


def test_a_folder_holding_a_run_needs_resume_or_overwrite(run_copy, small, tmp_path):
  before = _snapshot(run_copy)
  result = _run([RUN, "--dataset", small, *QUICK, "--out", run_copy], tmp_path)
  assert_one_line_error(result, str(run_copy), "--resume", "--overwrite", program="run.py")
  assert _snapshot(run_copy) == before


def test_overwrite_removes_the_old_result_files_first_and_keeps_other_files(run_copy, small,
                                                                            tmp_path):
  (run_copy / "notes.txt").write_text("mine")
  result = _run([RUN, "--dataset", small, "--method", "global-mean", "--seeds", "1",
                 "--quiet", "--out", run_copy, "--overwrite"], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (run_copy / "notes.txt").read_text() == "mine"
  assert not (run_copy / "seeds" / "seed-3145.json").exists()  # the old run's 2nd seed
  assert not (run_copy / "checkpoints" / "seed-3145.msgpack").exists()
  assert len((run_copy / "metrics.jsonl").read_text().splitlines()) == 1
  assert json.loads((run_copy / "results.json").read_text())["config"]["method"] == \
      "global-mean"
  with pytest.raises(UsageError, match="--resume and --overwrite"):
    runfolder.RunFolder(run_copy, _cfg(small), load_prepared(small), resume=True,
                        overwrite=True)


# ----------------------------------------------------------------------------- resume


def _truncate(path: pathlib.Path, size: int) -> None:
  path.write_bytes(path.read_bytes()[:size])


def _flip_a_byte(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))


BROKEN_RUNS = {
    "truncated-seed-file": (lambda d: _truncate(d / "seeds" / "seed-1024.json", 100),
                            "seed-1024.json"),
    "corrupt-config": (lambda d: (d / "config.json").write_text("{\"dataset\": "),
                       "config.json"),
    "truncated-checkpoint": (lambda d: _truncate(d / "checkpoints" / "seed-3145.msgpack", 500),
                             "seed-3145.msgpack"),
    "flipped-checkpoint-byte": (lambda d: _flip_a_byte(d / "checkpoints" / "seed-1024.msgpack"),
                                "seed-1024.msgpack"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_RUNS))
def test_a_failed_resume_is_one_line_and_changes_nothing_on_disk(run_copy, small, tmp_path,
                                                                 case):
  breaks, name = BROKEN_RUNS[case]
  breaks(run_copy)
  before = _snapshot(run_copy)
  result = _run([RUN, "--dataset", small, *QUICK, "--out", run_copy, "--resume"], tmp_path)
  assert_one_line_error(result, name, program="run.py")
  assert _snapshot(run_copy) == before


def test_a_checkpoint_with_a_flipped_byte_is_refused_naming_the_file(run_copy):
  ckpt = SeedCheckpoint(run_copy, 1024)
  assert ckpt.epoch() == 2
  _flip_a_byte(ckpt.path)
  with pytest.raises(CheckpointError, match=r"seed-1024\.msgpack is corrupt \(its sha256"):
    ckpt.payload()


def test_resume_removes_the_temporary_files_a_kill_left(run_copy, small, tmp_path):
  left = [run_copy / ".results.json.k2j3.tmp", run_copy / ".config.json.x9.tmp",
          run_copy / "seeds" / ".seed-3145.json.ab.tmp",
          run_copy / "checkpoints" / ".seed-3145.msgpack.q7",
          run_copy / "checkpoints" / ".seed-3145.msgpack.q8.tmp", run_copy / ".write_test"]
  for path in left:
    path.write_bytes(b"\0" * 1000)
  (run_copy / ".keep-me").write_text("a user's file")
  results = (run_copy / "results.json").read_bytes()
  result = _run([RUN, "--dataset", small, *QUICK, "--out", run_copy, "--resume"], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert not [p for p in left if p.exists()]
  assert (run_copy / ".keep-me").read_text() == "a user's file"
  assert (run_copy / "results.json").read_bytes() == results  # both seeds were finished


# ----------------------------------------------------------------------------- write failures


def test_a_full_disk_is_one_line_and_loses_nothing(run_copy, small, monkeypatch, capsys):
  def no_space(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  before = _snapshot(run_copy)
  monkeypatch.setattr(os, "fsync", no_space)
  rc = run_cli.main(["--dataset", str(small), *QUICK, "--out", str(run_copy), "--resume"])
  err = capsys.readouterr().err.splitlines()
  assert rc == 2 and len(err) == 1, err
  assert re.match(re.escape(cli.program()) + r": error: cannot write .*config\.json \(No space left on device\); .* "
                  r"continue with --resume$", err[0]), err[0]
  assert _snapshot(run_copy) == before  # config.json intact, metrics.jsonl not truncated
  assert not [p for p in run_copy.rglob(".*") if p.name != runfolder.LOCK_NAME]


def test_a_full_tmpfs_is_one_line(small, tmp_path):
  """The issue's own case: `--out` on a 200 KB tmpfs (needs permission to mount)."""
  mount = tmp_path / "full"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)],
                    capture_output=True).returncode != 0:
    pytest.skip("cannot mount a tmpfs here")
  try:
    result = _run([RUN, "--dataset", small, "--epochs", "1", "--seeds", "1", "--quiet",
                   "--no-attack", "--out", mount / "run"], tmp_path)
    line = assert_one_line_error(result, "No space left on device", str(mount / "run"),
                                program="run.py")
    assert "continue with --resume" in line
    assert json.loads((mount / "run" / "config.json").read_text())["epochs"] == 1
  finally:
    subprocess.run(["umount", str(mount)], check=True)


# ----------------------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize("moment", ["compiling", "training"])
def test_ctrl_c_prints_one_line_keeps_the_checkpoint_and_exits_130(small, tmp_path, moment):
  # While compiling (1.5 s after config.json is written, with no compilation cache), an
  # interrupt lands inside JAX's C++; the interpreter's normal teardown then segfaulted
  # (exit -11) in 4 of 5 tries here.
  out = tmp_path / "run"
  env = _env(tmp_path / "cache")
  if moment == "compiling":
    env = {k: v for k, v in env.items() if not k.startswith("JAX_")}
  proc = subprocess.Popen(
      [sys.executable, "-c", AS_IN_A_TERMINAL, str(RUN), "--dataset", str(small), "--epochs",
       "100000", "--seeds", "1",
       "--checkpoint-every", "1", "--quiet", "--no-attack", "--out", str(out)], cwd=tmp_path,
      env={**env, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  ckpt = SeedCheckpoint(out, 1024)
  wait_for = out / "config.json" if moment == "compiling" else ckpt.path
  _wait_for(wait_for, proc)
  time.sleep(1.5 if moment == "compiling" else 0.5)
  err = _interrupt(proc)
  assert proc.returncode == 130, (proc.returncode, err[-2000:])
  lines = err.splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
  saved = (r"(seed 1024 checkpointed at epoch \d+|no checkpoint yet \(.*\))"
           if moment == "compiling" else r"seed 1024 checkpointed at epoch \d+")
  assert re.match(rf"interrupted: {saved} in {re.escape(str(out))}; continue with: "
                  r"python .*run\.py .*--resume$", lines[0]), lines[0]
  if moment == "training":
    assert ckpt.epoch() >= 1  # kept, and its checksum holds


# ----------------------------------------------------------------------------- data


def _write_csvs(folder: pathlib.Path, extra_lines=()) -> dict:
  rng = np.random.default_rng(0)
  folder.mkdir(parents=True, exist_ok=True)
  users = ["user,age,gender"] + [f"{u},{rng.integers(1, 5)},{'FM'[u % 2]}" for u in range(40)]
  ratings = ["user,item,rating"] + [f"{u},{i},{rng.integers(1, 6)}" for u in range(40)
                                    for i in rng.choice(30, 15, replace=False)]
  (folder / "users.csv").write_text("\n".join(users) + "\n")
  (folder / "ratings.csv").write_text("\n".join(ratings + list(extra_lines)) + "\n")
  return {"ratings": folder / "ratings.csv", "users": folder / "users.csv",
          "sensitive": "gender"}


def test_a_repeated_user_item_pair_is_an_error_naming_file_and_line(tmp_path):
  files = _write_csvs(tmp_path / "csv")
  first = (tmp_path / "csv" / "ratings.csv").read_text().splitlines()[1]  # line 2
  user, item, _ = first.split(",")
  _write_csvs(tmp_path / "csv", extra_lines=[f"{user},{item},5"])  # line 602
  result = _run(["-m", "data_prep", "--dataset", "custom", "--ratings", files["ratings"],
                 "--users", files["users"], "--sensitive", "gender", "--out", tmp_path / "o",
                 "--no-progress"], tmp_path)
  assert_one_line_error(result, "ratings.csv:602", "first on line 2", "--duplicates",
                        program="data_prep")


@pytest.mark.parametrize("policy", ["last", "mean"])
def test_duplicates_last_or_mean_resolve_repeated_pairs_on_purpose(tmp_path, policy):
  files = _write_csvs(tmp_path / "csv")
  first = (tmp_path / "csv" / "ratings.csv").read_text().splitlines()[1]
  user, item, rating = first.split(",")
  _write_csvs(tmp_path / "csv", extra_lines=[f"{user},{item},{6 - int(rating)}"])
  splits, meta = build("custom", progress=False, duplicates=policy, **files)
  split = next(s for s in splits.values() if int(user) in s.user_id)
  u = int(np.flatnonzero(split.user_id == int(user))[0])
  assert split.length[u] == 15  # one row for the pair, not two
  # No timestamps: file order, so the kept row sits where the last copy was (the end).
  expected = {"last": 6 - int(rating), "mean": 3.0}[policy]
  assert split.y[u, split.length[u] - 1] == expected
  assert any("--duplicates " + policy in note for note in meta["notes"])


def test_prepare_into_a_prepared_folder_replaces_only_its_own_files(tmp_path):
  out = prepare("synthetic", tmp_path / "data", progress=False, **SMALL)
  (out / "notes.txt").write_text("mine")
  (out / "runs").mkdir()
  (out / "runs" / "results.json").write_text("{}")
  prepare("synthetic", out, progress=False, seed=7, **SMALL)
  assert load_prepared(out).meta["seed"] == 7
  assert (out / "notes.txt").read_text() == "mine"
  assert (out / "runs" / "results.json").read_text() == "{}"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary folder left


def test_missing_folder_message_names_the_folder(tmp_path):
  with pytest.raises(DataError) as e:
    load_prepared(tmp_path / "nowhere")
  assert "{path}" not in str(e.value) and str(e.value).count(str(tmp_path / "nowhere")) == 2


def test_a_split_file_that_is_a_folder_is_reported_as_a_folder(small, tmp_path):
  copy = pathlib.Path(shutil.copytree(small, tmp_path / "data"))
  (copy / "train.npz").unlink()
  (copy / "train.npz").mkdir()
  with pytest.raises(DataError, match=r"train\.npz is a folder, not a file"):
    load_prepared(copy)


def test_a_group_without_valid_users_warns_once_naming_it(small, tmp_path, capsys):
  copy = pathlib.Path(shutil.copytree(small, tmp_path / "data"))
  with np.load(copy / "valid.npz") as npz:
    arrays = {k: npz[k] for k in npz.files}
  arrays["group"] = np.ones_like(arrays["group"])
  np.savez_compressed(copy / "valid.npz", **arrays)
  meta = json.loads((copy / "meta.json").read_text())
  meta["counts"]["valid"]["groups"] = [0, int(arrays["group"].size)]
  (copy / "meta.json").write_text(json.dumps(meta))
  load_prepared(copy)
  load_prepared(copy)
  err = capsys.readouterr().err.splitlines()
  name = meta["sensitive"]["groups"][0]
  assert err == [f"warning: {copy}: group 0 ({name}) has no valid users; its valid metrics "
                 "are NaN"]


def test_data_dir_comes_from_fast_jax_data_dir(monkeypatch, tmp_path):
  from fast_jax.data_prep import cli as prep_cli
  monkeypatch.setenv("FAST_JAX_DATA_DIR", str(tmp_path / "data"))
  assert run_cli.build_parser().parse_args([]).data_dir == str(tmp_path / "data")
  assert prep_cli.parser().parse_args(["--dataset", "ml100k"]).data_dir == str(
      tmp_path / "data")
  folder = tmp_path / "data" / "ml-100k"
  folder.mkdir(parents=True)
  for name in ("u.data", "u.item", "u.user"):
    (folder / name).write_text("")
  assert sources.resolve("ml100k", "raw", cache_dir=tmp_path / "cache") == folder
  assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("given", ["flag", "variable"])
def test_a_data_dir_that_is_not_a_folder_is_an_error_even_when_the_cache_has_the_data(
    monkeypatch, tmp_path, given):
  from fast_jax.data_prep import ensure_prepared
  cache = tmp_path / "cache"
  # Any prepared folder stands in for the cached ML-100K: the check comes before loading it.
  cached = prepare("synthetic", cache / "prepared" / "ml100k-clover-12345", progress=False,
                   num_minority=20, num_majority=60)
  assert ensure_prepared("ml100k", cache_dir=cache) == cached
  typo = tmp_path / "shraed" / "data"
  kw = {"data_dir": str(typo)}
  if given == "variable":
    monkeypatch.setenv("FAST_JAX_DATA_DIR", str(typo))
    kw = {}
  name = "--data-dir" if given == "flag" else "$FAST_JAX_DATA_DIR"
  with pytest.raises(DataError, match=f"^{re.escape(name)} {re.escape(str(typo))}: no such "
                                      "folder"):
    ensure_prepared("ml100k", cache_dir=cache, **kw)
  with pytest.raises(DataError, match="no such folder"):
    build("ml100k", cache_dir=cache, progress=False, **kw)
  assert ensure_prepared("ml100k", data_dir=str(tmp_path), cache_dir=cache) == cached


def test_the_offline_error_names_data_dir_the_variable_and_the_files(tmp_path):
  result = _run([RUN, "--dataset", "ml100k", "--quiet"], tmp_path)
  line = assert_one_line_error(result, "--data-dir", "FAST_JAX_DATA_DIR", "ml-100k-clover/",
                                "user_warm_state.json", "user_cold_state_test_y.json", program="run.py")
  assert "DIR/ml-100k-clover/" in line
  assert not (tmp_path / "cache").exists()  # nothing, empty or not, left in the cache


def test_a_failed_download_leaves_no_empty_folder(monkeypatch, tmp_path):
  def unreachable(url, dest, **kw):
    raise DataError(f"could not reach {url}: no network")
  monkeypatch.setattr(sources, "download_file", unreachable)
  (tmp_path / "cache").mkdir()
  with pytest.raises(DataError, match="no network.*--data-dir"):
    sources.resolve("ml100k", "clover", cache_dir=tmp_path / "cache", download=True)
  assert list((tmp_path / "cache").iterdir()) == []


# ----------------------------------------------------------------------------- NDCG gain


def _ndcg_shifted_reference(pred, y, k=3):
  """NDCG@k with gain (r + c)^2 - 1, c = max(0, 1 - min(y)); ties to the later row."""
  c = max(0.0, 1.0 - min(y))
  gain = lambda r: (r + c) ** 2 - 1
  order = sorted(range(len(pred)), key=lambda j: (pred[j], j), reverse=True)[:k]
  disc = [1 / np.log2(i + 2) for i in range(k)]
  dcg = sum(gain(y[j]) * d for j, d in zip(order, disc))
  idcg = sum(gain(r) * d for r, d in zip(sorted(y, reverse=True)[:k], disc))
  return dcg / idcg if idcg > 0 else np.nan


def test_ndcg_gain_grows_with_the_rating_when_ratings_can_be_negative():
  from fast_jax import metrics
  y = np.array([-2.0, -1.0, 0.0, 0.5, -3.0, 1.5, -0.5, 0.2, -1.5, 0.9], np.float32)
  best = float(metrics.ndcg_at_k(y, y))
  assert best == pytest.approx(1.0)
  # Ranking a worse item first always costs: under r^2 - 1, -3 would outrank 1.5.
  for worse in (-3.0, -2.0, 0.0):
    pred = y.copy()
    pred[y == worse] = 10.0
    assert float(metrics.ndcg_at_k(pred, y)) < best
  rng = np.random.default_rng(0)
  for _ in range(20):
    pred, y = rng.normal(size=10).astype(np.float32), rng.normal(size=10).astype(np.float32)
    np.testing.assert_allclose(metrics.ndcg_at_k(pred, y), _ndcg_shifted_reference(pred, y),
                               rtol=1e-5)


def test_ndcg_keeps_the_papers_gain_for_ratings_of_at_least_one():
  from fast_jax import metrics
  rng = np.random.default_rng(1)
  for _ in range(20):
    pred = rng.normal(size=10).astype(np.float32)
    y = rng.integers(1, 6, size=10).astype(np.float32)
    order = sorted(range(10), key=lambda j: (pred[j], j), reverse=True)[:3]
    disc = [1 / np.log2(i + 2) for i in range(3)]
    dcg = sum((y[j] ** 2 - 1) * d for j, d in zip(order, disc))
    idcg = sum((r ** 2 - 1) * d for r, d in zip(sorted(y, reverse=True)[:3], disc))
    expected = dcg / idcg if idcg > 0 else np.nan
    np.testing.assert_allclose(metrics.ndcg_at_k(pred, y), expected, rtol=1e-5)
