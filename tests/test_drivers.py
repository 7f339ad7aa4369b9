"""The table/figure drivers tabulate finished runs (the committed code-preset runs in
results/runs_code) correctly."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest

from fast_jax.config import REFERENCE

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script, *args):
  return subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_table2_collects_runs_beside_the_paper_values(tmp_path):
  out = tmp_path / "table2"
  proc = _run("table2.py", "--collect-only", "--preset", "code", "--datasets", "bookcrossing",
              "--out", str(out))
  assert proc.returncode == 0, proc.stderr
  rows = {r["row"]: r for r in csv.DictReader(open(out.with_suffix(".csv")))}
  assert float(rows["global-mean"]["mae"]) == pytest.approx(1.484, abs=5e-4)
  fast = rows["melu-fast"]
  assert float(fast["mae_paper"]) == 1.473 and int(fast["seeds"]) == 5
  assert "melu-fast" in out.with_suffix(".md").read_text()
  assert (tmp_path / "table2_scatter.png").stat().st_size > 10_000


def test_figure3_plots_finished_runs(tmp_path):
  out = tmp_path / "figure3"
  proc = _run("figure3.py", "--collect-only", "--preset", "code", "--datasets", "ml100k",
              "--backbones", "melu", "--out", str(out))
  assert proc.returncode == 0, proc.stderr
  labels = {r["label"] for r in csv.DictReader(open(out.with_suffix(".csv")))}
  assert labels == {"origin", "static", "fast"}
  assert out.with_suffix(".png").stat().st_size > 10_000
  assert (tmp_path / "figure3_p.png").exists()


def test_figure4_compares_each_point_with_origin_seed_by_seed(tmp_path):
  """The *_vs_origin columns are the per-seed differences from Table 2's Origin run,
  recomputed here from the committed results.json files."""
  out = tmp_path / "figure4"
  proc = _run("figure4.py", "--collect-only", "--preset", "code", "--backbones", "metacs",
              "--gammas", "0.1", "--taus", "0.01", "--out", str(out))
  assert proc.returncode == 0, proc.stderr
  rows = {r["label"]: r for r in csv.DictReader(open(out.with_suffix(".csv")))}
  assert sorted(rows) == ["gamma=0.1", "tau=0.01"]
  runs = ROOT / "results" / "runs_code" / "bookcrossing"
  origin = {r["seed"]: r for r in
            json.loads((runs / "metacs-origin" / "results.json").read_text())["per_seed"]}
  for label, folder in (("gamma=0.1", "metacs-g0.1-t0.8"), ("tau=0.01", "metacs-g0.3-t0.01")):
    point = json.loads((runs / "sweep-step" / folder / "results.json").read_text())["per_seed"]
    assert len(point) == 5
    for m in ("mae", "gf_mae"):
      d = [r[m] - origin[r["seed"]][m] for r in point]
      assert float(rows[label][f"{m}_vs_origin"]) == pytest.approx(sum(d) / 5, abs=1e-4)
      assert float(rows[label][f"{m}_vs_origin_std"]) == pytest.approx(
          (sum((x - sum(d) / 5) ** 2 for x in d) / 5) ** 0.5, abs=1e-4)
    fairer = sum(r["gf_mae"] < origin[r["seed"]]["gf_mae"] for r in point)
    assert int(rows[label]["seeds_fairer"]) == fairer
    assert f"metacs {label}: against Origin seed by seed" in proc.stdout
  assert out.with_suffix(".png").stat().st_size > 10_000


def test_figure4_pairs_over_the_points_own_seeds_and_skips_seeds_origin_lacks(tmp_path):
  from fast_jax.cli import figure4
  for name, seeds in (("a", [1, 2]), ("b", [1, 4])):
    (tmp_path / name).mkdir()
    per_seed = [{"seed": s, "mae": 1.0 + s / 10, "gf_mae": 0.05 * s} for s in seeds]
    (tmp_path / name / "results.json").write_text(json.dumps({"per_seed": per_seed}))
  origin = {"melu": {s: {"seed": s, "mae": 1.0, "gf_mae": 0.08} for s in (1, 2, 3)}}
  rows = [{"name": n, "backbone": "melu", "label": n} for n in ("a", "b")]
  figure4.add_paired_differences(rows, origin, tmp_path)
  assert rows[0]["mae_vs_origin"] == pytest.approx(0.15)  # seeds 1 and 2 only
  assert rows[0]["mae_vs_origin_std"] == pytest.approx(0.05)
  assert rows[0]["gf_mae_vs_origin"] == pytest.approx(-0.005)
  assert rows[0]["seeds_fairer"] == 1
  assert "mae_vs_origin" not in rows[1]  # Origin has no seed 4
  assert figure4.origin_means(origin, [1, 2]) == {"melu": {"mae": 1.0, "gf_mae": 0.08}}
  assert figure4.origin_means(origin, [1, 4]) == {}


P_AVERAGE_FLAGS = [[], ["--p-average"]]


@pytest.mark.parametrize("flags", P_AVERAGE_FLAGS)
def test_figure4_p_average_runs_its_own_grid_into_its_own_files(flags, monkeypatch):
  """--p-average turns on the convergent p update in every point and keeps its runs and
  files apart from the paper rule's grid (which stays the default)."""
  from fast_jax.cli import figure4
  seen = {}

  def fake_run_and_collect(runs, args):
    seen["runs"], seen["args"] = runs, args
    raise SystemExit(0)

  monkeypatch.setattr(figure4, "run_and_collect", fake_run_and_collect)
  with pytest.raises(SystemExit):
    figure4.main(["--backbones", "metacs", "--gammas", "1", "--taus", "0.1", *flags])
  runs, args = seen["runs"], seen["args"]
  avg = bool(flags)
  assert [r.cfg.p_average for r in runs] == [avg, avg]
  assert all(r.name.startswith("bookcrossing/sweep-step" + ("-avg/" if avg else "/"))
             for r in runs)
  assert args.out.name == ("figure4_avg" if avg else "figure4")


def test_figure4_p_stability_is_the_last_ten_epochs_mean_and_range(tmp_path):
  from fast_jax.cli import figure4
  run = tmp_path / "point"
  run.mkdir()
  lines = []
  for seed, trace in ((1, [0.5] * 5 + [0.9, 0.7] * 5), (2, [0.5] * 15)):
    for epoch, p0 in enumerate(trace, 1):
      lines.append(json.dumps({"seed": seed, "epoch": epoch, "p": [p0, 1 - p0],
                               "group_loss": [1.0, 1.0]}))
  (run / "metrics.jsonl").write_text("\n".join(lines))
  rows = [{"name": "point"}]
  figure4.add_p_stability(rows, tmp_path)
  assert rows[0]["p0_last10"] == pytest.approx((0.8 + 0.5) / 2)
  assert rows[0]["p0_swing_last10"] == pytest.approx((0.2 + 0.0) / 2)


# Backends of the vmapped grid's grouping: on a CPU a lone run trains on its own.
GRID_BACKENDS = ["cpu", "gpu"]


@pytest.mark.parametrize("backend", GRID_BACKENDS)
def test_vmapped_grid_groups_the_runs_that_differ_in_sweep_points_and_rows(tmp_path,
                                                                           monkeypatch,
                                                                           backend):
  import jax
  from fast_jax.cli import grid
  from fast_jax import experiment
  from fast_jax.config import Config
  calls = []
  fake = {"mean": {k: 0.0 for k in grid.METRICS}}

  def sweep(cfgs, folders, **kw):
    calls.append(("sweep", [(c.backbone, c.method, c.gamma) for c in cfgs]))
    return [fake] * len(cfgs)

  def single(cfg, folder, **kw):
    calls.append(("single", [(cfg.method, cfg.gamma)]))
    return fake
  monkeypatch.setattr(experiment, "sweep_and_evaluate", sweep)
  monkeypatch.setattr(experiment, "train_and_evaluate", single)
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  runs = [grid.Run(f"r{i}", Config(backbone=b, method=m, gamma=g))
          for i, (b, m, g) in enumerate([("melu", "fast", 1.0), ("metacs", "fast", 1.0),
                                         ("melu", "fast", 2.0), ("melu", "global-mean", 1.0),
                                         ("melu", "origin", 1.0), ("melu", "ipw", 1.0),
                                         ("melu", "static", 1.0), ("melu", "clover", 1.0)])]
  out = grid.run_grid(runs, tmp_path, vmap=True, log=lambda s: None)
  assert sorted(out) == [f"r{i}" for i in range(8)]
  alone = [("melu", "clover", 1.0), ("melu", "static", 1.0), ("metacs", "fast", 1.0)]
  if backend == "cpu":  # a run with nothing to group with: its seeds one after another
    alone = [("single", [(m, g)]) for _, m, g in alone]
  else:
    alone = [("sweep", [run]) for run in alone]
  assert sorted(calls) == sorted([("single", [("global-mean", 1.0)]),
                                  ("sweep", [("melu", "fast", 1.0), ("melu", "fast", 2.0),
                                             ("melu", "origin", 1.0), ("melu", "ipw", 1.0)]),
                                  *alone])
  assert "one vectorised program with 4 runs" in (tmp_path / "r2" / "wall_time.txt").read_text()


@pytest.mark.parametrize("vmap", [False, True])
def test_a_grid_of_several_jobs_starts_its_largest_groups_first(shared_data_dir, vmap):
  """With --jobs > 1 the grid starts its groups largest first (a long group started last
  leaves the other jobs idle); one job at a time keeps the given order."""
  from fast_jax.cli import grid, table2
  from fast_jax.config import Config
  runs = table2.make_runs(["ml100k"], table2.ROWS, seeds=5, epochs=None,
                          data_dir=str(shared_data_dir), p_update="step")
  given = grid.plan(runs, vmap=vmap, largest_first=False)  # each group where it first appears
  names = [r.name for r in runs]
  assert [g[0].name for g in given] == sorted((g[0].name for g in given), key=names.index)
  assert sorted(r.name for g in given for r in g) == sorted(names)
  order = [[r.name.split("/")[1] for r in g]
           for g in grid.plan(runs, vmap=vmap, largest_first=True)]
  rows = ["melu-origin", "melu-reg", "melu-ipw", "melu-fast-step"]
  if vmap:  # a backbone's four rows in one program outweigh its CLOVER run
    assert order[:3] == [rows, [r.replace("melu", "metacs") for r in rows], ["melu-clover"]]
  else:  # MeLU's 3 inner steps and CLOVER's adversary first, MetaCS's rows after MeLU's
    assert order[:5] == [["melu-clover"], *[[r] for r in rows]]
    assert order[5] == ["metacs-clover"]
  assert sorted(g[0] for g in order[-3:]) == sorted(REFERENCE)  # they train nothing
  # The estimate: runs x seeds x epochs x training users x (inner steps + 1).
  cfg = Config(backbone="melu", method="origin", dataset="ml1m", seeds=5)
  assert grid.work_estimate([cfg] * 4, {"ml1m": (2322, "ml1m")}) == 4 * 5 * 50 * 2322 * (3 + 1)


# (CPUs the process may use, jobs) -> the CPUs each worker is held to.
WORKER_CPUS = [
    ({0, 1}, 2, [{0}, {1}]),
    ({0, 1}, 3, [{0}, {1}, {0}]),            # more jobs than CPUs: one CPU each, round robin
    (set(range(16)), 3, [set(range(6)), set(range(6, 11)), set(range(11, 16))]),
    ({2, 5, 7, 9}, 2, [{2, 5}, {7, 9}]),
    ({0, 1}, 1, [None]),                       # one job keeps every CPU
]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
@pytest.mark.parametrize("available, jobs, expected", WORKER_CPUS)
def test_a_grid_holds_each_job_to_its_own_cpus(monkeypatch, available, jobs, expected):
  from fast_jax.cli import grid
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("FAST_JAX_PIN_JOBS", raising=False)
  assert [set(c) if c else None for c in grid.worker_cpus(jobs, available)] == expected
  # Not where JAX may run on an accelerator, nor when switched off.
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert grid.worker_cpus(jobs, available) == [None] * jobs
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("FAST_JAX_PIN_JOBS", "0")
  assert grid.worker_cpus(jobs, available) == [None] * jobs


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and two CPUs")
def test_a_grid_worker_runs_on_the_cpus_it_was_given():
  """The grid's pool holds each spawned worker to its set of CPUs, or leaves it free."""
  from fast_jax.cli import grid
  everything, last = os.sched_getaffinity(0), max(os.sched_getaffinity(0))
  with grid.worker_pool([frozenset({last})]) as pool:
    assert pool.submit(os.sched_getaffinity, 0).result(timeout=120) == {last}
  with grid.worker_pool([None]) as pool:
    assert pool.submit(os.sched_getaffinity, 0).result(timeout=120) == everything


# (platforms JAX may use, jobs, a memory setting the user made) -> what each worker adds.
WORKER_MEMORY = [
    ("cuda,cpu", 3, {}, {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.300"}),
    ("cuda", 2, {}, {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.450"}),
    ("cuda", 1, {}, {}),                                       # one job: JAX's default
    ("cpu", 3, {}, {}),                                        # no accelerator
    ("cuda", 3, {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, {}),  # the user's choice
    ("cuda", 3, {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".2"}, {}),
]


@pytest.mark.parametrize("platforms, jobs, user, expected", WORKER_MEMORY)
def test_grid_workers_share_an_accelerators_memory(platforms, jobs, user, expected):
  from fast_jax.cli import grid
  assert grid.worker_memory(jobs, {"JAX_PLATFORMS": platforms, **user}) == expected


def test_a_grid_worker_starts_with_the_environment_it_was_given():
  from fast_jax.cli import grid
  with grid.worker_pool([None], {"FAST_JAX_TEST_WORKER": "7"}) as pool:
    assert pool.submit(os.getenv, "FAST_JAX_TEST_WORKER").result(timeout=120) == "7"


def test_table2_trains_runs_two_at_a_time_in_their_own_processes(tmp_path, shared_data_dir):
  """--jobs 2 on real ML-100K rows: each run in a spawned process gives the committed
  result, and the log reports the grid's wall time."""
  proc = _run("table2.py", "--datasets", "ml100k", "--rows", "global-mean", "support-mean",
              "--seeds", "1", "--jobs", "2", "--data-dir", str(shared_data_dir),
              "--root", str(tmp_path / "runs"), "--out", str(tmp_path / "table2"))
  assert proc.returncode == 0, proc.stderr
  assert "2 runs in" in proc.stdout and "(2 jobs at once)" in proc.stdout
  for row in ("global-mean", "support-mean"):
    ours = json.loads((tmp_path / "runs" / "ml100k" / row / "results.json").read_text())
    committed = json.loads((ROOT / "results" / "runs_code" / "ml100k" / row / "results.json")
                           .read_text())
    assert ours["mean"]["mae"] == pytest.approx(committed["mean"]["mae"], abs=1e-9)
    assert (tmp_path / "runs" / "ml100k" / row / "wall_time.txt").exists()
  bad = _run("table2.py", "--jobs", "0", "--collect-only")
  assert bad.returncode == 2 and "--jobs" in bad.stderr and "at least 1" in bad.stderr
  bad = _run("table2.py", "--datasets", "ml100k", "--rows", "global-mean", "support-mean",
             "--seeds", "0", "--jobs", "2", "--root", str(tmp_path / "bad"),
             "--out", str(tmp_path / "bad" / "table2"))
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert bad.stderr.strip() == "table2.py: error: --seeds must be >= 1, got 0"


def test_grid_refuses_a_finished_meta_learner_run_of_another_preset(tmp_path):
  from fast_jax.cli import grid
  from fast_jax.config import Config, UsageError
  for name, record in (("old", {"method": "origin"}),  # before presets: the code's
                       ("code", {"method": "origin", "preset": "code"}),
                       ("ref", {"method": "global-mean"})):
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(json.dumps(
        {"config": {**record, "seeds": 1}, "mean": {k: 0.0 for k in grid.METRICS}}))
  for name in ("old", "code"):
    with pytest.raises(UsageError,
                       match=f"{name} holds a finished run with preset='code', not 'validated'"):
      grid.run_grid([grid.Run(name, Config(method="origin", seeds=1))], tmp_path,
                    log=lambda s: None)
  same = grid.run_grid([grid.Run("code", Config(method="origin", seeds=1, preset="code")),
                        grid.Run("ref", Config(method="global-mean", seeds=1))], tmp_path,
                       log=lambda s: None)
  assert sorted(same) == ["code", "ref"]  # finished: nothing retrained


@pytest.mark.parametrize("setting, value", [("inner_lr", 0.5), ("gamma", 9.0), ("epochs", 7),
                                            ("p_average", True)])
def test_grid_refuses_a_finished_run_made_at_other_settings(tmp_path, setting, value):
  """A finished run is reused only at the settings asked for, resolved (an older default,
  another sweep's point is another experiment); where it was found and its seeds are not
  settings."""
  from fast_jax.cli import grid
  from fast_jax.config import Config, UsageError, resolve
  asked = Config(dataset="bookcrossing", backbone="metacs", method="fast", seeds=2)
  made = resolve(asked).replace(data_dir="/elsewhere", seeds=3)
  for name, cfg in (("same", made), ("other", made.replace(**{setting: value}))):
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(json.dumps(
        {"config": cfg.to_dict(), "mean": {k: 0.0 for k in grid.METRICS}}))
  assert list(grid.run_grid([grid.Run("same", asked)], tmp_path, log=lambda s: None)) == ["same"]
  with pytest.raises(UsageError, match=f"other holds a finished run with {setting}="):
    grid.run_grid([grid.Run("other", asked)], tmp_path, log=lambda s: None)


def test_grid_resumes_a_run_finished_with_fewer_seeds(tmp_path, monkeypatch):
  from fast_jax.cli import grid
  from fast_jax import experiment
  from fast_jax.config import Config
  calls = []

  def single(cfg, folder, *, resume, **kw):
    calls.append((cfg.seeds, resume))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    res = {"config": cfg.to_dict(), "mean": {k: 0.0 for k in grid.METRICS}}
    (folder / "results.json").write_text(json.dumps(res))
    return res
  monkeypatch.setattr(experiment, "train_and_evaluate", single)
  run = lambda seeds: grid.Run("r", Config(method="global-mean", seeds=seeds))
  for seeds in (1, 1, 3, 2):
    grid.run_grid([run(seeds)], tmp_path, log=lambda s: None)
  assert calls == [(1, False), (3, True)]  # 1 again and 2 (< 3) are finished


def test_plot_p_reads_every_seed_of_a_run_and_names_its_groups(tmp_path):
  from fast_jax.cli import plots
  run = ROOT / "results" / "runs_code" / "bookcrossing" / "melu-fast-epoch"
  epochs, p, loss = plots.read_p(run)
  assert epochs.tolist() == list(range(1, 51))
  assert p.shape == loss.shape == (5, 50, 2)
  assert p.sum(-1) == pytest.approx(1.0, abs=1e-5)
  assert plots.group_names(run) == ["age<40", "age>=40"]
  proc = _run("plots.py", "p", str(run), "--out", str(tmp_path / "p.png"))
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "p.png").stat().st_size > 10_000


# the process's argv (as the fast-jax command sets it, or a checkout script's) -> the command
PROVENANCE = [
    (["fast-jax table2", "table2", "--jobs", "2"], "fast-jax table2 --jobs 2"),
    (["/usr/bin/fast-jax", "table2", "--jobs", "2"], "fast-jax table2 --jobs 2"),
    (["experiments/table2.py", "--jobs", "2"], "python experiments/table2.py --jobs 2"),
]


@pytest.mark.parametrize("argv,command", PROVENANCE)
def test_a_table_names_the_command_that_made_it(argv, command):
  from fast_jax.cli import grid
  assert grid.provenance(argv).startswith(f"command: `{command}`; commit ")


# file suffix -> the first bytes of that format
FIGURE_FORMATS = [(".png", b"\x89PNG"), (".pdf", b"%PDF-"), (".svg", b"<?xml"), ("", b"\x89PNG")]


@pytest.mark.parametrize("suffix,magic", FIGURE_FORMATS)
def test_a_figure_is_written_whole_in_the_format_its_name_asks_for(tmp_path, suffix, magic):
  import matplotlib.pyplot as plt
  from fast_jax.cli import plots
  fig, ax = plt.subplots()
  ax.plot([1, 2, 3])
  plots.save(fig, tmp_path / f"figure{suffix}")
  assert not plt.fignum_exists(fig.number)  # closed
  assert (tmp_path / f"figure{suffix}").read_bytes().startswith(magic)
  assert [f.name for f in tmp_path.iterdir()] == [f"figure{suffix}"]  # no temporary left


def test_group_names_come_from_the_run_folder_then_its_dataset(tmp_path):
  from fast_jax.cli import plots
  (tmp_path / "config.json").write_text(json.dumps({"dataset": "ml1m"}))
  assert plots.group_names(tmp_path) == ["M", "F"]
  (tmp_path / "results.json").write_text(json.dumps({"config": {"dataset": "ml1m"},
                                                     "group_names": ["a", "b"]}))
  assert plots.group_names(tmp_path) == ["a", "b"]
  (tmp_path / "results.json").unlink()
  (tmp_path / "config.json").write_text(json.dumps({"dataset": "my-csvs"}))
  assert plots.group_names(tmp_path, 3) == ["G0", "G1", "G2"]


@pytest.mark.parametrize("dataset", ["ml100k", "ml1m", "bookcrossing"])
def test_the_plots_known_group_names_are_those_data_prep_writes(prepared, dataset):
  from fast_jax.cli import plots
  assert prepared(dataset).group_names == plots.KNOWN_GROUPS[dataset]


def test_bars_of_errors_show_their_differences_and_gaps_start_at_zero():
  import numpy as np
  from fast_jax.cli import plots
  bottom, top = plots._zoomed_limits(np.array([0.800, 0.804]), np.array([0.806, 0.812]),
                                     from_zero=False)
  assert 0.79 < bottom < 0.800 and 0.812 < top < 0.82
  assert plots._zoomed_limits(np.array([0.02]), np.array([0.03]), from_zero=True)[0] == 0.0


def test_scatter_tells_backbones_methods_and_baselines_apart():
  from fast_jax.cli import plots
  assert plots._split_row("melu-fast") == ("melu", "fast")
  assert plots._split_row("metacs-clover") == ("metacs", "clover")
  assert plots._split_row("widedeep") == ("", "widedeep")
  assert set(plots.REFERENCE_ROWS) == set(REFERENCE)


def test_the_fast_jax_command_dispatches_to_every_driver(capsys):
  import importlib
  from fast_jax import cli
  for name, (module, _) in cli.COMMANDS.items():
    assert callable(importlib.import_module(module).main), name
  # every checkout script is a subcommand (plots.py is `plot`)
  scripts = {p.stem for p in (ROOT / "experiments").glob("*.py")}
  assert {"plot" if s == "plots" else s for s in scripts} <= set(cli.COMMANDS)
  assert cli.main(["--help"]) == 0
  usage = capsys.readouterr().out
  assert all(f"  {name} " in usage for name in cli.COMMANDS)
  assert cli.main(["--version"]) == 0 and "fast-jax " in capsys.readouterr().out
  assert cli.main(["trian"]) == 2
  assert capsys.readouterr().err.startswith("fast-jax: error: unknown command 'trian'")


def _seed(seed, mae, g0, g1):
  return {"seed": seed, "mae": mae, "gf_mae": abs(g0 - g1),
          "group": {"0": {"mae": g0}, "1": {"mae": g1}}}


# (Origin's groups, the method's groups, levelling down?) on one seed: group 0 is the
# better served under Origin.
LEVELLING = [((0.80, 0.90), (0.84, 0.90), True),    # the gap closed by group 0 rising
             ((0.80, 0.90), (0.80, 0.86), False),   # by group 1 falling
             ((0.80, 0.90), (0.81, 0.87), False),   # mostly by group 1 falling
             ((0.80, 0.90), (0.83, 0.89), True),    # mostly by group 0 rising
             ((0.80, 0.90), (0.79, 0.92), False)]   # no GF drop


@pytest.mark.parametrize("origin, method, expected", LEVELLING)
def test_levelling_down_marks_a_gap_closed_at_the_better_served_groups_cost(
    origin, method, expected):
  from fast_jax.cli.grid import paired_vs_origin
  out = paired_vs_origin([_seed(1, sum(method) / 2, *method)],
                         [_seed(1, sum(origin) / 2, *origin)])
  assert out["levelling_down"] is expected
  assert out["g0_mae_vs_origin"] == pytest.approx(method[0] - origin[0])
  assert out["gf_mae_vs_origin"] == pytest.approx(abs(method[0] - method[1]) - 0.1)


def test_csv_files_keep_small_learning_rates_and_round_metrics(tmp_path):
  """A sweep's outer lr of 1e-5 must not be written as 0.0000."""
  from fast_jax.cli.grid import write_csv
  write_csv([{"lr": 1e-5, "inner_lr": 0.03, "valid_mae": 0.812345678},
             {"lr": 1e-3, "inner_lr": 3e-3, "valid_mae": 1.0}], tmp_path / "t.csv")
  rows = list(csv.DictReader(open(tmp_path / "t.csv")))
  assert [(float(r["lr"]), float(r["inner_lr"])) for r in rows] == [(1e-5, 0.03), (1e-3, 3e-3)]
  assert rows[0]["valid_mae"] == "0.8123"


@pytest.mark.parametrize("fails", [False, True])
def test_a_grid_run_leaves_no_compiled_programs_behind_in_its_process(tmp_path, monkeypatch,
                                                                      fails):
  """A process that trains row after row (a --jobs worker) drops each run's programs, or
  it grows with every row; also when the run fails."""
  import jax
  import jax.numpy as jnp

  from fast_jax import experiment
  from fast_jax.cli import grid
  from fast_jax.config import Config
  program = jax.jit(lambda x: x + 1)

  def train(cfg, folder, **kw):
    program(jnp.ones(3))
    assert program._cache_size() == 1
    if fails:
      raise RuntimeError("the run failed")
    return {"folder": str(folder)}
  monkeypatch.setattr(experiment, "train_and_evaluate", train)
  if fails:
    with pytest.raises(RuntimeError, match="the run failed"):
      grid._run_group([Config(dataset="synthetic")], [tmp_path / "run"], False, False)
  else:
    done, seconds, resumed = grid._run_group([Config(dataset="synthetic")], [tmp_path / "run"],
                                             False, False)
    assert done == [{"folder": str(tmp_path / "run")}] and seconds >= 0 and not resumed
  assert program._cache_size() == 0
