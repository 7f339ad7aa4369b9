"""Bad input at the command line: one line `<command>: error: ...` on stderr, exit code 2, no
traceback.

Every case runs the CLI's ``main`` (that of `experiments/run.py` and of `python -m
data_prep`) on a small synthetic prepared folder or a broken copy of it: in this process
(a Python start and JAX import cost about 3 s a case), and for the cases in
:data:`AS_SUBPROCESS` as the real command in a subprocess (the exit code and stderr of the
process itself; joining a multi-process job, which cannot be undone in this one). Flag
errors must come before any data is read, so they are also checked against a broken
folder and an empty offline cache. Last, the same run.py command twice gives identical
result files.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_prep import prepare
from fast_jax import cli
from conftest import assert_one_line_error, cli_env as _env

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = PROJECT_ROOT / "experiments" / "run.py"
SMALL = dict(num_minority=20, num_majority=60)  # 56 training users


def _run(args, env, cwd, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _main(main, args, env, monkeypatch) -> subprocess.CompletedProcess:
  """``main(args)`` in this process under ``env``: its exit code and what it wrote to
  stderr (an exception other than SystemExit propagates, failing the test)."""
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  err, out = io.StringIO(), io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
    try:
      code = main([str(a) for a in args])
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _cli(command, args, env, cwd, monkeypatch, case) -> subprocess.CompletedProcess:
  """``command`` ("run" or "data_prep") with ``args``: in a subprocess for the cases in
  AS_SUBPROCESS, else its main in this process."""
  if case in AS_SUBPROCESS:
    script = [RUN] if command == "run" else ["-m", "data_prep"]
    return _run([*script, *args], env, cwd)
  if command == "run":
    from fast_jax.cli.run import main
  else:
    from fast_jax.data_prep.cli import main
  monkeypatch.chdir(cwd)
  return _main(main, args, env, monkeypatch)


def _program(command, case) -> str:
  """The name ``command``'s error line starts with: the script's or module's in a
  subprocess, or in this process the name taken from this process's ``sys.argv[0]``."""
  if case not in AS_SUBPROCESS:
    return cli.program()
  return "run.py" if command == "run" else "data_prep"


# sys.argv[0] -> the name a command's error lines start with (fast_jax.cli.program).
PROGRAMS = [("/home/u/fast-jax/experiments/run.py", "run.py"),
            ("fast-jax run", "fast-jax run"),  # set by the fast-jax dispatcher
            ("/home/u/fast-jax/data_prep/__main__.py", "data_prep"),  # python -m data_prep
            ("/site-packages/fast_jax/data_prep/__main__.py", "data_prep")]


@pytest.mark.parametrize("argv0,expected", PROGRAMS)
def test_error_lines_name_the_command_as_it_was_run(monkeypatch, argv0, expected):
  monkeypatch.setattr(sys, "argv", [argv0])
  assert cli.error_line("--x: bad") == f"{expected}: error: --x: bad"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """A small prepared synthetic folder and broken copies of it, by case name."""
  root = tmp_path_factory.mktemp("cli_errors")
  good = prepare("synthetic", root / "good", progress=False, **SMALL)

  def copy(name):
    return pathlib.Path(shutil.copytree(good, root / name))

  broken = {}
  d = broken["missing-split"] = copy("missing-split")
  (d / "valid.npz").unlink()
  d = broken["truncated-npz"] = copy("truncated-npz")
  data = (d / "train.npz").read_bytes()
  (d / "train.npz").write_bytes(data[:len(data) // 2])
  d = broken["corrupt-npz"] = copy("corrupt-npz")  # intact zip directory, garbled deflate data
  data = bytearray((d / "train.npz").read_bytes())
  data[200:400] = bytes(b ^ 0x55 for b in data[200:400])
  (d / "train.npz").write_bytes(bytes(data))
  d = broken["meta-counts"] = copy("meta-counts")
  meta = json.loads((d / "meta.json").read_text())
  meta["counts"]["train"]["users"] += 1
  (d / "meta.json").write_text(json.dumps(meta))
  d = broken["meta-max-len"] = copy("meta-max-len")
  meta = json.loads((d / "meta.json").read_text())
  meta["max_len"] += 5
  (d / "meta.json").write_text(json.dumps(meta))
  d = broken["one-group"] = copy("one-group")  # every training user in group 0
  with np.load(d / "train.npz") as npz:
    arrays = {k: npz[k] for k in npz.files}
  arrays["group"] = np.zeros_like(arrays["group"])
  np.savez_compressed(d / "train.npz", **arrays)
  meta = json.loads((d / "meta.json").read_text())
  meta["counts"]["train"]["groups"] = [int(arrays["group"].size), 0]
  (d / "meta.json").write_text(json.dumps(meta))
  (root / "a-file").write_text("not a folder")
  return {"root": root, "good": good, **broken}


# (case id, run.py arguments with {good}/{root}/... placeholders, names the message must hold)
RUN_CASES = [
    ("unknown-backbone", ["--backbone", "transformer"], ["--backbone", "transformer"]),
    ("unknown-method", ["--method", "magic"], ["--method", "magic"]),
    ("unknown-dataset", ["--dataset", "nosuchdata"], ["--dataset", "nosuchdata"]),
    ("negative-gamma", ["--gamma", "-1"], ["--gamma"]),
    ("negative-tau", ["--tau", "-0.1"], ["--tau"]),
    ("tau-above-1", ["--tau", "1.5"], ["--tau"]),
    ("zero-epochs", ["--epochs", "0"], ["--epochs"]),
    ("zero-seeds", ["--seeds", "0"], ["--seeds"]),
    ("not-an-int", ["--epochs", "two"], ["--epochs"]),
    ("batch-larger-than-train", ["--batch-size", "500"], ["--batch-size", "56"]),
    ("missing-split", ["--dataset", "{missing-split}"], ["valid.npz", "missing"]),
    ("truncated-npz", ["--dataset", "{truncated-npz}"], ["train.npz", "truncated"]),
    ("corrupt-npz", ["--dataset", "{corrupt-npz}"], ["train.npz"]),
    ("meta-counts", ["--dataset", "{meta-counts}"], ["meta.json", "counts"]),
    ("meta-max-len", ["--dataset", "{meta-max-len}"], ["meta.json", "max_len"]),
    ("unwritable-out", ["--out", "{root}/a-file/run"], ["--out", "a-file"]),
    ("missing-data-dir", ["--dataset", "ml100k", "--data-dir", "{root}/no-such-dir"],
     ["--data-dir", "no-such-dir", "no such folder"]),
    ("one-group", ["--dataset", "{one-group}"], ["one-group", "2 groups"]),
    ("coordinator-alone", ["--coordinator", "127.0.0.1:1"], ["--coordinator", "--process-id"]),
    ("process-id-out-of-range", ["--coordinator", "127.0.0.1:1", "--num-processes", "2",
                                 "--process-id", "2"], ["--process-id", "0..1"]),
    ("distributed-outside-a-cluster", ["--distributed"], ["--distributed"]),
    ("zero-length-parts", ["--length-parts", "0"], ["--length-parts"]),
    ("zero-checkpoint-every", ["--checkpoint-every", "0"], ["--checkpoint-every", ">= 1"]),
    ("nan-lr", ["--lr", "nan"], ["--lr", "finite"]),
    ("negative-lr", ["--lr", "-1"], ["--lr", "> 0"]),
    ("inf-inner-lr", ["--inner-lr", "inf"], ["--inner-lr", "finite"]),
    ("inf-reg-weight", ["--method", "reg", "--reg-weight", "inf"], ["--reg-weight", "finite"]),
    ("inf-gamma", ["--gamma", "inf"], ["--gamma"]),
    ("dropout-1", ["--method", "dropoutnet", "--dropout", "1"], ["--dropout", "[0, 1)"]),
    ("nan-baseline-lr", ["--method", "widedeep", "--baseline-lr", "nan"], ["--baseline-lr"]),
    ("negative-mf-l2", ["--method", "dropoutnet", "--mf-l2", "-0.1"], ["--mf-l2"]),
    ("nan-finetune-lr", ["--method", "widedeep", "--finetune-lr", "nan"], ["--finetune-lr"]),
    ("resume-and-overwrite", ["--resume", "--overwrite"], ["--resume", "--overwrite"]),
]

# Cases run as real commands in a subprocess (by case id; "one-group" is a case of both
# commands, so seven in all): flag and data errors of each command, and joining a
# multi-process job (jax.distributed), which would stay joined in this process.
AS_SUBPROCESS = {"unknown-backbone", "corrupt-npz", "distributed-outside-a-cluster",
                "unknown-protocol", "one-group", "--tau"}


def _fill(args, folders) -> list[str]:
  return [a.format(**{k: str(v) for k, v in folders.items()}) for a in args]


@pytest.mark.parametrize("case,args,names", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_run_py_reports_bad_input_in_one_line(folders, tmp_path, monkeypatch, case, args,
                                              names):
  base = ["--dataset", folders["good"], "--out", tmp_path / "out", "--epochs", "1",
          "--seeds", "1", "--quiet"]
  result = _cli("run", [*base, *_fill(args, folders)], _env(tmp_path / "cache"), tmp_path,
                monkeypatch, case)
  assert_one_line_error(result, *names, program=_program("run", case))
  assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("flag,value,dataset", [
    ("--backbone", "transformer", "{missing-split}"), ("--tau", "2", "ml100k"),
    ("--seeds", "0", "{one-group}")])
def test_flag_errors_come_before_any_data_is_read(folders, tmp_path, monkeypatch, flag, value,
                                                  dataset):
  # A broken folder, or a named dataset that is not cached and cannot be downloaded: the
  # flag must be reported, not the data.
  result = _cli("run", [flag, value, "--dataset", *_fill([dataset], folders), "--quiet"],
                _env(tmp_path / "empty-cache"), tmp_path, monkeypatch, flag)
  assert_one_line_error(result, flag, program=_program("run", flag))
  assert not (tmp_path / "empty-cache").exists()


def _write_csvs(folder: pathlib.Path, *, groups=("F", "M")) -> dict:
  rng = np.random.default_rng(0)
  folder.mkdir(parents=True, exist_ok=True)
  users = [f"user,age,gender"] + [f"{u},{rng.integers(1, 5)},{groups[u % len(groups)]}"
                                  for u in range(40)]
  ratings = ["user,item,rating"] + [f"{u},{i},{rng.integers(1, 6)}" for u in range(40)
                                    for i in rng.choice(30, 15, replace=False)]
  (folder / "users.csv").write_text("\n".join(users) + "\n")
  (folder / "ratings.csv").write_text("\n".join(ratings) + "\n")
  return {"ratings": folder / "ratings.csv", "users": folder / "users.csv"}


DATA_PREP_CASES = [
    ("unknown-dataset", ["--dataset", "movielens"], ["--dataset", "movielens"]),
    ("unknown-protocol", ["--dataset", "ml100k", "--protocol", "imdb"], ["--protocol"]),
    ("not-an-int", ["--dataset", "synthetic", "--seed", "x"], ["--seed"]),
    ("bad-bounds", ["--dataset", "synthetic", "--min-interactions", "0"], ["--min-interactions"]),
    ("unwritable-out", ["--dataset", "synthetic", "--num-minority", "20", "--num-majority", "60",
                        "--out", "{root}/a-file/out"], ["cannot write", "a-file/out"]),
    ("unwritable-out-before-any-data", ["--dataset", "ml100k", "--out", "{root}/a-file/out"],
     ["cannot write", "a-file/out"]),
    ("not-a-data-folder", ["--dataset", "synthetic", "--num-minority", "20", "--num-majority",
                           "60", "--out", "{root}"], ["--out"]),
    ("one-group", ["--dataset", "custom", "--ratings", "{one}/ratings.csv", "--users",
                   "{one}/users.csv", "--sensitive", "gender"], ["users.csv", "gender"]),
    ("unknown-sensitive", ["--dataset", "custom", "--ratings", "{two}/ratings.csv", "--users",
                           "{two}/users.csv", "--sensitive", "sex"], ["users.csv", "sex"]),
    ("no-sensitive", ["--dataset", "custom", "--ratings", "{two}/ratings.csv", "--users",
                      "{two}/users.csv"], ["--sensitive"]),
    ("duplicates-for-synthetic", ["--dataset", "synthetic", "--duplicates", "last"],
     ["--duplicates", "synthetic"]),
]


@pytest.mark.parametrize("case,args,names", DATA_PREP_CASES,
                         ids=[c[0] for c in DATA_PREP_CASES])
def test_data_prep_reports_bad_input_in_one_line(folders, tmp_path, monkeypatch, case, args,
                                                 names):
  _write_csvs(tmp_path / "one", groups=("F",))
  _write_csvs(tmp_path / "two")
  places = {**folders, "one": tmp_path / "one", "two": tmp_path / "two"}
  args = [a.format(**{k: str(v) for k, v in places.items()}) for a in args]
  if "--out" not in args:
    args += ["--out", str(tmp_path / "out")]
  result = _cli("data_prep", [*args, "--no-progress"], _env(tmp_path / "cache"), PROJECT_ROOT,
                monkeypatch, case)
  assert_one_line_error(result, *names, program=_program("data_prep", case))
  assert not (tmp_path / "out").exists()


def test_the_same_command_twice_gives_identical_results(folders, tmp_path):
  outs = [tmp_path / "a", tmp_path / "b"]
  args = ["--dataset", folders["good"], "--epochs", "1", "--seeds", "2", "--batch-size", "16",
          "--quiet"]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(lambda out: _run([RUN, *args, "--out", out],
                                             _env(tmp_path / "cache"), tmp_path), outs))
  for r in results:
    assert r.returncode == 0, r.stderr[-3000:]
  a, b = ((out / "results.json").read_bytes() for out in outs)
  assert a == b
  assert len(json.loads(a)["per_seed"]) == 2
  # Per-epoch logs agree too, apart from the wall-clock seconds.
  logs = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
           for line in (out / "metrics.jsonl").read_text().splitlines()] for out in outs]
  assert logs[0] == logs[1] and len(logs[0]) == 2  # 1 epoch x 2 seeds


@pytest.fixture(scope="module")
def global_mean_run(folders):
  """A finished run folder (the global mean: no training, no p) on the small folder."""
  from fast_jax.cli.run import main
  out = folders["root"] / "global-mean-run"
  with contextlib.redirect_stdout(io.StringIO()):
    assert main(["--dataset", str(folders["good"]), "--method", "global-mean", "--seeds", "1",
                 "--quiet", "--out", str(out)]) == 0
  return out


# (case id, fast-jax command and arguments with {root}/{good}/{run}/{tmp} placeholders,
# names the message must hold): the drivers other than run and prep.
DRIVER_CASES = [
    ("collect-no-such-folder", ["collect", "{root}/no-such-run", "--out", "{tmp}/t"],
     ["no-such-run", "no such run folder"]),
    ("collect-nothing-finished", ["collect", "{root}", "--out", "{tmp}/t"],
     ["finished run", "results.json"]),
    ("collect-broken-results", ["collect", "{broken}", "--out", "{tmp}/t"],
     ["broken/results.json", "not a results file"]),
    ("collect-unwritable-out", ["collect", "{run}", "--out", "{root}/a-file/t"],
     ["cannot write", "a-file/t.csv"]),
    ("plot-scatter-no-csv", ["plot", "scatter", "{root}/none.csv", "{tmp}/x.png"],
     ["none.csv"]),
    ("plot-scatter-not-a-table", ["plot", "scatter", "{other}", "{tmp}/x.png"],
     ["other.csv", "no column gf_mae"]),
    ("plot-scatter-not-a-csv", ["plot", "scatter", "{run}/results.json", "{tmp}/x.png"],
     ["results.json", "cannot read it as a CSV"]),
    ("plot-p-not-a-run", ["plot", "p", "{root}", "--out", "{tmp}/p.png"],
     ["not a run folder", "metrics.jsonl"]),
    ("plot-p-without-p", ["plot", "p", "{run}", "--out", "{tmp}/p.png"],
     ["metrics.jsonl", "no p"]),
    ("table2-unwritable-root", ["table2", "--datasets", "{good}", "--rows", "global-mean",
                                "--seeds", "1", "--root", "{root}/a-file/runs", "--out",
                                "{tmp}/t"], ["--root", "a-file/runs"]),
    ("table2-nothing-to-collect", ["table2", "--datasets", "{good}", "--rows", "global-mean",
                                   "--collect-only", "--root", "{tmp}/empty", "--out",
                                   "{tmp}/t"], ["--collect-only", "none of the 1 runs"]),
    ("figure4-tau-above-1", ["figure4", "--taus", "0.1", "2", "--root", "{tmp}/runs", "--out",
                             "{tmp}/t"], ["--tau", "<= 1"]),
    ("tune-screen-not-a-screen", ["tune", "--datasets", "ml100k", "--screen", "{other}", "--top",
                                  "2", "--root", "{tmp}/runs", "--out", "{tmp}/t"],
     ["--screen", "other.csv", "no column backbone"]),
    ("tune-nothing-to-collect", ["tune", "--datasets", "ml100k", "--collect-only", "--root",
                                 "{tmp}/empty", "--out", "{tmp}/t"],
     ["--collect-only", "none of the", "empty"]),
    ("bench-unknown-dataset", ["bench", "--dataset", "nosuchdata"], ["--dataset", "nosuchdata"]),
]


@pytest.mark.parametrize("case,args,names", DRIVER_CASES, ids=[c[0] for c in DRIVER_CASES])
def test_the_other_drivers_report_bad_input_in_one_line(folders, global_mean_run, tmp_path,
                                                        monkeypatch, case, args, names):
  from fast_jax import cli
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "results.json").write_text('{"config": {"method": ')
  (tmp_path / "other.csv").write_text("dataset,row,mae\nml100k,melu-fast,0.9\n")
  places = {**folders, "run": global_mean_run, "tmp": tmp_path, "broken": broken,
            "other": tmp_path / "other.csv"}
  monkeypatch.setattr(sys, "argv", ["fast-jax"])  # cli.main names the command in argv[0]
  result = _main(cli.main, _fill(args, places), _env(tmp_path / "cache"), monkeypatch)
  lines = result.stderr.splitlines()
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  assert "Traceback" not in result.stderr
  # collect warns, one line, about a given folder without results, before its error.
  errors = [line for line in lines if not line.startswith("warning: ")]
  assert len(errors) == 1 and errors[0].startswith(f"fast-jax {args[0]}: error: "), lines
  for name in names:
    assert name in errors[0], (name, errors[0])
  assert not list(tmp_path.glob("t.*")) and not list(tmp_path.glob("*.png"))
  assert not (tmp_path / "runs").exists()  # no run started
