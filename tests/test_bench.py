"""``experiments/bench.py``: the run breakdown's table against sums and medians worked out
here, a tiny real run of two seeds through it, and the padding probe's truncated data."""

import os
import types

import numpy as np
import pytest

from fast_jax.cli import bench
from fast_jax import config as config_lib
from fast_jax.config import Config
from fast_jax.runner import Runner
from conftest import TINY

# Per-seed phase times as bench_breakdown returns them: the first seed also holds the
# one-off phases.
PHASES = ("init", "train steps", "validation", "test", "attacker")
BREAKDOWNS = [
    [{"load data": 0.5, "build": 1.0, "compile": 9.0, "train steps": 12.0, "validation": 0.8,
      "test": 2.9, "attacker": 3.8}],
    [{"load data": 0.5, "build": 1.0, "compile": 9.0, "train steps": 12.0, "validation": 0.8,
      "test": 2.9, "attacker": 3.8},
     {"train steps": 11.0, "validation": 0.7, "test": 0.1, "attacker": 0.2},
     {"train steps": 13.0, "validation": 0.9, "test": 0.3, "attacker": 0.1},
     {"train steps": 12.5, "validation": 0.6, "test": 0.2, "attacker": 0.4}],
]


# Rows kept by the padding probe (--cut-rows): fewer than every user has, fewer than some,
# all of them.
CUTS = [3, 8, 1000]


def _table(text: str) -> dict[str, list[float]]:
  rows = {}
  for line in text.splitlines()[2:]:
    name, rest = line[:16].strip(), line[16:]
    rows[name] = [float(v) for v in rest.replace("%", "").split() if v != "s"]
  return rows


@pytest.mark.parametrize("per_seed", BREAKDOWNS)
def test_breakdown_table_sums_the_seeds_and_takes_the_median_of_the_later_ones(per_seed, capsys):
  bench.print_breakdown(per_seed, "title")
  out = capsys.readouterr().out
  total = sum(sum(t.values()) for t in per_seed)
  assert out.splitlines()[0] == f"title: {total:.1f} s"
  rows = _table(out)
  assert list(rows) == list(per_seed[0])
  for phase, values in rows.items():
    whole = sum(t.get(phase, 0.0) for t in per_seed)
    first, *middle, whole_printed, share = values
    assert first == pytest.approx(per_seed[0][phase], abs=5e-3)
    assert whole_printed == pytest.approx(whole, abs=5e-3)
    assert share == pytest.approx(100 * whole / total, abs=0.05)
    if len(per_seed) > 1 and phase not in bench.ONCE:
      assert middle == [pytest.approx(np.median([t[phase] for t in per_seed[1:]]), abs=5e-3)]
    else:
      assert middle == []


def test_breakdown_of_a_tiny_run_times_every_phase_of_every_seed(prepared, monkeypatch):
  data = prepared("synthetic", **TINY)
  monkeypatch.setattr(bench, "load_dataset", lambda cfg, progress: data)
  per_seed = bench.bench_breakdown(Config(dataset="synthetic", method="fast", batch_size=8),
                                   epochs=2, seeds=2)
  assert len(per_seed) == 2
  assert set(bench.ONCE) <= set(per_seed[0]) and not set(bench.ONCE) & set(per_seed[1])
  for t in per_seed:
    assert set(PHASES) <= set(t)
    assert all(v >= 0 for v in t.values())
    assert all(t[k] > 0 for k in PHASES)


@pytest.mark.parametrize("rows", CUTS)
def test_truncate_users_keeps_each_users_first_rows(prepared, rows):
  data = prepared("synthetic", **TINY)
  cut = bench.truncate_users(data, rows)
  for name in ("train", "valid", "test"):
    a, b = data.split(name), cut.split(name)
    n = min(rows, a.max_len)
    assert b.max_len == n
    np.testing.assert_array_equal(b.x, a.x[:, :n])
    np.testing.assert_array_equal(b.y, a.y[:, :n])
    np.testing.assert_array_equal(b.length, np.minimum(a.length, n))
    np.testing.assert_array_equal(b.group, a.group)
  assert cut.meta["max_len"] == min(rows, data.train.max_len)


# A stand-in for the authors' main.py: it records its command line and holds 40 MB more
# per epoch, so that each call's own peak memory can be told apart.
FAKE_AUTHORS = """
import json, sys
n = int(sys.argv[sys.argv.index("--num_epoch") + 1])
hold = bytearray(40 * 2**20 * n)
hold[::4096] = b"x" * len(hold[::4096])
with open("calls.jsonl", "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\\n")
if "--fail" in open("mode.txt").read():
  sys.exit("CUDA is not available")
"""


def _fake_authors(tmp_path, mode=""):
  (tmp_path / "main.py").write_text(FAKE_AUTHORS)
  (tmp_path / "mode.txt").write_text(mode)
  return str(tmp_path)


@pytest.mark.parametrize("epochs", [2, 3])
def test_run_authors_passes_their_command_and_reports_each_calls_own_peak_memory(tmp_path,
                                                                                 epochs):
  import json
  import sys
  folder = _fake_authors(tmp_path)
  wall_more, rss_more = bench.run_authors(folder, sys.executable, epochs)
  wall_one, rss_one = bench.run_authors(folder, sys.executable, 1)  # after the larger one
  calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
  assert calls == [[*bench.AUTHORS_COMMAND[1:], "--num_epoch", str(e)] for e in (epochs, 1)]
  assert wall_one > 0 and wall_more > 0
  assert rss_more - rss_one == pytest.approx(40 * (epochs - 1), abs=15)


def test_run_authors_failure_is_one_line_naming_the_folder(tmp_path):
  import sys
  folder = _fake_authors(tmp_path, mode="--fail")
  with pytest.raises(RuntimeError, match=r"exited with status 1: CUDA is not available$"):
    bench.run_authors(folder, sys.executable, 1)


@pytest.mark.parametrize("argv, message", [
    (["--authors", "{tmp}/missing"], "expected a checkout of zhengz99/FAST"),
    (["--authors", "{tmp}", "--authors-python", "no-such-python"],
     "expected a Python that can import torch"),
    (["--authors", "{tmp}", "--authors-python", "{python}"],  # the tests' Python: no torch
     "expected a Python that can import torch"),
    (["--authors", "{tmp}", "--authors-python", "no-such-python", "--epochs", "1"],
     "--authors needs --epochs of at least 2"),
    (["--authors", "{tmp}", "--authors-python", "no-such-python", "--rounds", "0"],
     "--rounds must be at least 1, got 0"),
    (["--inner-forms", "--rounds", "0"], "--rounds must be at least 1, got 0"),
    (["--inner-forms", "--method", "widedeep"],
     "--inner-forms: --method must be a meta-learning method"),
    (["--query-layouts", "--method", "nlba"],
     "--query-layouts: --method must be a meta-learning method"),
])
def test_authors_flags_are_checked_before_anything_runs(tmp_path, capsys, argv, message):
  import importlib.util
  import sys
  if "{python}" in argv and importlib.util.find_spec("torch") is not None:
    pytest.skip("this Python has torch")
  _fake_authors(tmp_path)
  with pytest.raises(SystemExit) as e:
    bench.main([a.format(tmp=tmp_path, python=sys.executable) for a in argv])
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_side_by_side_rounds_time_both_modes_and_print_median_ratios(tmp_path, prepared,
                                                                     monkeypatch, capsys):
  import sys
  data = prepared("synthetic", **TINY)
  monkeypatch.setattr(bench, "load_dataset", lambda cfg, progress: data)
  built = []
  monkeypatch.setattr(bench, "Runner",
                      lambda cfg, data: built.append(Runner(cfg, data)) or built[-1])
  rounds = bench.bench_authors(_fake_authors(tmp_path), sys.executable, None, rounds=3,
                               epochs=2, dataset="synthetic", batch_size=8)
  assert len(rounds) == 3
  assert [(r.cfg.p_update, r.cfg.gap_loss) for r in built] == [("step", "mse"), ("epoch", "mae")]
  for r in rounds:
    assert r["step_s"] > 0 and r["epoch_s"] > 0
    assert r["authors_rss_mb"][1] - r["authors_rss_mb"][0] == pytest.approx(40, abs=15)
  bench.print_authors(rounds, 2)
  out = capsys.readouterr().out
  for mode in ("step", "epoch"):
    ratio = np.median([r["authors_s"] / r[f"{mode}_s"] for r in rounds])
    assert f"x{ratio:.1f}" in out


def test_inner_forms_refuses_a_setting_of_more_than_one_inner_step(prepared, monkeypatch,
                                                                   capsys):
  data = prepared("ml100k")
  monkeypatch.setattr(bench, "load_dataset", lambda cfg, progress: data)
  with pytest.raises(SystemExit) as e:
    bench.main(["--inner-forms", "--backbone", "melu", "--dataset", "ml100k"])
  assert e.value.code == 2
  assert "melu on ml100k takes 3 inner steps" in capsys.readouterr().err


# (the command's flag, the switch it turns, what a bench function returns, the printed
# header, the label of the switch on)
SWITCHES = [
    ("--inner-forms", "ONE_STEP_KERNEL", "bench_inner_forms", "one inner step, 3 rounds",
     "kernel form"),
    ("--query-layouts", "QUERY_FIRST", "bench_variants", "1 inner step(s), 3 rounds",
     "query first"),
    ("--part-choice", "PARTS_OUTSIDE_GRAD", "bench_variants", "1 inner step(s), 3 rounds",
     "switch outside"),
]


@pytest.mark.parametrize("flag,switch,fn,header,label", SWITCHES)
def test_variants_time_both_programs_alternately_and_print_their_median_ratio(
    prepared, monkeypatch, capsys, flag, switch, fn, header, label):
  data = prepared("synthetic", **TINY)
  seen = []
  real_runner = bench.Runner

  def runner(cfg, data):
    seen.append(getattr(bench.learn, switch))
    return real_runner(cfg, data)
  monkeypatch.setattr(bench, "Runner", runner)
  monkeypatch.setattr(bench.learn, switch, None)
  cfg = config_lib.resolve(Config(dataset="synthetic", backbone="metacs", batch_size=8),
                           "synthetic")
  pair = {"ONE_STEP_KERNEL": bench.INNER_FORMS, "QUERY_FIRST": bench.QUERY_LAYOUTS,
          "PARTS_OUTSIDE_GRAD": bench.PART_CHOICES}[switch]
  r = bench.bench_variants(cfg, data, 3, pair)
  assert seen == [False, True]  # the switch off, then on
  assert getattr(bench.learn, switch) is None  # and put back as it was
  assert [len(t) for t in r["times"].values()] == [3, 3]
  assert 0 <= r["params_diff"] < 1e-2  # the same function up to (Adam-amplified) rounding
  # The command line: its settings reach the bench, whose result it prints.
  calls = []
  monkeypatch.setattr(bench, "load_dataset", lambda cfg, progress: data)
  monkeypatch.setattr(bench, fn, lambda cfg, data, rounds, *pair: calls.append(
      (cfg.backbone, rounds) + pair) or r)
  assert bench.main([flag, "--dataset", "synthetic", "--backbone", "metacs",
                     "--batch-size", "8", "--rounds", "3"]) == 0
  assert calls == [("metacs", 3) + (() if fn == "bench_inner_forms" else (pair,))]
  out = capsys.readouterr().out
  assert f"metacs+fast on synthetic, {header}" in out
  ratio = np.median(r["times"]["off"]) / np.median(r["times"]["on"])
  assert f"{label} x{ratio:.2f} (ratio of medians)" in out
  for variant in ("off", "on"):
    assert f"median {np.median(r['times'][variant]):.3f}" in out


@pytest.mark.parametrize("flags", ["", "--xla_cpu_use_fusion_emitters=false"])
def test_header_names_the_backend_jax_version_and_xla_flags_when_set(monkeypatch, flags):
  import jax
  monkeypatch.setenv("XLA_FLAGS", flags)
  line = bench.backend()
  assert line.startswith(f"{jax.default_backend()} (JAX {jax.__version__}")
  assert ("XLA_FLAGS" in line) == bool(flags) and flags in line


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and two CPUs")
def test_side_by_side_trains_copies_at_once_held_to_their_cpus_and_free(prepared, monkeypatch,
                                                                        capsys):
  """Two spawned processes per round and mode: held, each on CPUs of its own; free, both on
  all of this process's CPUs; the printed ratio is that of the medians."""
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("FAST_JAX_PIN_JOBS", raising=False)
  data = prepared("synthetic", **TINY)
  cfg = config_lib.resolve(Config(dataset="synthetic", backbone="metacs", batch_size=8),
                           "synthetic")
  r = bench.bench_side_by_side(cfg, data, jobs=2, epochs=1, rounds=1)
  everything = sorted(os.sched_getaffinity(0))
  (held,), (free,) = r["held"], r["free"]
  assert len({p["pid"] for p in held}) == 2 and len({p["pid"] for p in free}) == 2
  assert not set(held[0]["cpus"]) & set(held[1]["cpus"])
  assert sorted(held[0]["cpus"] + held[1]["cpus"]) == everything
  assert [p["cpus"] for p in free] == [everything, everything]
  assert all(p["epoch_s"] > 0 for p in held + free)
  bench.print_side_by_side(r)
  out = capsys.readouterr().out
  ratio = np.median([p["epoch_s"] for p in held]) / np.median([p["epoch_s"] for p in free])
  assert f"-> held x{ratio:.2f} as long" in out
  # One copy is not side by side; nor is a setting whose jobs cannot be held to CPUs.
  with pytest.raises(SystemExit) as e:
    bench.main(["--side-by-side", "--jobs", "1"])
  assert e.value.code == 2 and "--jobs must be at least 2" in capsys.readouterr().err
  monkeypatch.setenv("FAST_JAX_PIN_JOBS", "0")
  with pytest.raises(ValueError, match="cannot be held to CPUs"):
    bench.bench_side_by_side(cfg, data, jobs=2, epochs=1, rounds=1)


def test_profile_sums_the_traced_operations_per_epoch(prepared, tmp_path):
  """--profile: the trace of a tiny real epoch, summed per operation, holds the epoch's
  compiled operations (named as in the HLO written beside it), longest first."""
  data = prepared("synthetic", **TINY)
  cfg = config_lib.resolve(Config(dataset="synthetic", backbone="metacs", batch_size=8),
                           "synthetic")
  r = bench.profile_epochs(Runner(cfg, data), 2, tmp_path, top=5)
  hlo = (tmp_path / "epoch.hlo.txt").read_text()
  assert "ENTRY" in hlo
  assert list(tmp_path.rglob("*.xplane.pb"))
  assert 0 < len(r["top"]) <= 5 and r["count"] >= len(r["top"])
  seconds = [s for _, s, _ in r["top"]]
  assert seconds == sorted(seconds, reverse=True) and seconds[0] > 0
  assert 0 < sum(seconds) <= r["busy_s"] + 1e-12
  for name, _, runs in r["top"]:
    assert name.split(".")[0] in hlo and runs > 0


def _plane(name, lines):
  """A stand-in for a profiler plane: ``lines`` {line name: [(event, ns, stats)]}."""
  event = lambda n, ns, stats: types.SimpleNamespace(name=n, duration_ns=ns, stats=stats)
  return types.SimpleNamespace(name=name, lines=[
      types.SimpleNamespace(name=line, events=[event(*e) for e in events])
      for line, events in lines.items()])


HOST = _plane("/host:CPU", {"tf_XLACpuThunk": [
    ("fusion.3", 40, [("hlo_op", "fusion.3"), ("hlo_module", "jit_epoch")]),
    ("PjitFunction(epoch)", 900, [("hlo_module", "jit_epoch")])]})
GPU = _plane("/device:GPU:0", {
    "Stream #13(Compute)": [("gemm_kernel", 300, []), ("loop_fusion_kernel", 120, [])],
    "XLA Ops": [("command_buffer.1", 420, [("hlo_op", "command_buffer.1")])],
    "Steps": [("0", 420, [])]})
# (the trace's planes, the operations that device_events sums): a GPU's stream kernels
# (not the derived lines that repeat them, not the host's operations); a CPU's
# operations, only events that name one.
TRACES = [
    ([HOST, GPU], [("gemm_kernel", 300.0), ("loop_fusion_kernel", 120.0)]),
    ([GPU], [("gemm_kernel", 300.0), ("loop_fusion_kernel", 120.0)]),
    ([HOST], [("fusion.3", 40.0)]),
]


@pytest.mark.parametrize("planes,expected", TRACES)
def test_trace_events_are_the_device_kernels_or_else_the_host_operations(planes, expected):
  assert bench.plane_events(planes) == expected
