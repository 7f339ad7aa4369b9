"""Shared machinery of the table and figure drivers: run a grid of configurations
(resumably) and collect their results next to the paper's numbers.

Each configuration runs through ``fast_jax.experiment.train_and_evaluate`` into
``<root>/<name>/``. A finished run (``results.json`` present) is not run again, and an
interrupted one resumes from its checkpoints, so a driver can be stopped and restarted.
A folder holding a meta-learner's run made at other settings (an older default, say) is
refused, naming the setting, rather than reused or overwritten.
A run finished with fewer seeds than asked for resumes too, training only the new seeds
(``--seeds 1`` first, ``--seeds 5`` later).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gc
import json
import multiprocessing
import os
import pathlib
import sys
import time

import numpy as np

from fast_jax import files
from fast_jax.config import BASELINES, META_METHODS, PRESETS, Config, UsageError

METRICS = ("mae", "mse", "gf_mae", "gf_mse")

# The FAST paper's Table 2 (§6.3 of the paper): (mean, std) per metric.
_T2 = """
widedeep|0.937 0.019|1.245 0.026|0.120 0.087|0.239 0.169|1.558 0.039|3.585 0.356|0.083 0.023|0.178 0.188|1.071 0.073|1.658 0.203|0.164 0.086|0.465 0.274
dropoutnet|0.940 0.028|1.347 0.065|0.121 0.065|0.271 0.170|1.531 0.034|3.523 0.072|0.093 0.051|0.184 0.164|1.092 0.063|1.694 0.184|0.125 0.061|0.358 0.189
nlba|1.060 0.095|1.811 0.309|0.051 0.040|0.245 0.188|1.659 0.029|3.956 0.071|0.103 0.014|0.367 0.029|0.999 0.014|1.396 0.036|0.109 0.035|0.294 0.100
melu-origin|0.796 0.006|1.005 0.018|0.057 0.015|0.132 0.045|1.464 0.013|3.458 0.108|0.056 0.009|0.337 0.114|0.850 0.002|1.126 0.003|0.089 0.006|0.131 0.014
melu-reg|0.790 0.005|0.986 0.022|0.060 0.012|0.147 0.025|1.522 0.048|3.715 0.177|0.088 0.030|0.481 0.118|0.875 0.003|1.193 0.009|0.070 0.009|0.150 0.018
melu-ipw|0.810 0.009|1.035 0.022|0.061 0.012|0.156 0.031|1.624 0.127|4.051 0.519|0.118 0.114|0.543 0.468|0.878 0.008|1.171 0.014|0.063 0.008|0.084 0.017
melu-clover|0.752 0.004|0.906 0.004|0.039 0.003|0.115 0.008|1.652 0.056|4.353 0.233|0.110 0.015|0.514 0.074|0.875 0.006|1.118 0.014|0.055 0.016|0.066 0.041
melu-fast|0.763 0.003|0.933 0.007|0.033 0.004|0.108 0.009|1.473 0.009|3.369 0.018|0.017 0.009|0.168 0.053|0.898 0.004|1.217 0.015|0.044 0.006|0.056 0.022
metacs-origin|0.774 0.007|0.959 0.012|0.050 0.005|0.148 0.014|1.445 0.013|3.420 0.033|0.088 0.011|0.436 0.059|0.905 0.005|1.318 0.004|0.092 0.003|0.187 0.006
metacs-reg|0.797 0.003|0.995 0.005|0.026 0.009|0.080 0.006|1.327 0.007|2.894 0.031|0.065 0.015|0.298 0.045|0.912 0.003|1.314 0.007|0.078 0.002|0.174 0.010
metacs-ipw|0.760 0.002|0.916 0.006|0.046 0.006|0.124 0.007|1.399 0.011|3.216 0.057|0.063 0.013|0.190 0.033|0.920 0.008|1.329 0.010|0.065 0.009|0.208 0.011
metacs-clover|0.804 0.036|1.027 0.095|0.049 0.011|0.133 0.017|1.973 0.332|5.851 1.239|0.029 0.019|0.168 0.133|0.918 0.022|1.304 0.081|0.043 0.020|0.083 0.021
metacs-fast|0.770 0.003|0.938 0.007|0.026 0.006|0.072 0.007|1.385 0.014|3.204 0.055|0.025 0.011|0.117 0.083|0.879 0.003|1.184 0.011|0.054 0.002|0.118 0.010
"""
PAPER_DATASETS = ("ml1m", "bookcrossing", "ml100k")


def _parse_table2() -> dict:
  table = {}
  for line in _T2.strip().splitlines():
    row, *cells = line.split("|")
    for i, cell in enumerate(cells):
      mean, std = map(float, cell.split())
      table[(row, PAPER_DATASETS[i // 4], METRICS[i % 4])] = (mean, std)
  return table


PAPER_TABLE2 = _parse_table2()


@dataclasses.dataclass(frozen=True)
class Run:
  """One configuration of a grid: ``name`` is its folder and its row label."""
  name: str
  cfg: Config
  row: str = ""        # Table 2 row key, e.g. "melu-fast"
  label: str = ""      # free label for plots


def run_grid(runs: list[Run], root: pathlib.Path, *, progress: bool = False,
             vmap: bool = False, jobs: int = 1, log=print) -> dict[str, dict]:
  """Run every configuration that has no results yet; return name -> results.

  With ``vmap``, the unfinished meta-learning runs that differ only in gamma, tau, the
  inner lr and Reg's weight, and in their method among Origin, Reg, IPW and FAST in step mode
  (:mod:`fast_jax.methods.rows`), train together, each run's seeds too, as one
  vectorised program (:func:`fast_jax.experiment.sweep_and_evaluate`); the others run
  one by one, and so does on a CPU a meta-learner's run with nothing to group with
  (:func:`vectorised_group`). With
  ``jobs > 1``, that many runs (or vectorised groups) train at once, each in its own
  process, the largest first (:func:`plan`), and on a CPU each process on its own share
  of the CPUs (:func:`worker_cpus`).
  """
  from fast_jax.experiment import check_config
  for run in runs:  # every run's settings before any trains (a sweep's last point too)
    check_config(run.cfg)
  try:
    root.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UsageError(f"--root {root}: cannot make the runs' folder there "
                     f"({files.reason(e)})") from None
  out, todo = {}, []
  for run in runs:
    done = _finished(root / run.name)
    # A meta-learner's run at other settings is another experiment; the baselines do not
    # depend on the preset, the one setting that changes between the drivers' calls.
    if done is not None and run.cfg.method not in BASELINES:
      _check_same_run(root / run.name, done.get("config", {}), run.cfg)
    if done is not None and done.get("config", {}).get("seeds", run.cfg.seeds) >= run.cfg.seeds:
      out[run.name] = done
    else:  # not run, interrupted, or run with fewer seeds: (re)start or resume it
      todo.append(run)
  work = [(g, [root / r.name for r in g], vmap and vectorised_group(g))
          for g in plan(todo, vmap=vmap, largest_first=jobs > 1)]

  def record(group, folders, done, seconds, resumed):
    for run, folder, res in zip(group, folders, done):
      out[run.name] = res
      _record_wall_time(folder, seconds, resumed=resumed,
                        note=f"one vectorised program with {len(group)} runs" if len(group) > 1
                        else "")
      m = res["mean"]
      log(f"{run.name}: MAE {m['mae']:.3f} MSE {m['mse']:.3f} GF(MAE) {m['gf_mae']:.3f} "
          f"GF(MSE) {m['gf_mse']:.3f} ({seconds:.0f} s)")

  t0 = time.perf_counter()
  if jobs <= 1:
    for group, folders, vectorised in work:
      record(group, folders, *_run_group([r.cfg for r in group], folders, vectorised,
                                         progress))
  else:
    with worker_pool(worker_cpus(jobs), worker_memory(jobs)) as pool:
      futures = {pool.submit(_run_group, [r.cfg for r in g], f, v, False): (g, f)
                 for g, f, v in work}
      try:
        for future in concurrent.futures.as_completed(futures):
          record(*futures[future], *future.result())
      except BaseException:  # a failed run stops the grid, as it does one job at a time
        pool.shutdown(wait=False, cancel_futures=True)
        raise
  if work:
    log(f"{sum(len(g) for g, _, _ in work)} runs in {time.perf_counter() - t0:.0f} s of wall "
        f"time ({jobs} job{'s' if jobs > 1 else ''} at once)")
  return out


def plan(runs: list[Run], *, vmap: bool, largest_first: bool) -> list[list[Run]]:
  """The grid's unfinished runs as the groups that train together (each run alone
  without ``vmap``), in the order they start: as given, or with ``largest_first`` (several
  jobs at once) the largest :func:`work_estimate` first, so that no long group starts last
  while the other jobs run out of work."""
  from fast_jax.experiment import SWEEPABLE
  from fast_jax.methods import rows as row_lanes
  groups: dict = {}
  for run in runs:
    varied = SWEEPABLE + (("method",) if row_lanes.joins(run.cfg) else ())
    shared = {k: v for k, v in run.cfg.to_dict().items() if k not in varied}
    key = json.dumps(shared, sort_keys=True, default=str) if (
        vmap and run.cfg.method not in BASELINES) else run.name
    groups.setdefault(key, []).append(run)
  out = list(groups.values())
  if largest_first:
    sizes = _dataset_sizes({r.cfg.dataset: r.cfg for r in runs})
    out.sort(key=lambda g: -work_estimate([r.cfg for r in g], sizes))  # stable
  return out


# A run's work per training user and epoch beside a meta-learner's per inner step + 1,
# read off the whole Table 2 at 3f436fb (2 jobs; EXPERIMENTS.md, Speed): CLOVER's
# adversary costs half as much again, a baseline trains a plain network (0.3-0.5), a
# reference predictor trains nothing.
_WORK = {"clover": 1.5, "widedeep": 0.3, "dropoutnet": 0.3, "nlba": 0.3}


def work_estimate(cfgs: list[Config], sizes: dict[str, tuple[int, str]]) -> float:
  """A group of runs' training work in arbitrary units, to order a grid's jobs largest
  first: runs x seeds x epochs x training users x (inner steps + 1), scaled by
  :data:`_WORK`. ``sizes`` maps a dataset to (its training users, its name); a dataset
  not in it counts one user. Only the order matters, and only roughly: replaying the whole
  Table 2's measured group times, the order it gives ends 0.1% after the order of those
  times and 5% before CLOVER's runs first (EXPERIMENTS.md, Speed)."""
  from fast_jax.config import REFERENCE, resolve
  cfg = cfgs[0]
  if cfg.method in REFERENCE:
    return 0.0
  users, name = sizes.get(cfg.dataset, (1, cfg.dataset))
  per_user = _WORK.get(cfg.method, 1.0)
  if cfg.method in META_METHODS:
    try:
      steps = resolve(cfg, name).inner_steps or 1
    except (KeyError, TypeError, ValueError):  # a bad setting: its run reports it clearly
      steps = 1
    per_user *= steps + 1
  return len(cfgs) * cfg.seeds * (cfg.epochs or 50) * users * per_user


def _dataset_sizes(cfgs: dict[str, Config]) -> dict[str, tuple[int, str]]:
  """dataset -> (training users, dataset name), from the prepared data (prepared here
  if need be, once, rather than by two jobs at a time). A dataset that does not load is
  left out: its run reports why."""
  from fast_jax.experiment import load_dataset
  out = {}
  for dataset, cfg in cfgs.items():
    try:
      meta = load_dataset(cfg, progress=False).meta
    except Exception:  # noqa: BLE001 - the run itself raises the clear error
      continue
    out[dataset] = (int(meta.get("counts", {}).get("train", {}).get("users", 1)),
                    meta.get("dataset", dataset))
  return out


def vectorised_group(group: list[Run]) -> bool:
  """Whether a ``--vmap`` group of runs trains as one vectorised program: a
  meta-learner's, except on a CPU a single run's seeds, which there ran x0.73-0.82 slower
  as lanes than one after another (EXPERIMENTS.md, Speed); such a run trains as a run of
  its own, with its checkpoints. Several runs (a sweep's points, a backbone's rows) go
  together everywhere: on a CPU each seed's lanes by length."""
  if group[0].cfg.method in BASELINES:
    return False
  import jax
  return len(group) > 1 or jax.default_backend() != "cpu"


# Settings that do not change what a finished run computed (where the data was found,
# how it was checkpointed and chunked) or that the grid handles itself (seeds).
_BOOKKEEPING = frozenset({"seeds", "data_dir", "checkpoint_every", "length_parts",
                          "eval_chunk", "vmap_seeds"})


def _check_same_run(folder: pathlib.Path, before: dict, cfg: Config) -> None:
  """A finished meta-learning run is reused only if it ran the configuration asked for:
  one made at other settings (an older default, another sweep's point) is another
  experiment, and reusing it would put its numbers in the new table.

  Raises:
    UsageError: naming the folder and the first setting that differs.
  """
  from fast_jax.config import resolve
  from fast_jax.runfolder import changed_settings
  changed = changed_settings(before, resolve(cfg).to_dict(), _BOOKKEEPING)
  if changed:  # the preset first: it explains the settings it fills
    k = "preset" if "preset" in changed else next(iter(changed))
    was, now = changed[k]
    raise UsageError(f"{folder} holds a finished run with {k}={was!r}, not {now!r}; move "
                     "it away or use another --root")


def cpu_only(environ=None) -> bool:
  """Whether JAX can only run on the CPU here: ``JAX_PLATFORMS`` names the CPU alone, or no
  accelerator plugin (a ``jax_plugins`` package or entry point, or ``libtpu``) is
  installed. Decided without starting JAX, which on a GPU would claim its memory in the
  grid's parent."""
  from importlib import metadata, util
  environ = os.environ if environ is None else environ
  platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return set(platforms) == {"cpu"}
  if any(True for _ in metadata.entry_points(group="jax_plugins")):
    return False
  return util.find_spec("jax_plugins") is None and util.find_spec("libtpu") is None


def worker_cpus(jobs: int, available=None) -> list[frozenset[int] | None]:
  """The CPUs each of ``jobs`` workers is held to: this process's CPUs (``available``,
  default its affinity) split into ``jobs`` contiguous, near-equal sets (one CPU each,
  round robin, when there are more jobs than CPUs). Two jobs on a 2-core CPU, each on a
  core of its own, ran their epochs x0.83-0.85 (ML-1M MeLU+FAST) and x0.92 (Book-Crossing)
  as long as two jobs free to use both cores (EXPERIMENTS.md, Speed): a job's XLA threads
  wait on each other for much of an epoch, and two jobs' four threads then contend for
  two cores. ``None`` for every worker (no pinning) where that does not apply: one job,
  a platform without CPU affinity, JAX able to use an accelerator (:func:`cpu_only`), or
  ``FAST_JAX_PIN_JOBS=0``."""
  if (jobs <= 1 or not hasattr(os, "sched_setaffinity")
      or os.environ.get("FAST_JAX_PIN_JOBS", "1") == "0" or not cpu_only()):
    return [None] * jobs
  cpus = sorted(os.sched_getaffinity(0) if available is None else available)
  if jobs >= len(cpus):
    return [frozenset({cpus[i % len(cpus)]}) for i in range(jobs)]
  return [frozenset(int(c) for c in part) for part in np.array_split(cpus, jobs)]


# What JAX reads to size its share of an accelerator's memory; a user who set one decides.
_MEMORY_SETTINGS = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
                    "XLA_PYTHON_CLIENT_ALLOCATOR")


def worker_memory(jobs: int, environ=None) -> dict[str, str]:
  """The environment each of ``jobs`` workers adds so that they share one accelerator:
  by default JAX takes 75% of a GPU's memory in every process, so a second worker finds
  a quarter left. With several jobs and an accelerator (:func:`cpu_only`), each takes
  ``0.9 / jobs`` of it instead; nothing on a CPU, for one job, or where the user set
  how JAX sizes its memory (``XLA_PYTHON_CLIENT_MEM_FRACTION``, ``..._PREALLOCATE``,
  ``..._ALLOCATOR``)."""
  environ = os.environ if environ is None else environ
  if jobs <= 1 or any(k in environ for k in _MEMORY_SETTINGS) or cpu_only(environ):
    return {}
  return {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / jobs:.3f}"}


def worker_pool(cpus: list[frozenset[int] | None],
                env: dict[str, str] | None = None) -> concurrent.futures.ProcessPoolExecutor:
  """A pool of ``len(cpus)`` spawned worker processes (no fork of a process that may hold
  JAX), each held to one of the sets in ``cpus`` (None: free to use every CPU) from its
  start, before JAX sizes its threads (:func:`worker_cpus`, :func:`_pin_worker`), with
  ``env`` added to its environment before JAX starts (:func:`worker_memory`)."""
  context = multiprocessing.get_context("spawn")
  queue = context.Queue()
  for subset in cpus:
    queue.put(subset)
  return concurrent.futures.ProcessPoolExecutor(len(cpus), mp_context=context,
                                                initializer=_pin_worker,
                                                initargs=(queue, env or {}))


def _pin_worker(cpus, env: dict[str, str]) -> None:
  """A grid worker's initializer: add ``env`` to this process's environment, and hold
  this process (and so the threads JAX starts in it) to the next set of CPUs in the
  queue ``cpus`` (:func:`worker_cpus`)."""
  import queue
  os.environ.update(env)
  try:
    subset = cpus.get(timeout=60)
  except queue.Empty:  # a worker beyond the sets handed out: run unpinned
    return
  if subset:
    try:
      os.sched_setaffinity(0, subset)
    except OSError:  # CPUs taken away since: run unpinned
      pass


def _run_group(cfgs: list[Config], folders: list[pathlib.Path], vectorised: bool,
               progress: bool) -> tuple[list[dict], float, bool]:
  """Train one run, or a vectorised group of runs -> (results, seconds, resumed)."""
  import jax
  from fast_jax.experiment import sweep_and_evaluate, train_and_evaluate
  t0 = time.perf_counter()
  resumed = any((f / "config.json").exists() for f in folders)
  try:
    if vectorised:
      done = sweep_and_evaluate(cfgs, folders, progress=progress, echo=lambda s: None)
    else:
      done = [train_and_evaluate(cfgs[0], folders[0], progress=progress, resume=resumed,
                                 echo=lambda s: None)]
  finally:
    # A process runs row after row (a --jobs worker, or the driver itself): each run's
    # compiled programs and traces go before the next, or the process grows with every
    # row (ML-100K's 16 rows, 2 epochs each, in one process: peak 1,402 MB kept, 1,101 MB
    # dropped). A later row that shares a program loads it from the compilation cache.
    jax.clear_caches()
    gc.collect()
  return done, time.perf_counter() - t0, resumed


def _record_wall_time(folder: pathlib.Path, seconds: float, *, resumed: bool,
                      note: str = "") -> None:
  folder.mkdir(parents=True, exist_ok=True)
  notes = ", ".join(n for n in ("resumed" if resumed else "", note) if n)
  with open(folder / "wall_time.txt", "a") as f:
    f.write(f"{seconds:.1f} s{f' ({notes})' if notes else ''}\n")


def _finished(folder: pathlib.Path) -> dict | None:
  path = folder / "results.json"
  return json.loads(path.read_text()) if path.exists() else None


def load_results(root: pathlib.Path, runs: list[Run]) -> dict[str, dict]:
  return {r.name: done for r in runs if (done := _finished(root / r.name)) is not None}


def summary_rows(runs: list[Run], results: dict[str, dict]) -> list[dict]:
  """One flat row per finished run: config keys, mean/std of each metric, paper value."""
  rows = []
  for run in runs:
    if run.name not in results:
      continue
    res = results[run.name]
    dataset = res["config"]["dataset"]
    row = {"name": run.name, "row": run.row, "label": run.label, "dataset": dataset,
           "backbone": res["config"]["backbone"], "method": res["config"]["method"],
           "seeds": len(res["per_seed"]), "epochs": res["config"]["epochs"]}
    for k in METRICS + ("ndcg3",):
      row[k], row[f"{k}_std"] = res["mean"][k], res["std"][k]
      paper = PAPER_TABLE2.get((run.row, dataset, k))
      row[f"{k}_paper"] = paper[0] if paper else np.nan
    for g, vals in res["mean"]["group"].items():
      row[f"g{g}_mae"], row[f"g{g}_n"] = vals.get("mae", np.nan), vals.get("n", np.nan)
    row["auc_attack"] = res["mean"].get("auc_attack", np.nan)
    rows.append(row)
  origins = {(results[r.name]["config"]["dataset"], results[r.name]["config"]["backbone"]):
             results[r.name]["per_seed"] for r in runs
             if r.name in results and results[r.name]["config"]["method"] == "origin"}
  for row in rows:
    origin = origins.get((row["dataset"], row["backbone"]))
    if row["method"] in META_METHODS and row["method"] != "origin" and origin:
      row.update(paired_vs_origin(results[row["name"]]["per_seed"], origin) or {})
  return rows


def paired_vs_origin(point: list[dict], origin: list[dict]) -> dict | None:
  """A run against the same backbone's Origin, seed by seed (the seed-to-seed spread the
  two share cancels): over the run's seeds, the mean and population std of its
  per-seed MAE and GF(MAE) minus Origin's (``mae_vs_origin``, ``..._std``), on how many
  seeds each is lower (``seeds_lower_mae``, ``seeds_fairer``), the mean change of each
  group's MAE (``g0_mae_vs_origin``, ...), and ``levelling_down``: the mean GF(MAE) is
  lower and most of that came from the group Origin serves best (lowest mean MAE)
  getting worse, i.e. its MAE rose by more than the worst-served group's fell. None when
  Origin lacks one of the run's seeds.

  point, origin: ``results.json["per_seed"]`` entries (``seed``, ``mae``, ``gf_mae``,
  optionally ``group``).
  """
  base = {r["seed"]: r for r in origin}
  runs = {r["seed"]: r for r in point}
  if not runs or not runs.keys() <= base.keys():
    return None
  seeds = list(runs)
  out: dict = {}
  for m in ("mae", "gf_mae"):
    d = np.array([runs[s][m] - base[s][m] for s in seeds])
    out[f"{m}_vs_origin"], out[f"{m}_vs_origin_std"] = float(d.mean()), float(d.std())
  out["seeds_lower_mae"] = int(sum(runs[s]["mae"] < base[s]["mae"] for s in seeds))
  out["seeds_fairer"] = int(sum(runs[s]["gf_mae"] < base[s]["gf_mae"] for s in seeds))
  groups = [g for g in base[seeds[0]].get("group", {}) if all(
      g in runs[s].get("group", {}) for s in seeds)]
  if groups:
    for g in groups:
      out[f"g{g}_mae_vs_origin"] = float(np.mean(
          [runs[s]["group"][g]["mae"] - base[s]["group"][g]["mae"] for s in seeds]))
    served = sorted(groups, key=lambda g: np.mean([base[s]["group"][g]["mae"] for s in seeds]))
    rise, fall = out[f"g{served[0]}_mae_vs_origin"], -out[f"g{served[-1]}_mae_vs_origin"]
    out["levelling_down"] = bool(out["gf_mae_vs_origin"] < 0 and rise > max(fall, 0.0))
  return out


# Settings, written exactly (``%g``): at 4 decimals an outer lr of 1e-5 would read 0.0000.
SETTING_COLUMNS = ("lr", "inner_lr", "gamma", "tau", "value", "reg_weight")


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
  """``rows`` as a CSV, written atomically: metrics to 4 decimals,
  :data:`SETTING_COLUMNS` exactly."""
  import pandas as pd
  frame = pd.DataFrame(rows)
  for col in SETTING_COLUMNS:
    if col in frame and pd.api.types.is_float_dtype(frame[col]):
      frame[col] = frame[col].map(lambda v: "" if pd.isna(v) else f"{v:g}")
  files.write_text_atomic(path, frame.to_csv(index=False, float_format="%.4f"))


def provenance(argv: list[str]) -> str:
  """The command (``argv``: the process's, whose ``argv[0]`` the ``fast-jax`` command sets
  to ``fast-jax SUBCOMMAND``) and the git commit that produced a results file."""
  import subprocess
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=pathlib.Path(__file__).parent).stdout.strip()
  except OSError:
    commit = "unknown"
  if pathlib.Path(argv[0]).name.startswith("fast-jax"):  # argv[1] is the subcommand
    command = " ".join(["fast-jax", *argv[1:]])
  else:
    command = " ".join(["python", *argv])
  return f"command: `{command}`; commit {commit or 'unknown'}"


# Relative to the working folder, so a wheel install writes where it is run, as a checkout
# run from its root writes into the repository's results/.
ROOT = pathlib.Path(".")


def _at_least_one(text: str) -> int:
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
  return int(text)


def add_grid_args(parser, *, out_name: str) -> None:
  """The flags every driver shares: seeds, epochs, FAST mode, preset, data, run root,
  output (read them with :func:`parse_grid_args`)."""
  parser.add_argument("--preset", choices=PRESETS, default="validated",
                      help="the meta-learners' defaults (run.py --preset); the code preset's "
                           "runs default to results/runs_code and files named *_code")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--epochs", type=int, default=None, help="default: each method's own")
  parser.add_argument("--p-update", default="step", choices=("step", "epoch"),
                      help="FAST mode of the FAST runs")
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--root", type=pathlib.Path, default=None,
                      help="run folders (default: results/runs, results/runs_code with "
                           "--preset code)")
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help=f"output files without suffix (default: results/{out_name}, "
                           f"results/{out_name}_code with --preset code)")
  parser.set_defaults(out_name=out_name)
  parser.add_argument("--collect-only", action="store_true", help="only tabulate finished runs")
  parser.add_argument("--jobs", type=_at_least_one, default=1,
                      help="runs training at once, each in its own process, on a CPU each "
                           "held to its own share of the CPUs (FAST_JAX_PIN_JOBS=0: free to use "
                           "all), on a GPU each with 0.9/N of its memory; 2 suits a 2-core CPU")
  parser.add_argument("--vmap", action="store_true",
                      help="train each run's seeds, the gamma/tau/inner-lr/reg-weight points "
                           "of a sweep and a backbone's Origin, Reg, IPW and FAST rows as one "
                           "vectorised program (no mid-run checkpoints)")


def parse_grid_args(parser, argv=None):
  """``parser``'s arguments with the defaults of ``--root`` and ``--out`` filled for the
  preset: the validated protocol's runs and files, or the code preset's (``*_code``)."""
  args = parser.parse_args(argv)
  code = args.preset == "code"
  if args.root is None:
    args.root = ROOT / "results" / ("runs_code" if code else "runs")
  if args.out is None:
    args.out = ROOT / "results" / (args.out_name + ("_code" if code else ""))
  return args


def collect_finished(runs: list[Run], root: pathlib.Path) -> dict[str, dict]:
  """``--collect-only``: the finished runs' results (name -> results), with a warning
  naming the runs that have not finished; none finished is a
  :class:`~fast_jax.config.UsageError`."""
  results = load_results(root, runs)
  if not results:
    raise UsageError(f"--collect-only: none of the {len(runs)} runs has finished under "
                     f"--root {root}")
  missing = [r.name for r in runs if r.name not in results]
  if missing:
    print(f"warning: --collect-only: {len(missing)} of the {len(runs)} runs have not "
          f"finished under --root {root} ({', '.join(missing[:3])}"
          f"{', ...' if len(missing) > 3 else ''}); the table leaves them out",
          file=sys.stderr)
  return results


def run_and_collect(runs: list[Run], args) -> list[dict]:
  """Run (or, with --collect-only, just load) the grid; write ``<out>.csv``; return rows.
  A bad setting raises :class:`~fast_jax.config.UsageError`, which the drivers' mains
  report in one line (:func:`fast_jax.cli.one_line_errors`)."""
  results = (collect_finished(runs, args.root) if args.collect_only
             else run_grid(runs, args.root, vmap=args.vmap, jobs=args.jobs))
  rows = summary_rows(runs, results)
  write_csv(rows, args.out.with_suffix(".csv"))
  return rows
