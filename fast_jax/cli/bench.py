"""Speed and memory of the meta-training loop, of a whole run, and of a Table 2 block.

    python experiments/bench.py --dataset bookcrossing --data-dir ../shared/data
    python experiments/bench.py --breakdown --dataset ml100k --epochs 50 --seeds 5 \
        --data-dir ../shared/data
    python experiments/bench.py --table2 ml100k --jobs 2 --data-dir ../shared/data
    python experiments/bench.py --authors ../FAST --authors-python ../torch-env/bin/python \
        --rounds 3 --data-dir ../shared/data
    python experiments/bench.py --inner-forms --rounds 6 --data-dir ../shared/data
    python experiments/bench.py --query-layouts --dataset ml1m --rounds 6 --data-dir ../shared/data
    python experiments/bench.py --part-choice --dataset ml100k --rounds 6 --data-dir ../shared/data
    python experiments/bench.py --side-by-side --dataset ml1m --jobs 2 --epochs 6 \
        --data-dir ../shared/data
    python experiments/bench.py --profile /tmp/trace --dataset bookcrossing --epochs 2 \
        --data-dir ../shared/data

``--breakdown`` trains the configuration as a run does (one seed, or ``--seeds``) and
prints where its time goes, for the first seed, each later seed (which reuses the first
one's programs) and the whole run: loading the data, compiling (the epoch scan and the
evaluation pass on the validation chunks, compiled ahead of time so that compilation is
not counted as training; on a CPU a row budget that only the training or test chunks use
compiles in the phase that first needs it, as do the attacker's programs), training
steps, the end-of-epoch pass (FAST's epoch-mode p update), validation, the test pass,
the attacker and writing the run's files (checkpoints and results). Every program
compiles: the persistent compilation cache a run uses is off here. It runs on whatever
backend JAX has.

``--table2 DATASET`` times the whole Table 2 block of one dataset (every row, its seeds
and epochs: ``--seeds``/``--epochs``, default 5 and each method's own) through the
Table 2 driver into a temporary folder, and prints each row's wall time.

``--authors DIR`` times the authors' PyTorch code (a checkout of zhengz99/FAST, run by
``--authors-python``, a Python with torch) beside fast-jax, on the same machine, in
``--rounds`` rounds: their run.sh MeLU+FAST command on Book-Crossing at 1 and ``--epochs``
epochs (their seconds per epoch are the difference per extra epoch, which leaves out
loading and their test pass; their own peak memory at each), then fast-jax's Book-Crossing
MeLU+FAST epoch with what a run does after it, in step mode (the paper's and fast-jax's
default) and in epoch mode (the authors' setting, with its pass over the training users),
and prints each round and the median ratios. Rounds interleave the two so that a machine
whose speed drifts slows both.

``--inner-forms`` times the epoch of a one-step setting (MeLU on Book-Crossing, MetaCS on
any dataset; any meta-learning method, CLOVER included) with its inner step in kernel
form (the default, :func:`fast_jax.models.one_step_forward`) and with the adapted weights
formed, each batched as a run batches it (by length where a run takes the parts), compiled
in one process and run alternately for ``--rounds`` rounds, and prints
both, the ratio of their medians and how far the two sets of parameters are apart after
one epoch (rounding, which Adam's steps amplify; relative to each array's largest value).

``--query-layouts`` times the epoch of any meta-learning setting the same way with each
user's query rows in place (masked out of the inner loop's support, as padding) and laid
out query first (the default, :func:`fast_jax.meta.query_first`: the inner loop runs on
the rows after the query's).

``--part-choice`` times it, run by length as a run on this backend runs it (a CPU: 2
parts for 500 steps or more; with none, both are one program), with each part's choice
between its row budget and all rows made by a ``lax.cond`` inside the gradient, and made
once outside it (the default, :func:`fast_jax.meta.switch_parts`).

``--side-by-side`` times the epoch of ``--jobs`` (at least 2) copies of the configuration
training at once, each in a process of its own as a grid's ``--jobs`` workers run, in
``--rounds`` rounds: each round once with every process held to its own share of the CPUs
(what the grid does on a CPU, :func:`fast_jax.cli.grid.worker_cpus`) and once with every
process free to use them all, and prints each process's median epoch and the ratio of the
medians.

``--profile DIR`` traces ``--epochs`` epochs (compiled before the trace) with
``jax.profiler`` into DIR, writes the epoch's optimised HLO beside it (``epoch.hlo.txt``),
and prints the time the operations took per epoch, how many ran, and the longest: on a
GPU each kernel (XLA runs a step's kernels as CUDA graphs, so the kernels, not the graph,
are named), on a CPU each XLA operation. Open the trace in xprof or TensorBoard for the
timeline.

Without those flags it prints,
for MeLU+FAST (or --backbone/--method, any meta-learning method) on the
dataset's training users: compile time, seconds per training epoch (jitted epoch scan,
and the epoch plus what a run does after it: the end-of-epoch update, which only
``--p-update epoch`` has, and validation), users per second, peak resident memory, the
epoch by length against whole batches (where a run takes parts, or with
``--length-parts N``), with ``--cut-rows L ...`` the epoch on whole
batches with every user cut to its first L rows (a padding probe: what an epoch with
fewer padded rows per user would cost), and the same epoch run as a per-user Python loop
over the same JAX functions (the structure of the authors' PyTorch code), extrapolated
from ``--loop-steps`` steps (not for CLOVER, whose step is its own).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fast_jax.cli import one_line_errors
from fast_jax import fairness, meta
from fast_jax import config as config_lib
from fast_jax.config import Config, resolve
from fast_jax.experiment import load_dataset
from fast_jax.methods import learner as learn
from fast_jax.methods.base import Method
from fast_jax.runner import Runner, cut_rows


def backend() -> str:
  """The backend JAX runs on, its version, and XLA_FLAGS when set (they can change both
  compile and step times: EXPERIMENTS.md §Speed), for the figures' header lines."""
  flags = os.environ.get("XLA_FLAGS", "").strip()
  return f"{jax.default_backend()} (JAX {jax.__version__}" + (
      f", XLA_FLAGS={flags!r})" if flags else ")")


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, *args):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


def bench_scan(runner: Runner, epochs: int, method: Method | None = None) -> dict:
  """Seconds per jitted epoch of ``method`` (default the runner's), with and without
  what a run does after it: the method's end-of-epoch update (FAST's epoch-mode pass
  over the training users; nothing in step mode) and the validation pass."""
  m = method or runner.method
  data = m.splits["fit"]
  key = jax.random.key(0)
  state = m.init(key)
  (state, _), compile_s = timed(m.epoch, state, data, key)
  state, _ = m.end_of_epoch(state, runner.per_user)  # compiled outside the timing,
  runner.evaluate(state, "valid")                    # as is the validation pass
  times, with_valid = [], []
  for e in range(epochs):
    (state, _), dt = timed(m.epoch, state, data, jax.random.fold_in(key, e))
    t0 = time.perf_counter()
    state, _ = jax.block_until_ready(m.end_of_epoch(state, runner.per_user))
    runner.evaluate(state, "valid")
    times.append(dt)
    with_valid.append(dt + time.perf_counter() - t0)
  n = runner.ctx.splits["train"]["x"].shape[0]
  return {"compile_s": compile_s, "epoch_s": float(np.median(times)),
          "epoch_with_valid_s": float(np.median(with_valid)),
          "users_per_s": n / float(np.median(times))}


def device_events(trace: pathlib.Path):
  """The compiled programs' operations in a ``jax.profiler`` trace folder ->
  [(operation, nanoseconds)]: the kernels on a GPU's or TPU's streams (planes
  ``/device:...``), named by kernel (their HLO operation is often the CUDA graph that
  launched them), where there are any; else the host's XLA operations (a CPU's: events
  with an ``hlo_op`` statistic), named by that operation."""
  return plane_events(plane for path in sorted(trace.rglob("*.xplane.pb"))
                      for plane in jax.profiler.ProfileData.from_file(str(path)).planes)


def plane_events(planes) -> list[tuple[str, float]]:
  """:func:`device_events` of a trace's planes (``jax.profiler.ProfileData`` planes, or
  anything with their ``name``, ``lines``, and lines' ``name`` and ``events``, events'
  ``name``, ``duration_ns`` and ``stats``)."""
  events = {"device": [], "host": []}
  for plane in planes:
    on_device = plane.name.startswith("/device:")
    for line in plane.lines:
      if on_device and "stream" not in line.name.lower():
        continue  # derived lines (XLA Modules/Ops, steps) repeat the streams' kernels
      for e in line.events:
        if on_device:
          events["device"].append((e.name, float(e.duration_ns)))
        elif (op := dict(e.stats).get("hlo_op")) is not None:
          events["host"].append((str(op), float(e.duration_ns)))
  return events["device"] or events["host"]


def profile_epochs(runner: Runner, epochs: int, folder: pathlib.Path, top: int = 15) -> dict:
  """Trace ``epochs`` epochs of the runner's method (compiled before the trace) with
  ``jax.profiler`` into ``folder`` (for xprof or TensorBoard), beside the epoch's
  optimised HLO (``epoch.hlo.txt``), and sum the trace per operation: {"wall_s": s per
  epoch, "busy_s": operation time per epoch, "count": operations run per epoch,
  "top": [(operation, s per epoch, runs per epoch)] the ``top`` longest}."""
  m = runner.method
  data, key = m.splits["fit"], jax.random.key(0)
  state = m.init(key)
  epoch = m.epoch.lower(state, data, key).compile()
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "epoch.hlo.txt").write_text(epoch.as_text())
  state, _ = jax.block_until_ready(epoch(state, data, key))
  jax.profiler.start_trace(str(folder))
  t0 = time.perf_counter()
  try:
    for e in range(epochs):
      state, _ = jax.block_until_ready(epoch(state, data, jax.random.fold_in(key, e + 1)))
  finally:
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
  per_op = {}
  for name, ns in device_events(folder):
    total, count = per_op.get(name, (0.0, 0))
    per_op[name] = (total + ns, count + 1)
  ranked = sorted(per_op.items(), key=lambda kv: -kv[1][0])
  return {"wall_s": wall / epochs, "busy_s": sum(t for t, _ in per_op.values()) / 1e9 / epochs,
          "count": sum(c for _, c in per_op.values()) / epochs,
          "top": [(name, t / 1e9 / epochs, c / epochs) for name, (t, c) in ranked[:top]]}


@contextlib.contextmanager
def switched(name: str, on: bool):
  """Methods built inside see ``fast_jax.methods.learner.<name>`` = ``on``
  (:data:`~fast_jax.methods.learner.ONE_STEP_KERNEL`, :data:`~fast_jax.methods.learner.QUERY_FIRST`)."""
  before = getattr(learn, name)
  setattr(learn, name, on)
  try:
    yield
  finally:
    setattr(learn, name, before)


# bench_variants' pairs: (switch of fast_jax.methods.learner, label off, label on).
INNER_FORMS = ("ONE_STEP_KERNEL", "adapted weights", "kernel form")
QUERY_LAYOUTS = ("QUERY_FIRST", "query in place", "query first")
PART_CHOICES = ("PARTS_OUTSIDE_GRAD", "cond in gradient", "switch outside")


def bench_variants(cfg: Config, data, rounds: int, pair: tuple[str, str, str]) -> dict:
  """Seconds per epoch of the training epoch built with a switch of
  :mod:`fast_jax.methods.learner` off and on (``pair``: :data:`INNER_FORMS`,
  :data:`QUERY_LAYOUTS`, :data:`PART_CHOICES`), each batched as a run batches it
  (:func:`fast_jax.methods.learner.length_parts`): both epoch programs compiled in this
  process, then run alternately, ``rounds`` times each from the same state (so a drifting
  machine slows both). Returns
  {"times": {"off"/"on": [s per round]}, "compile_s": {...: s}, "labels": {...: label},
  "params_diff": the largest difference between the two programs' parameters after one
  epoch, relative to the largest value of the array it is in}."""
  name, off, on = pair
  key = jax.random.key(0)
  programs, compile_s, after = {}, {}, {}
  for variant, flag in (("off", False), ("on", True)):
    with switched(name, flag):
      m = Runner(cfg, data).method
      state, fit = m.init(key), m.splits["fit"]
      t0 = time.perf_counter()
      epoch = m.epoch.lower(state, fit, key).compile()
      after[variant] = jax.block_until_ready(epoch(state, fit, key))[0].params
      compile_s[variant] = time.perf_counter() - t0
      programs[variant] = (epoch, state, fit)
  times = {variant: [] for variant in programs}
  for r in range(rounds):
    for variant, (epoch, state, fit) in programs.items():
      times[variant].append(timed(epoch, state, fit, jax.random.fold_in(key, r + 1))[1])
  floats = lambda t: [np.asarray(v, np.float64) for v in jax.tree.leaves(t)
                      if jnp.issubdtype(v.dtype, jnp.floating)]
  # Relative to each array's scale. Adam steps a parameter whose gradient is within
  # rounding of zero by up to its full rate either way, so rounding shows there first.
  diff = max(float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))
             for a, b in zip(floats(after["off"]), floats(after["on"])) if a.size)
  return {"times": times, "compile_s": compile_s, "labels": {"off": off, "on": on},
          "params_diff": diff}


def bench_inner_forms(cfg: Config, data, rounds: int) -> dict:
  """:func:`bench_variants` of one inner step in kernel form against forming the adapted
  weights."""
  return bench_variants(cfg, data, rounds, INNER_FORMS)


def print_variants(r: dict) -> None:
  """Each variant's epochs and median, and the ratio of the medians (:func:`bench_variants`)."""
  for variant in ("off", "on"):
    t = r["times"][variant]
    print(f"  {r['labels'][variant]:16s} {' '.join(f'{v:.3f}' for v in t)} s/epoch, median "
          f"{np.median(t):.3f} (compile+first epoch {r['compile_s'][variant]:.1f} s)")
  ratio = np.median(r["times"]["off"]) / np.median(r["times"]["on"])
  print(f"  {r['labels']['on']} x{ratio:.2f} (ratio of medians); the parameters after one "
        f"epoch differ by at most {r['params_diff']:.1e} of an array's largest value")


def bench_vmapped_seeds(runner: Runner, seeds: int) -> dict:
  """One epoch of ``seeds`` seeds as one vmapped program vs the seeds one after another,
  both on whole batches (vmapped lanes do not run by length, see Runner.run_lanes)."""
  m = runner.lanes_method
  data = m.splits["fit"]
  keys = jax.random.split(jax.random.key(0), seeds)
  states = jax.tree.map(lambda *a: jnp.stack(a), *[m.init(k) for k in keys])
  vepoch = jax.jit(jax.vmap(m.epoch, in_axes=(0, None, 0)))
  _, compile_s = timed(vepoch, states, data, keys)
  _, vmapped = timed(vepoch, states, data, keys)
  state = m.init(keys[0])
  timed(m.epoch, state, data, keys[0])  # compile outside the timing
  t0 = time.perf_counter()
  for k in keys:
    jax.block_until_ready(m.epoch(state, data, k))
  sequential = time.perf_counter() - t0
  return {"compile_s": compile_s, "vmapped_s": vmapped, "sequential_s": sequential}


def _epochs_side_by_side(cfg: Config, data, epochs: int) -> dict:
  """One process of :func:`bench_side_by_side`: its median epoch (:func:`bench_scan`), its
  process id and the CPUs it may use."""
  epoch_s = bench_scan(Runner(cfg, data), epochs)["epoch_s"]
  cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  return {"epoch_s": epoch_s, "pid": os.getpid(), "cpus": cpus}


def bench_side_by_side(cfg: Config, data, *, jobs: int, epochs: int, rounds: int) -> dict:
  """Seconds per epoch of ``jobs`` copies of ``cfg`` training at once, each in a spawned
  process of its own (as a grid's ``--jobs`` workers), ``rounds`` times with each process
  held to its own CPUs (:func:`fast_jax.cli.grid.worker_cpus`) and, alternating, free to
  use them all. Returns {"held": [[process dicts] per round], "free": [...]}, each process's
  dict from :func:`_epochs_side_by_side`. Raises ValueError where the processes cannot be
  held to CPUs (one job, no CPU affinity, an accelerator)."""
  from fast_jax.cli import grid
  held = grid.worker_cpus(jobs)
  if any(c is None for c in held):
    raise ValueError("the processes cannot be held to CPUs here (it needs --jobs of at least "
                     "2, Linux CPU affinity and JAX on the CPU alone)")
  out = {"held": [], "free": []}
  for _ in range(rounds):
    for mode, sets in (("held", held), ("free", [None] * jobs)):
      with grid.worker_pool(sets) as pool:
        futures = [pool.submit(_epochs_side_by_side, cfg, data, epochs) for _ in range(jobs)]
        procs = [f.result() for f in futures]
      if len({p["pid"] for p in procs}) < jobs:  # one process ran two copies: not side by side
        raise RuntimeError(f"{mode} round: {jobs} copies ran in fewer processes")
      out[mode].append(procs)
  return out


def print_side_by_side(r: dict) -> None:
  """Each round's epochs of :func:`bench_side_by_side` and the ratio of the medians."""
  for mode, label in (("held", "each on its own CPUs"), ("free", "free to use all CPUs")):
    for i, procs in enumerate(r[mode], 1):
      epochs = " ".join(f"{p['epoch_s']:.3f}" for p in procs)
      cpus = "; ".join(",".join(map(str, p["cpus"])) if p["cpus"] else "?" for p in procs)
      print(f"  {label:<21s} round {i}: {epochs} s/epoch (CPUs {cpus})")
  held = np.median([p["epoch_s"] for procs in r["held"] for p in procs])
  free = np.median([p["epoch_s"] for procs in r["free"] for p in procs])
  print(f"  median {held:.3f} s held against {free:.3f} s free -> held x{held / free:.2f} "
        f"as long")


def bench_python_loop(runner: Runner, steps: int) -> dict:
  """The same model and inner loop, one user at a time from Python (per-user jit calls)."""
  ctx = runner.ctx
  cfg, data = ctx.cfg, ctx.splits["train"]
  backbone, labels = learn.network(ctx)
  learner = learn.maml(backbone, labels, steps=cfg.inner_steps, first_order=cfg.first_order)
  state = runner.method.init(jax.random.key(0))

  @jax.jit
  def user_grad(params, alpha, x, y, length, group, key):
    support, q = meta.query_split(key, length[None], ctx.max_len, cfg.train_query)

    def loss(p):
      pred = learn.predict(learner, p, alpha, x[None], y[None], support, q, group[None])
      mse, mae = learn.query_errors(pred, meta.take_rows(y[None], q))
      return mse[0], (mse[0], mae[0])
    return jax.grad(loss, has_aux=True)(params)

  tx = optax.adam(cfg.lr)
  apply = jax.jit(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0]))
  opt_state = tx.init(state.params)
  n = data["x"].shape[0]
  order = np.random.default_rng(0).permutation(n)
  g0, _ = user_grad(state.params, state.alpha, data["x"][0], data["y"][0], data["length"][0],
                    data["group"][0], jax.random.key(0))  # compile outside the timing
  jax.block_until_ready(apply(g0, opt_state, state.params))
  t0 = time.perf_counter()
  params = state.params
  for s in range(steps):
    idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
    grads, losses = [], []
    for u in idx:
      g, (mse, mae) = user_grad(params, state.alpha, data["x"][u], data["y"][u],
                                data["length"][u], data["group"][u], jax.random.key(int(u)))
      grads.append(g)
      losses.append((float(mse), float(mae)))
    # The group gap and p update on the host, as the reference does.
    groups = np.asarray(data["group"])[idx]
    fairness.update_p(state.p, *fairness.group_means(jnp.array([l[0] for l in losses]),
                                                     jnp.asarray(groups), 2), 1.0, 0.1)
    mean_grad = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
    params = apply(mean_grad, opt_state, params)
  jax.block_until_ready(params)
  per_step = (time.perf_counter() - t0) / steps
  steps_per_epoch = n // cfg.batch_size
  return {"epoch_s": per_step * steps_per_epoch, "users_per_s": cfg.batch_size / per_step}


def truncate_users(data, rows: int):
  """``data`` with every user cut to its first ``rows`` rows (the padding probe of
  ``--cut-rows``: fewer rows per user, not a protocol)."""
  rows = min(rows, data.train.max_len)

  def cut(split):
    return dataclasses.replace(split, x=cut_rows(split.x, rows), y=cut_rows(split.y, rows),
                               length=np.minimum(split.length, rows))
  return dataclasses.replace(data, train=cut(data.train), valid=cut(data.valid),
                             test=cut(data.test), meta={**data.meta, "max_len": rows})


def bench_cut_rows(cfg: Config, data, rows: list[int],
                   epochs: int) -> list[tuple[int, float, float]]:
  """(rows, mean rows per training user, seconds per epoch on whole batches) for each
  cut of :func:`truncate_users`: how an epoch's time grows with the padded rows per user."""
  out = []
  for n in rows:
    cut = truncate_users(data, n)
    runner = Runner(cfg.replace(length_parts=1), cut)
    out.append((n, float(cut.train.length.mean()), bench_scan(runner, epochs)["epoch_s"]))
  return out


ONCE = ("load data", "build", "compile")


def bench_breakdown(cfg: Config, epochs: int, seeds: int = 1) -> list[dict]:
  """Seconds per phase of a run of ``seeds`` seeds (module docstring), one dict
  ``{phase: seconds}`` per seed, from the seed's parameter initialisation (``init``) to
  its results file; the first also holds the run's one-off phases (:data:`ONCE`: loading
  the data, building the method, compiling ahead of time)."""
  from fast_jax import attack
  from fast_jax.checkpoint import SeedCheckpoint
  from fast_jax.files import write_json_atomic
  t = {}
  t0 = time.perf_counter()
  data = load_dataset(cfg, progress=False)
  cfg = resolve(cfg, data.meta["dataset"]).replace(epochs=epochs)
  t["load data"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  runner = Runner(cfg, data)
  m = runner.method
  fit = m.splits["fit"]
  t["build"] = time.perf_counter() - t0
  per_seed = []
  for seed in range(seeds):
    t = t if seed == 0 else {}
    k_init, k_train = jax.random.split(jax.random.key(1024 + seed))
    t0 = time.perf_counter()
    state = jax.block_until_ready(m.init(k_init))
    t["init"] = time.perf_counter() - t0
    if seed == 0:
      t0 = time.perf_counter()
      # The seeds' epochs call this executable: m.epoch would trace the epoch once more
      # inside the first epoch (about 0.1 s on ML-100K). The executable's first run still
      # costs about 0.5 s more than later ones (set-up inside XLA), counted in training.
      epoch_fn = m.epoch.lower(state, fit, k_train).compile() if m.epoch is not None else None
      runner.per_user(state, "valid")  # compiles the scorer for the validation chunks' budgets
      t["compile"] = time.perf_counter() - t0
    for k in ("train steps", "end of epoch", "validation", "checkpoints"):
      t[k] = 0.0
    with tempfile.TemporaryDirectory() as tmp:
      ckpt = SeedCheckpoint(tmp, 1024 + seed)
      for epoch in range(1, epochs + 1 if m.epoch is not None else 1):
        t0 = time.perf_counter()
        state, steps = epoch_fn(state, fit, jax.random.fold_in(k_train, epoch))
        jax.block_until_ready(steps)
        t["train steps"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        state, _ = m.end_of_epoch(state, runner.per_user)
        jax.block_until_ready(state)
        t["end of epoch"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        runner.evaluate(state, "valid")
        t["validation"] += time.perf_counter() - t0
        if epoch % cfg.checkpoint_every == 0 or epoch == epochs:
          t0 = time.perf_counter()
          ckpt.save(state=state, best_state=state, best_score=0.0, epoch=epoch, records=[])
          t["checkpoints"] += time.perf_counter() - t0
      t0 = time.perf_counter()
      report = runner.evaluate(state, "test")
      t["test"] = time.perf_counter() - t0
      t0 = time.perf_counter()
      if m.represent is not None and cfg.attack:
        report.update(attack.report(runner.representations(state, "train"),
                                    np.asarray(m.splits["train"]["group"]),
                                    runner.representations(state, "test"),
                                    np.asarray(m.splits["test"]["group"])))
      t["attacker"] = time.perf_counter() - t0
      t0 = time.perf_counter()
      write_json_atomic(pathlib.Path(tmp) / "results.json", report)
      t["results file"] = time.perf_counter() - t0
    per_seed.append(t)
  return per_seed


def print_breakdown(per_seed: list[dict], title: str) -> None:
  """The table of :func:`bench_breakdown`: each phase for the first seed, the median of
  the later seeds (which reuse the first seed's programs), and the whole run."""
  phases = list(per_seed[0])
  whole = {k: sum(t.get(k, 0.0) for t in per_seed) for k in phases}
  total = sum(whole.values())
  later = len(per_seed) > 1
  print(f"{title}: {total:.1f} s")
  print(f"  {'phase':<14s} {'seed 1':>8s}" + (f" {'later seeds':>12s}" if later else "")
        + f" {'whole run':>10s}")
  for k in phases:
    rest = "" if not later else (
        f" {'':>12s}" if k in ONCE else f" {np.median([t[k] for t in per_seed[1:]]):10.2f} s")
    print(f"  {k:<14s} {per_seed[0][k]:6.2f} s{rest} {whole[k]:8.2f} s  "
          f"{100 * whole[k] / total:5.1f}%")


# run.sh's MeLU+FAST line of the authors' code (zhengz99/FAST at 011f677: Book-Crossing,
# FAST's per-epoch p update) on the CPU, one seed; --num_epoch is added per call.
AUTHORS_COMMAND = ("main.py", "--model", "Ours", "--lr", "1e-4", "--local_lr", "1e-4",
                   "--gamma", "0.1", "--beta", "0.5", "--device", "cpu", "--batch_size", "32",
                   "--repeat_times", "1")


# Runs the authors' main.py in a fresh interpreter and writes its own peak resident
# memory (VmHWM, kB) to the file named first: a child's rusage would report at least the
# parent's peak, which a fork hands down.
_PEAK_WRAPPER = """
import runpy, sys
out = sys.argv.pop(1)
sys.argv[0] = "main.py"
try:
  runpy.run_path("main.py", run_name="__main__")
finally:
  with open("/proc/self/status") as f:
    hwm = [line.split()[1] for line in f if line.startswith("VmHWM:")]
  with open(out, "w") as f:
    f.write(hwm[0] if hwm else "")
"""


def run_authors(folder: str, python: str, epochs: int) -> tuple[float, float]:
  """Wall seconds and peak resident MB (its own, Linux; NaN elsewhere) of the authors'
  command at ``epochs`` epochs, run in their checkout ``folder`` by ``python`` (an
  environment with torch)."""
  with tempfile.TemporaryDirectory() as tmp:
    peak, err = pathlib.Path(tmp) / "peak_kb", pathlib.Path(tmp) / "stderr"
    t0 = time.perf_counter()
    with open(err, "wb") as f:
      proc = subprocess.run([python, "-c", _PEAK_WRAPPER, str(peak), *AUTHORS_COMMAND[1:],
                             "--num_epoch", str(epochs)],
                            cwd=folder, stdout=subprocess.DEVNULL, stderr=f)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
      tail = err.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
      raise RuntimeError(f"the authors' code at {folder} exited with status "
                         f"{proc.returncode}: {tail[0]}")
    kb = peak.read_text().strip() if peak.exists() else ""
  return wall, float(kb) / 1024 if kb else float("nan")


def bench_authors(folder: str, python: str, data_dir: str | None, rounds: int,
                  epochs: int = 3, *, dataset: str = "bookcrossing",
                  batch_size: int = 32) -> list[dict]:
  """One dict per round: the authors' seconds per epoch, (``epochs`` epochs - 1 epoch)
  / (``epochs`` - 1), which leaves out their loading and test pass, their peak memory,
  and fast-jax's seconds per epoch on the same data in step mode (the default) and in
  epoch mode (their setting), each with what a run does after the epoch's steps
  (:func:`bench_scan`). Each round runs theirs and then ours, so that a machine whose
  speed drifts slows both."""
  cfg = Config(dataset=dataset, data_dir=data_dir, backbone="melu", method="fast",
               batch_size=batch_size)  # batched as a run's (by length on a CPU)
  data = load_dataset(cfg, progress=False)
  runners = {mode: Runner(resolve(cfg.replace(p_update=mode), data.meta["dataset"]), data)
             for mode in ("step", "epoch")}  # resolved per mode: the gap loss depends on it
  out = []
  for _ in range(rounds):
    one, rss_one = run_authors(folder, python, 1)
    more, rss_more = run_authors(folder, python, epochs)
    r = {"authors_s": (more - one) / (epochs - 1), "authors_rss_mb": (rss_one, rss_more)}
    for mode, runner in runners.items():
      r[f"{mode}_s"] = bench_scan(runner, epochs)["epoch_with_valid_s"]
    r["rss_mb"] = peak_rss_mb()
    out.append(r)
  return out


def print_authors(rounds: list[dict], epochs: int) -> None:
  """The table of :func:`bench_authors` and the median ratios."""
  print("Book-Crossing MeLU+FAST, seconds per epoch (fast-jax: with the end-of-epoch "
        "update and validation):")
  print(f"  {'round':<6s} {'authors':>9s} {'fast-jax step':>14s} {'fast-jax epoch':>15s} "
        f"{'authors peak (1 / ' + str(epochs) + ' epochs)':>30s}")
  for i, r in enumerate(rounds, 1):
    print(f"  {i:<6d} {r['authors_s']:8.2f}s {r['step_s']:13.3f}s {r['epoch_s']:14.3f}s "
          f"{r['authors_rss_mb'][0] / 1024:13.1f} / {r['authors_rss_mb'][1] / 1024:.1f} GB")
  for mode, what in (("step", "step mode (the paper's, fast-jax's default)"),
                     ("epoch", "epoch mode (the authors' setting)")):
    ratio = np.median([r["authors_s"] / r[f"{mode}_s"] for r in rounds])
    print(f"  fast-jax faster, median over rounds, {what}: x{ratio:.1f}")
  print(f"  fast-jax peak RSS: {rounds[-1]['rss_mb']:.0f} MB (this process, both modes)")


def bench_table2(dataset: str, *, data_dir: str | None, seeds: int, epochs: int | None,
                 jobs: int, vmap: bool, out: str | None = None) -> list[tuple[str, float, str]]:
  """Seconds of each Table 2 row of ``dataset`` (its epochs and validation; for runs
  trained as one vectorised program, the wall time of that program, named in the third
  field) and the wall seconds of the whole block, trained through the Table 2 driver
  into a temporary folder (or into ``out``, kept, which must not hold runs yet)."""
  from fast_jax.cli import grid, table2
  runs = table2.make_runs([dataset], table2.ROWS, seeds=seeds, epochs=epochs,
                          data_dir=data_dir, p_update="step")
  with (contextlib.nullcontext(out) if out is not None else tempfile.TemporaryDirectory()) as tmp:
    t0 = time.perf_counter()
    grid.run_grid(runs, pathlib.Path(tmp), vmap=vmap, jobs=jobs)
    total = time.perf_counter() - t0
    rows = []
    for run in runs:
      folder = pathlib.Path(tmp) / run.name
      wall = (folder / "wall_time.txt").read_text().splitlines()[-1] \
          if (folder / "wall_time.txt").exists() else ""
      if wall and ("vectorised" in wall or (vmap and grid.vectorised_group([run]))):
        # lanes: each lane's records hold the whole program's epochs
        note = wall[wall.index("(") + 1:-1] if "(" in wall else "its seeds vectorised"
        rows.append((run.row, float(wall.split()[0]), f"wall: {note}"))
        continue
      path = folder / "metrics.jsonl"
      seconds = sum(json.loads(line).get("seconds", 0.0)
                    for line in path.read_text().splitlines()) if path.exists() else 0.0
      rows.append((run.row, seconds, "epochs and validation"))
  return rows + [("whole block (wall)", total, "")]


def _config(args) -> Config:
  """The configuration the command line asks to time (before its preset is resolved)."""
  return Config(dataset=args.dataset, data_dir=args.data_dir, backbone=args.backbone,
                method=args.method, p_update=args.p_update, batch_size=args.batch_size,
                first_order=args.first_order, length_parts=args.length_parts)


@one_line_errors
def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="bookcrossing")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--backbone", default="melu")
  p.add_argument("--method", default="fast")
  p.add_argument("--p-update", default="step")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--epochs", type=int, default=3, help="timed epochs after the compiling one")
  p.add_argument("--loop-steps", type=int, default=5,
                 help="steps of the per-user Python loop to time (extrapolated to an epoch)")
  p.add_argument("--first-order", action="store_true")
  p.add_argument("--length-parts", type=int, default=None,
                 help="length-sorted parts per batch (default: as in a 50-epoch run); "
                      "timed against whole batches")
  p.add_argument("--seeds", type=int, default=0,
                 help="also time an epoch of this many seeds vmapped vs sequential; "
                      "--breakdown: seeds of the run (default 1); --table2: default 5")
  p.add_argument("--breakdown", action="store_true",
                 help="time every phase of a whole run (--seeds seeds of --epochs epochs)")
  p.add_argument("--table2", metavar="DATASET", default=None,
                 help="time the whole Table 2 block of DATASET (--seeds, default 5)")
  p.add_argument("--jobs", type=int, default=None,
                 help="--table2: runs at once (default 1); --side-by-side: copies (default 2)")
  p.add_argument("--vmap", action="store_true",
                 help="--table2: seeds, and each backbone's Origin/Reg/IPW/FAST rows, as lanes")
  p.add_argument("--cut-rows", type=int, nargs="+", default=None, metavar="L",
                 help="padding probe: the epoch on whole batches with every user cut to its "
                      "first L rows, for each L")
  p.add_argument("--authors", metavar="DIR", default=None,
                 help="time the authors' code (a checkout of zhengz99/FAST) beside fast-jax on "
                      "Book-Crossing MeLU+FAST, 1 and --epochs epochs, --rounds times")
  p.add_argument("--authors-python", metavar="PY", default="python",
                 help="--authors: the Python of an environment with torch (default: python)")
  p.add_argument("--inner-forms", action="store_true",
                 help="time a one-step setting's epoch with its inner step in kernel form "
                      "against forming the adapted weights, --rounds rounds alternating")
  p.add_argument("--query-layouts", action="store_true",
                 help="time a meta-learner's epoch with each user's query rows in place "
                      "against laid out query first, --rounds rounds alternating")
  p.add_argument("--part-choice", action="store_true",
                 help="time a meta-learner's epoch by length with each part's choice of rows "
                      "inside the gradient (a lax.cond) against outside it (one lax.switch), "
                      "--rounds rounds alternating")
  p.add_argument("--side-by-side", action="store_true",
                 help="time --jobs copies of the epoch training at once, each process held to "
                      "its own CPUs and free to use all, --rounds rounds alternating")
  p.add_argument("--profile", metavar="DIR", default=None,
                 help="trace --epochs epochs with jax.profiler into DIR (with the epoch's "
                      "optimised HLO) and print the operations that took the most time")
  p.add_argument("--rounds", type=int, default=None,
                 help="--authors: rounds (default 2); --inner-forms, --query-layouts, "
                      "--part-choice: rounds "
                      "(default 5); "
                      "--side-by-side: rounds (default 2)")
  p.add_argument("--out", default=None,
                 help="--table2: train the runs into this (new or empty) folder and keep them, "
                      "to compare their results with committed ones")
  args = p.parse_args(argv)
  if args.table2 is not None:
    out = pathlib.Path(args.out) if args.out is not None else None
    if out is not None and out.is_dir() and any(out.iterdir()):
      p.error(f"--out {args.out}: the folder is not empty; a timing needs a fresh one")
    rows = bench_table2(args.table2, data_dir=args.data_dir, seeds=args.seeds or 5,
                        epochs=None, jobs=args.jobs or 1, vmap=args.vmap, out=args.out)
    print(f"Table 2 block of {args.table2} on {backend()} "
          f"({args.seeds or 5} seeds, --jobs {args.jobs or 1}{', --vmap' if args.vmap else ''}):")
    for row, seconds, what in rows:
      print(f"  {row:<22s} {seconds:8.1f} s" + (f"  ({what})" if what else ""))
    return 0
  if args.rounds is not None and args.rounds < 1:
    p.error(f"--rounds must be at least 1, got {args.rounds}")
  if args.inner_forms or args.query_layouts or args.part_choice:
    flag = ("--inner-forms" if args.inner_forms else "--query-layouts" if args.query_layouts
            else "--part-choice")
    cfg = _config(args)
    if args.method not in config_lib.META_METHODS:
      p.error(f"{flag}: --method must be a meta-learning method "
              f"({', '.join(config_lib.META_METHODS)}), got {args.method!r}")
    data = load_dataset(cfg, progress=False)
    cfg = resolve(cfg, data.meta["dataset"])
    if args.inner_forms and cfg.inner_steps != 1:
      p.error(f"--inner-forms: {cfg.backbone} on {cfg.dataset} takes {cfg.inner_steps} inner "
              "steps; the kernel form is for one (MeLU on bookcrossing, MetaCS on any dataset)")
    rounds = args.rounds or 5
    steps = "one inner step" if args.inner_forms else f"{cfg.inner_steps} inner step(s)"
    print(f"{cfg.backbone}+{cfg.method} on {cfg.dataset}, {steps}, {rounds} rounds "
          f"alternating, backend {backend()}:")
    print_variants(bench_inner_forms(cfg, data, rounds) if args.inner_forms
                   else bench_variants(cfg, data, rounds,
                                       QUERY_LAYOUTS if args.query_layouts else PART_CHOICES))
    return 0
  if args.side_by_side:
    jobs = 2 if args.jobs is None else args.jobs
    if jobs < 2:
      p.error(f"--side-by-side: --jobs must be at least 2, got {jobs}")
    if args.method not in config_lib.META_METHODS:
      p.error(f"--side-by-side: --method must be a meta-learning method "
              f"({', '.join(config_lib.META_METHODS)}), got {args.method!r}")
    cfg = _config(args)
    data = load_dataset(cfg, progress=False)
    cfg = resolve(cfg, data.meta["dataset"])
    rounds = args.rounds or 2
    print(f"{cfg.backbone}+{cfg.method} on {cfg.dataset}, {jobs} copies at once, {rounds} "
          f"round{'s' if rounds > 1 else ''} of {args.epochs} epochs each way, backend "
          f"{backend()}:")
    try:
      r = bench_side_by_side(cfg, data, jobs=jobs, epochs=args.epochs, rounds=rounds)
    except ValueError as e:
      p.error(f"--side-by-side: {e}")
    print_side_by_side(r)
    return 0
  if args.authors is not None:
    if not (pathlib.Path(args.authors) / "main.py").is_file():
      p.error(f"--authors {args.authors}: expected a checkout of zhengz99/FAST (a folder "
              "with main.py)")
    if args.epochs < 2:
      p.error("--authors needs --epochs of at least 2")
    probe = subprocess.run([args.authors_python, "-c", "import torch; print(torch.__version__)"],
                           capture_output=True, text=True) if shutil.which(args.authors_python) \
        else None
    if probe is None or probe.returncode != 0:
      p.error(f"--authors-python {args.authors_python}: expected a Python that can import torch")
    print(f"authors' code: {args.authors} (torch {probe.stdout.strip()}, CPU); fast-jax: "
          f"{backend()}")
    try:
      rounds = bench_authors(args.authors, args.authors_python, args.data_dir,
                             args.rounds or 2, args.epochs)
    except RuntimeError as e:
      print(f"bench: {e}", file=sys.stderr)
      return 1
    print_authors(rounds, args.epochs)
    return 0
  if args.breakdown:
    cfg = _config(args)
    seeds = max(args.seeds, 1)
    print_breakdown(bench_breakdown(cfg, args.epochs, seeds),
                    f"{args.backbone}+{args.method} on {args.dataset}, {seeds} seed(s) of "
                    f"{args.epochs} epochs, backend {backend()}")
    print(f"peak RSS: {peak_rss_mb():.0f} MB")
    return 0
  if args.method not in config_lib.META_METHODS:
    p.error(f"--method must be a meta-learning method ({', '.join(config_lib.META_METHODS)}), "
            f"got {args.method!r}")

  cfg = _config(args)
  data = load_dataset(cfg, progress=False)
  cfg = resolve(cfg, data.meta["dataset"])
  runner = Runner(cfg, data)
  n = data.train.x.shape[0]
  print(f"{cfg.backbone}+{cfg.method} ({cfg.p_update} mode, "
        f"{'first' if cfg.first_order else 'second'} order) on {data.meta['dataset']}: "
        f"{n} training users, L={runner.ctx.max_len}, batch {cfg.batch_size}, "
        f"{n // cfg.batch_size} steps/epoch; backend {backend()}, "
        f"{jax.device_count()} device(s)")
  if args.profile is not None:
    r = profile_epochs(runner, args.epochs, pathlib.Path(args.profile))
    print(f"profiled {args.epochs} epochs into {args.profile}: {r['wall_s']:.4f} s/epoch "
          f"under the profiler, {r['busy_s']:.4f} s of operations in "
          f"{r['count']:.0f} operations per epoch; the longest, per epoch:")
    for name, seconds, count in r["top"]:
      print(f"  {seconds * 1e3:9.3f} ms {count:7.0f} x  {name}")
    return 0
  scan = bench_scan(runner, args.epochs)
  print(f"jitted epoch scan: compile+first epoch {scan['compile_s']:.2f} s, "
        f"{scan['epoch_s']:.3f} s/epoch, {scan['epoch_with_valid_s']:.3f} s/epoch with "
        f"validation, {scan['users_per_s']:.0f} users/s")
  print(f"peak RSS so far: {peak_rss_mb():.0f} MB")
  if args.cut_rows:
    print("padding probe (whole batches, every user cut to its first L rows; mean rows per "
          f"user {data.train.length.mean():.1f} uncut):")
    for rows, mean, epoch_s in bench_cut_rows(cfg, data, args.cut_rows, args.epochs):
      print(f"  L={rows:<4d} mean length {mean:5.1f}: {epoch_s:.3f} s/epoch")
  parts = learn.length_parts(runner.ctx)
  if parts > 1:
    whole = bench_scan(runner, args.epochs, runner.lanes_method)
    print(f"by length ({parts} parts where they fit) vs "
          f"whole batches: {scan['epoch_s']:.3f} vs {whole['epoch_s']:.3f} s/epoch -> x"
          f"{whole['epoch_s'] / scan['epoch_s']:.2f}; compile+first epoch "
          f"{scan['compile_s']:.1f} vs {whole['compile_s']:.1f} s")
  if args.seeds > 1:
    v = bench_vmapped_seeds(runner, args.seeds)
    print(f"{args.seeds} seeds, one epoch: vmapped {v['vmapped_s']:.2f} s (compile "
          f"{v['compile_s']:.1f} s), sequential {v['sequential_s']:.2f} s -> speed-up "
          f"x{v['sequential_s'] / v['vmapped_s']:.2f}")
  if cfg.method == "clover" or args.loop_steps <= 0:
    print(f"peak RSS: {peak_rss_mb():.0f} MB")
    return 0
  loop = bench_python_loop(runner, args.loop_steps)
  print(f"per-user Python loop ({args.loop_steps} steps, extrapolated): "
        f"{loop['epoch_s']:.1f} s/epoch, {loop['users_per_s']:.0f} users/s "
        f"-> scan speed-up x{loop['epoch_s'] / scan['epoch_s']:.0f}")
  print(f"peak RSS: {peak_rss_mb():.0f} MB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
