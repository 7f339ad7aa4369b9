"""The one runner: trains any method (:mod:`fast_jax.methods`) for one seed or as
``vmap``-ped lanes, and evaluates it.

What it owns, for every method alike: the seed's keys (epoch e always uses
``fold_in(key(seed), e)``, so a resumed seed ends where an uninterrupted one would),
checkpoints and resume, divergence (a non-finite step loss raises :class:`Diverged`,
naming the epoch and step), the ``metrics.jsonl`` records, selection of the tested epoch
(last, or lowest validation MAE, with early stopping), data parallelism (the context's
mesh), evaluation on the fixed last-10 query in fixed-size chunks (with a meta-learner's
adaptation diagnostics, :mod:`fast_jax.diagnostics`, and the test users' per-row
predictions), and the attacker.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fast_jax import attack, diagnostics, meta, metrics, methods, sharding
from fast_jax.checkpoint import SeedCheckpoint
from fast_jax.config import Config, UsageError
from fast_jax.methods.base import Method, make_context


class Diverged(FloatingPointError):
  """A seed's training loss became NaN or infinite."""


# Users per evaluation call when ``cfg.eval_chunk`` is unset: on a CPU small chunks stay
# in its caches (a Book-Crossing MeLU pass: 0.14 ms per user in chunks of 64, 0.23 in
# chunks of 256; EXPERIMENTS.md), elsewhere large ones fill the device.
EVAL_CHUNK = {"cpu": 64}
EVAL_CHUNK_DEFAULT = 512


def eval_budgets(max_len: int, *, backend: str | None = None) -> tuple[int, ...]:
  """Row budgets of the evaluation chunks: on a CPU 32, 64, 128, ... below ``max_len``,
  then ``max_len`` (each chunk of length-sorted users runs on the smallest that its
  longest user fits in, one compiled program per budget); on a GPU or TPU (``backend``:
  default JAX's) () -- every chunk on all ``max_len`` rows, one program."""
  if (backend or jax.default_backend()) != "cpu":
    return ()
  budgets, b = [], 32
  while b < max_len:
    budgets.append(b)
    b *= 2
  return tuple(budgets) + (max_len,)


def chunk_plan(lengths: np.ndarray, chunk: int,
               budgets: tuple[int, ...] = ()) -> list[tuple[np.ndarray, int | None, int]]:
  """The evaluation chunks of a split's users: ``(users, rows, count)`` per chunk, with
  ``users`` int[chunk] (the last chunk padded by repeating its last user, so that every
  call has the same number of users), ``count`` the real ones among them and ``rows``
  the budget of ``budgets`` that its longest user's ``lengths`` fits in (None: all
  rows). With budgets the users go in length order (stable), so that a chunk's users
  have similar lengths; without, in the split's order."""
  lengths = np.asarray(lengths)
  n = len(lengths)
  chunk = min(chunk, n)
  order = np.argsort(lengths, kind="stable") if budgets else np.arange(n)
  plan = []
  for start in range(0, n, chunk):
    users = order[start:start + chunk]
    count = len(users)
    users = np.concatenate([users, np.repeat(users[-1:], chunk - count)])
    need = lengths[users].max()
    rows = next((b for b in budgets if b >= need), None)  # None: all rows (or no budgets)
    plan.append((users, rows, count))
  return plan


def cut_rows(a, rows: int | None):
  """A per-user array's first ``rows`` rows (axis 1; [U] arrays whole)."""
  return a if rows is None or a.ndim < 2 else a[:, :rows]


def make_chunks(arrays: tuple, chunk: int, *, lengths: np.ndarray | None = None,
                budgets: tuple[int, ...] = (), put: Callable = lambda t: t) -> list:
  """The inputs of :func:`run_chunks`: ``(users, put(inputs))`` per chunk of
  :func:`chunk_plan` (with ``budgets``, by ``lengths``), ``users`` its real users and
  ``inputs`` the chunk's ``arrays`` (per-user, axis 0), [U, L, ...] ones cut to its
  budget."""
  n = arrays[0].shape[0]
  plan = chunk_plan(lengths if budgets else np.zeros(n, int), chunk, budgets)
  return [(users[:count], put(tuple(cut_rows(a[users], rows) for a in arrays)))
          for users, rows, count in plan]


def run_chunks(fn: Callable, chunks: list) -> Any:
  """``fn(*inputs)`` over :func:`make_chunks`'s chunks; ``fn``'s pytree of host arrays
  for every user in the split's order, or None when ``fn`` returns None. With row
  budgets ``fn`` must not notice the cut: rows past a user's length are padding."""
  parts = [fn(*inputs) for _, inputs in chunks]  # all dispatched before any is read back
  if parts[0] is None:
    return None
  outs = [jax.tree.map(lambda v, n=len(users): np.asarray(v)[:n], part)
          for (users, _), part in zip(chunks, parts)]
  back = np.argsort(np.concatenate([users for users, _ in chunks]))
  return jax.tree.map(lambda *o: np.concatenate(o)[back], *outs)


def map_chunks(fn: Callable, arrays: tuple, chunk: int, **plan) -> Any:
  """``fn(*arrays)`` over the users in chunks of ``chunk`` (:func:`make_chunks`'s
  ``plan``: lengths, budgets), so that ``fn`` compiles once per row budget."""
  return run_chunks(fn, make_chunks(arrays, chunk, **plan))


class Runner:
  """Training and evaluation of one resolved configuration on one prepared dataset."""

  def __init__(self, cfg: Config, data, *, make: Callable | None = None):
    """``make(ctx, *, by_length) -> Method`` builds the method (default: the registry's
    ``cfg.method``, :func:`fast_jax.methods.make`)."""
    self.cfg = cfg
    self.ctx = make_context(cfg, data)
    self._make = make or methods.make
    self.method: Method = self._make(self.ctx)
    self._lanes_method: Method | None = None
    self._lanes_epochs: dict[bool, Callable] = {}
    self._chunk_cache: dict[str, list] = {}

    @jax.jit
    def score(state, x, y, length, group):
      """Per-user metrics and the query predictions behind them; a meta-learner's
      unadapted predictions come from the same pass (``pred0``)."""
      support, query_idx = meta.last_query_split(length, x.shape[1])
      pred = self.method.predict(state, x, y, support, query_idx, group)
      y_q = meta.take_rows(y, query_idx)
      out = {"metrics": metrics.user_metrics(pred, y_q), "pred": pred, "y": y_q,
             "query_idx": query_idx}
      if self.method.predict_unadapted is not None:
        out["pred0"] = self.method.predict_unadapted(state, x, y, support, query_idx, group)
      return out

    @jax.jit
    def represent(state, x, y, length, group):
      support, _ = meta.last_query_split(length, x.shape[1])
      valid = jnp.arange(x.shape[1]) < length[:, None]
      return self.method.represent(state, x, y, support, valid, group)
    self._score, self._represent = score, represent

  # --- evaluation --------------------------------------------------------------------

  @property
  def eval_chunk(self) -> int:
    """Users per evaluation call, the same for every split so that the evaluator and
    the attacker's representations compile once per row budget rather than once per
    split size: ``cfg.eval_chunk`` (unset: :data:`EVAL_CHUNK` of the backend), or the
    smallest split when it is smaller (at least 64 users, so a tiny split does not cut a
    large one into many calls)."""
    chunk = self.cfg.eval_chunk or EVAL_CHUNK.get(jax.default_backend(), EVAL_CHUNK_DEFAULT)
    sizes = [self.method.splits[s]["group"].shape[0] for s in ("train", "valid", "test")]
    return min(chunk, max(min(sizes), 64))

  def _arrays(self, split: str) -> tuple:
    d = self.method.splits[split]
    return d["x"], d["y"], d["length"], d["group"]

  def _chunks(self, split: str) -> list:
    """A split's evaluation chunks (:func:`make_chunks` with :func:`eval_budgets`),
    built once: the chunk's device inputs (x, y, length, group) cut to its row budget."""
    if split not in self._chunk_cache:
      arrays = tuple(np.asarray(a) for a in self._arrays(split))
      self._chunk_cache[split] = make_chunks(
          arrays, self.eval_chunk, lengths=arrays[2], budgets=eval_budgets(self.ctx.max_len),
          put=lambda t: sharding.replicate(t, self.ctx.mesh))
    return self._chunk_cache[split]

  def scores(self, state, split: str) -> dict[str, Any]:
    """One evaluation pass over a split's users on their last-10 query: ``metrics``
    (per-user MAE, MSE, NDCG@3, float[U]), ``pred``, ``y`` (float[U, Q]), ``query_idx``
    (int[U, Q]) and, for a meta-learner, ``pred0`` (float[U, Q], unadapted); host arrays.
    On a CPU the users run in length-sorted chunks, each on only the rows its longest
    user needs (:func:`eval_budgets`): the same per-user results up to floating-point
    summation order."""
    return run_chunks(lambda *a: self._score(state, *a), self._chunks(split))

  def per_user(self, state, split: str) -> dict[str, np.ndarray]:
    """Per-user MAE, MSE, NDCG@3 of every user of a split (host arrays, float[U])."""
    return self.scores(state, split)["metrics"]

  @property
  def group_names(self) -> list[str]:
    return [str(n) for n in self.ctx.data.meta["sensitive"]["groups"]]

  def evaluate(self, state, split: str, *, scores: dict | None = None) -> dict:
    """The split's metrics report (overall, per group with its name, GF) and, for a
    meta-learner, its ``adaptation`` (:func:`fast_jax.diagnostics.summarize`), from one
    pass (``scores``: that pass, already run)."""
    scores = self.scores(state, split) if scores is None else scores
    report = metrics.group_report(scores["metrics"],
                                  np.asarray(self.method.splits[split]["group"]),
                                  self.ctx.num_groups, names=self.group_names)
    if "pred0" in scores:
      d = self.ctx.data.split(split)
      support_mean = diagnostics.support_means(d.y, d.length, scores["y"].shape[1])
      report["adaptation"] = diagnostics.summarize(diagnostics.adaptation_per_user(
          scores["pred"], scores["pred0"], scores["y"], support_mean))
    return report

  def predictions(self, scores: dict, split: str) -> dict[str, np.ndarray]:
    """The query rows of a split's :meth:`scores` as columns, user by user
    (``predictions/seed-S.csv``): ``user_id``, ``group`` (its name), ``item_row`` (the
    row within the user), ``y``, ``y_hat`` and ``y_hat_unadapted`` (None without an
    inner loop)."""
    d = self.ctx.data.split(split)
    q = scores["y"].shape[1]
    names = np.array(self.group_names, dtype=object)
    return {"user_id": np.repeat(np.asarray(d.user_id), q),
            "group": names[np.repeat(np.asarray(d.group), q)],
            "item_row": scores["query_idx"].reshape(-1), "y": scores["y"].reshape(-1),
            "y_hat": scores["pred"].reshape(-1),
            "y_hat_unadapted": scores["pred0"].reshape(-1) if "pred0" in scores else None}

  def representations(self, state, split: str) -> np.ndarray | None:
    """float[U, D] adapted user representations of every user of a split, or None when
    the method has none."""
    if self.method.represent is None:
      return None
    return run_chunks(lambda *a: self._represent(state, *a), self._chunks(split))

  def test_report(self, state, *, selected_epoch: int, epochs_run: int,
                  predictions: Callable[[dict], None] | None = None) -> dict:
    """What a finished seed reports (``results.json`` per seed): the test metrics (with a
    meta-learner's adaptation), the attacker AUC of a meta-learner's adapted user
    representations (docs/methods.md §6.3), and a baseline's choices. ``predictions``
    receives the test rows of :meth:`predictions`, from the same pass."""
    m = self.method
    scores = self.scores(state, "test")
    report = self.evaluate(state, "test", scores=scores)
    if predictions is not None:
      predictions(self.predictions(scores, "test"))
    if m.represent is not None:
      if not self.cfg.attack:
        report.update(attack.unavailable("attacker disabled (--no-attack)"))
      else:
        report.update(attack.report(self.representations(state, "train"),
                                    np.asarray(m.splits["train"]["group"]),
                                    self.representations(state, "test"),
                                    np.asarray(m.splits["test"]["group"])))
    choices = m.choices(state, selected_epoch, epochs_run)
    if choices is not None:
      report["choices"] = choices
    return report

  # --- training ----------------------------------------------------------------------

  def end_of_epoch(self, method: Method, seed: int, epoch: int, state, steps: dict,
                   t0: float) -> tuple[Any, dict]:
    """After an epoch's steps: check for divergence, the method's end-of-epoch update,
    validation, and the epoch's ``metrics.jsonl`` record."""
    bad = np.flatnonzero(~np.isfinite(steps["loss"]))
    if bad.size:
      raise Diverged(f"seed {seed}: the training loss became {steps['loss'][bad[0]]} at "
                     f"epoch {epoch}, step {bad[0] + 1}; {method.hint}")
    state, fields = method.end_of_epoch(state, self.per_user)
    record = {"seed": seed, "epoch": epoch, **method.record(state, steps), **fields,
              "valid": self.evaluate(state, "valid"), "seconds": time.perf_counter() - t0}
    return state, record

  def run_seed(self, seed: int, *, log: Callable[[dict], None] = lambda r: None,
               progress: bool = True, checkpoint: SeedCheckpoint | None = None,
               checkpoint_every: int = 5,
               predictions: Callable[[dict], None] | None = None) -> tuple[Any, dict]:
    """Train one seed for ``cfg.epochs`` epochs; return the selected state and its test
    report (``predictions``: :meth:`test_report`'s).

    With ``checkpoint``, the seed continues from its last checkpoint if there is one, and
    a checkpoint is written every ``checkpoint_every`` epochs and after the last epoch.

    Raises:
      Diverged: a non-finite training loss; names the epoch and step. The last good
        checkpoint is kept.
    """
    m, cfg = self.method, self.cfg
    k_init, k_train = jax.random.split(jax.random.key(seed))
    state = sharding.replicate(m.init(k_init), self.ctx.mesh)
    if m.epoch is None:  # nothing to train: one record, epoch 0
      t0 = time.perf_counter()
      log({"seed": seed, "epoch": 0, **m.record(state, self.evaluate(state, "train")),
           "valid": self.evaluate(state, "valid"), "seconds": time.perf_counter() - t0})
      return state, self.test_report(state, selected_epoch=0, epochs_run=0,
                                     predictions=predictions)
    best_score, best_state, best_epoch, start, records = np.inf, state, 0, 1, []
    if checkpoint is not None and checkpoint.exists():
      saved = checkpoint.restore(state)
      state, best_state, best_score = saved["state"], saved["best_state"], saved["best_score"]
      start, records = saved["epoch"] + 1, saved["records"]
      for record in records:
        log(record)
      if records:
        best_epoch = records[int(np.argmin([r["valid"]["mae"] for r in records]))]["epoch"]
    epoch = start - 1
    bar = tqdm(range(start, cfg.epochs + 1), desc=f"{cfg.method} seed {seed}",
               disable=not progress, leave=False)
    for epoch in bar:
      t0 = time.perf_counter()
      state, steps = m.epoch(state, m.splits["fit"], jax.random.fold_in(k_train, epoch))
      state, record = self.end_of_epoch(m, seed, epoch, state, jax.device_get(steps), t0)
      if record["valid"]["mae"] < best_score:
        best_score, best_state, best_epoch = record["valid"]["mae"], state, epoch
      records.append(record)
      log(record)
      if checkpoint is not None and (epoch % checkpoint_every == 0 or epoch == cfg.epochs):
        checkpoint.save(state=state, best_state=best_state, best_score=best_score, epoch=epoch,
                        records=records)
      bar.set_postfix(loss=round(record["train_loss"], 4),
                      val_mae=round(record["valid"]["mae"], 4))
      if m.patience and epoch - best_epoch >= m.patience:
        break
    selected = epoch
    if m.select == "best-valid":
      state, selected = best_state, best_epoch
    return state, self.test_report(state, selected_epoch=selected, epochs_run=epoch,
                                   predictions=predictions)

  @property
  def lanes_method(self) -> Method:
    """The method on whole batches (under vmap the by-length parts' ``lax.switch``
    would run every branch)."""
    if self._lanes_method is None:
      self._lanes_method = self._make(self.ctx, by_length=False)
    return self._lanes_method

  def run_lanes(self, seeds: list[int], *, hypers: list[dict] | None = None,
                log: Callable[[int, dict], None] = lambda lane, r: None,
                progress: bool = True,
                predictions: Callable[[int, dict], None] | None = None
                ) -> list[dict | Diverged]:
    """Train several lanes as one vectorised program: the epoch scan ``vmap``-ped over a
    stack of train states and their keys. Lane i is seed ``seeds[i]`` with the
    hyperparameters ``hypers[i]`` (e.g. ``{"gamma": 0.5, "tau": 0.1, "inner_lr": 0.01}``,
    :func:`with_hypers`; default: the config's), so the seeds of a configuration and the
    points of a sweep train together.

    Keys, initial states and selection are those of :meth:`run_seed`, so each lane's
    result matches a sequential run up to floating-point reassociation. Lanes of one seed
    (the points of a sweep, or rows, at that seed) share their key and step counter,
    kept out of the ``vmap``, and run by length as :meth:`run_seed` does; where their
    batches do not depend on p (the uniform sampler) they share those too, and the parts'
    ``lax.switch`` runs one branch (with an index that differs per lane it runs all).
    Lanes of several seeds run on whole batches. The end of an
    epoch (validation, FAST's epoch-mode p, logging as ``log(lane, record)``) runs per
    lane on the host. No mid-run checkpoints. ``predictions(lane, columns)`` receives
    each finished lane's test rows (:meth:`test_report`).

    Returns:
      per lane, its test report, or the :class:`Diverged` error that stopped it (its
      state keeps computing with the others but is no longer logged or selected).
    """
    one_seed = len(set(seeds)) == 1
    m = self.method if one_seed else self.lanes_method
    if not m.lanes:
      raise UsageError(f"--method {self.cfg.method} keeps its hyperparameters out of its "
                       f"train state: it has no vectorised seeds or sweeps")
    hypers = hypers or [{}] * len(seeds)
    if len(hypers) != len(seeds):
      raise ValueError(f"{len(seeds)} seeds but {len(hypers)} hyperparameter sets")
    k_init, k_train = zip(*(jax.random.split(jax.random.key(s)) for s in seeds))
    states = _stack([with_hypers(m.init(k), h) for k, h in zip(k_init, hypers)])
    if one_seed not in self._lanes_epochs:  # compiled once, for every seed's lanes
      self._lanes_epochs[one_seed] = _lanes_epoch(m, shared_key=one_seed)
    epoch_fn = self._lanes_epochs[one_seed]
    best: list[tuple[float, Any, int]] = [(np.inf, _index(states, i), 0)
                                          for i in range(len(seeds))]
    failed: dict[int, Diverged] = {}
    for epoch in tqdm(range(1, self.cfg.epochs + 1), desc=f"{len(seeds)} lanes",
                      disable=not progress, leave=False):
      t0 = time.perf_counter()
      keys = (jax.random.fold_in(k_train[0], epoch) if one_seed
              else jnp.stack([jax.random.fold_in(k, epoch) for k in k_train]))
      states, steps = epoch_fn(states, m.splits["fit"], keys)
      steps = jax.device_get(steps)
      changed = {}
      for i, seed in enumerate(seeds):
        if i in failed:
          continue
        state = _index(states, i)
        try:
          new, record = self.end_of_epoch(m, seed, epoch, state, _index(steps, i), t0)
        except Diverged as e:
          failed[i] = e
          continue
        if new is not state:  # the method's end of epoch moved it (FAST's epoch-mode p)
          changed[i] = (state, new)
        if record["valid"]["mae"] < best[i][0]:
          best[i] = (record["valid"]["mae"], new, epoch)
        log(i, record)
      if changed:  # write back only the lanes and leaves that changed
        states = _set_lanes(states, changed)
    epochs = self.cfg.epochs

    def report(i: int) -> dict:
      state, selected = ((best[i][1], best[i][2]) if m.select == "best-valid"
                         else (_index(states, i), epochs))
      return self.test_report(
          state, selected_epoch=selected, epochs_run=epochs,
          predictions=None if predictions is None else lambda rows: predictions(i, rows))
    return [failed[i] if i in failed else report(i) for i in range(len(seeds))]


def _lanes_epoch(m: Method, *, shared_key: bool) -> Callable:
  """``epoch(stacked states, data, keys) -> (stacked states, per-lane step metrics)``:
  ``m.epoch`` vmapped over the lanes; with ``shared_key`` one key (not stacked) and the
  step counter, the same in every lane, kept out of the vmap (:meth:`Runner.run_lanes`)."""
  if not shared_key:
    return jax.jit(jax.vmap(m.epoch, in_axes=(0, None, 0)))

  def epoch(states, data, key):
    axes = jax.tree.map(lambda _: 0, states).replace(step=None)
    run = jax.vmap(m.epoch, in_axes=(axes, None, None), out_axes=(axes, 0))
    out, steps = run(states.replace(step=states.step[0]), data, key)
    return out.replace(step=jnp.broadcast_to(out.step, states.step.shape)), steps
  return jax.jit(epoch)


def with_hypers(state, hypers: dict):
  """``state`` with a lane's hyperparameters: ``inner_lr`` sets the (initial) inner
  learning rate alpha, every other key its entry of ``state.hyper`` (float32 scalars)."""
  hypers = dict(hypers)
  if "inner_lr" in hypers:
    rate = hypers.pop("inner_lr")
    state = state.replace(alpha=jax.tree.map(lambda a: jnp.full_like(a, rate), state.alpha))
  return state.replace(hyper={**state.hyper, **{n: jnp.float32(v) for n, v in hypers.items()}})


def _set_lanes(stacked: Any, lanes: dict[int, tuple[Any, Any]]) -> Any:
  """``stacked`` with lane i set to ``lanes[i] = (old, new)``'s new state; only the leaves
  that are not the very objects of the old state (what an end of epoch replaced, e.g.
  FAST's p) are written, so the parameters are not restacked every epoch."""
  rows = sorted(lanes)
  old = {i: jax.tree.leaves(lanes[i][0]) for i in rows}
  new = {i: jax.tree.leaves(lanes[i][1]) for i in rows}
  leaves, treedef = jax.tree.flatten(stacked)
  out = []
  for k, leaf in enumerate(leaves):
    moved = [i for i in rows if new[i][k] is not old[i][k]]
    if moved:
      leaf = leaf.at[np.array(moved)].set(jnp.stack([new[i][k] for i in moved]))
    out.append(leaf)
  return jax.tree.unflatten(treedef, out)


def _stack(trees: list) -> Any:
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _index(tree: Any, i: int) -> Any:
  return jax.tree.map(lambda a: a[i], tree)
