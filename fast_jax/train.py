"""Meta-training with FAST and the group-aware outer objectives; evaluation.

The outer loop reads like the paper's Algorithm 1 (one call of :func:`make_train_step`'s
``train_step`` = one outer iteration t)::

    theta_u   = inner_adapt(theta, support of u)                for u in batch (vmap)
    l_u       = query loss of theta_u
    L_g       = group_means(l_u)                                  (Eq. 6)
    p         = update_p(p, L_g)                                  (Eq. 7, 9)  [FAST, step mode]
    w         = resample_weights(p)                               (B' of Alg. 1 as counts)
    theta     = Adam step on  sum_u w_u l_u / sum_u w_u + penalty

A fairness method is an :class:`Objective`: how batches are drawn, how the users of a
batch are weighted, an optional penalty, and whether/when p moves. Backbones and
objectives combine freely.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from fast_jax import attack, fairness, meta, metrics, sharding
from fast_jax.checkpoint import SeedCheckpoint
from fast_jax.config import Config, resolve
from fast_jax.models import Backbone, make_backbone, split_params

Params = Any


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree."""
  params: Params
  opt_state: Any
  alpha: Any              # inner learning rate (fixed for MeLU, learned for MetaCS)
  alpha_opt_state: Any    # () when alpha is not learned
  p: jax.Array            # float[G] FAST sampling probabilities
  step: jax.Array         # int32 outer step counter
  gamma: jax.Array        # float32 FAST rate and cap of one p update (Eq. 9). In the state,
  tau: jax.Array          # not the config, so that a sweep over them vmaps like seeds do.
  extra: Any = ()         # method-specific state (e.g. adversaries)


class Objective(NamedTuple):
  """A fairness method as pieces of the outer loop.

  sampler: "uniform" (shuffle all users each epoch) or "group" (per-group pools drawn
    with p, the FAST code's sampler).
  p_rule: "none", "step" (update p from each batch, paper Alg. 1) or "epoch" (from all
    training users after each epoch, the FAST code).
  weights: ``weights(key, group[B], p[G]) -> float[B]`` outer weights of the batch users.
  penalty: ``penalty(terms: OuterTerms) -> scalar`` added to the loss.
  """
  sampler: str
  p_rule: str
  weights: Callable
  penalty: Callable


class OuterTerms(NamedTuple):
  """What an outer penalty sees: the B users of a batch after their adaptation."""
  mse: jax.Array      # float[B] query MSE per user
  mae: jax.Array      # float[B] query MAE per user
  group: jax.Array    # int[B]
  weights: jax.Array  # float[B] outer weights
  pred: jax.Array     # float[B, Q] adapted query predictions
  y: jax.Array        # float[B, Q] query ratings
  x: jax.Array        # int[B, Q, F] query inputs


def _uniform(key, group, p):
  return jnp.ones(group.shape[0])


def _no_penalty(terms: OuterTerms):
  return jnp.zeros(())


def make_objective(cfg: Config, num_groups: int, group_shares: np.ndarray, *,
                   item_columns: tuple[int, ...] = ()) -> Objective:
  """The Objective of ``cfg.method`` (origin, static, fast, reg, ipw; clover's batching).

  Reg (fast.md §5.3): ``mean_u l_u + lambda * pen`` with ``pen`` the spread of the group
  means of the query MSE (``reg_kind="loss"``; differentiable through the inner step, 0
  when a group is missing from the batch) or Yao & Huang's value unfairness over the
  batch's query rows (``reg_kind="value"``, items identified by ``item_columns``).
  IPW (fast.md §5.4): weights ``1 / pi_g`` self-normalised in the batch.
  """
  resample = fairness.resample_weights if cfg.resample == "sample" else (
      lambda key, group, p, g: fairness.expected_weights(group, p, g))

  def by_p(key, group, p):
    return resample(key, group, p, num_groups)

  if cfg.method in ("origin", "clover"):  # CLOVER's adversaries live in fast_jax.clover
    return Objective("uniform", "none", _uniform, _no_penalty)
  if cfg.method in ("static", "fast"):
    rule = "none" if cfg.method == "static" else cfg.p_update
    if cfg.p_update == "epoch":  # the code's sampler draws the batch from p directly
      return Objective("group", rule, _uniform, _no_penalty)
    return Objective("uniform", rule, by_p, _no_penalty)
  if cfg.method == "ipw":
    shares = jnp.asarray(group_shares, jnp.float32)
    return Objective("uniform", "none", lambda k, g, p: fairness.ipw_weights(g, shares),
                     _no_penalty)
  if cfg.method == "reg":
    lam = cfg.reg_weight
    if cfg.reg_kind == "loss":
      def reg(t: OuterTerms):
        return lam * fairness.gap_penalty(t.mse, t.group, num_groups, t.weights)
    elif cfg.reg_kind == "value":
      if not item_columns:
        raise ValueError("reg_kind='value' needs the item columns of x")
      cols = jnp.asarray(item_columns)

      def reg(t: OuterTerms):
        return lam * fairness.value_unfairness(t.pred, t.y, t.x[..., cols], t.group, num_groups)
    else:
      raise ValueError(f"reg_kind {cfg.reg_kind!r}: expected 'loss' or 'value'")
    return Objective("uniform", "none", _uniform, reg)
  raise ValueError(f"method {cfg.method!r} has no meta-learning objective")


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  return jnp.sum(weights * values) / jnp.maximum(jnp.sum(weights), 1e-12)


class MetaLearner:
  """A backbone + inner-loop settings: adapt users and score their query sets."""

  def __init__(self, backbone: Backbone, labels: Params, *, inner_steps: int,
               first_order: bool):
    self.backbone, self.labels = backbone, labels
    self.inner_steps, self.first_order = inner_steps, first_order

  def predict(self, params, alpha, x, y, support, query_idx, group=None, *, budgets=()):
    """Adapted query predictions. x: int32[B, L, F]; y, support: [B, L];
    query_idx: int32[B, Q]; group: int32[B] (unused here; a learner whose adaptation
    involves the sensitive attribute, such as CLOVER's, reads it) -> float32[B, Q].

    Embeddings are global, so they are looked up once, outside the inner loop; only the
    head runs inside each user's adaptation. ``budgets`` (:func:`meta.row_budgets`) runs
    the batch by length (:func:`meta.by_rows`).
    """
    def run(support, query_idx, x, y):
      e = self.backbone.embed(params, x)
      return meta.adapted_query_predictions(self.backbone.head, params, self.labels, alpha,
                                            e, y, support, query_idx, steps=self.inner_steps,
                                            first_order=self.first_order)
    return meta.by_rows(run, budgets, support, query_idx, x, y)

  def query_losses(self, params, alpha, batch, support, query_idx, *, budgets=()):
    """Per-user query MSE and MAE after adaptation: (float[B], float[B])."""
    pred = self.predict(params, alpha, batch["x"], batch["y"], support, query_idx,
                        budgets=budgets)
    return query_errors(pred, meta.take_rows(batch["y"], query_idx))

  def user_representations(self, params, alpha, x, y, support, valid, group=None):
    """Each user's adapted user representation: the mean over its valid rows of the
    user-tower output (``user_fc``) after its inner adaptation on ``support``.

    x: int32[B, L, F]; y: float32[B, L]; support, valid: bool[B, L] -> float32[B, D],
    or None when the backbone has no user representation (no user fields).
    """
    e = self.backbone.embed(params, x)

    def one_user(e_u, y_u, s_u, v_u):
      theta_u = meta.inner_adapt(self.backbone.head, params, self.labels, alpha, e_u, y_u, s_u,
                                 steps=self.inner_steps, first_order=self.first_order)
      h = self.backbone.user_repr(theta_u, e_u)
      return None if h is None else metrics.masked_mean(h, v_u[:, None], axis=0)
    return jax.vmap(one_user)(e, y, support, valid)


def query_errors(pred: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-user MSE and MAE of query predictions. pred, y: float[B, Q] -> (float[B], float[B])."""
  err = pred - y
  return jnp.mean(jnp.square(err), -1), jnp.mean(jnp.abs(err), -1)


def make_train_step(learner: MetaLearner, objective: Objective, tx, alpha_tx, *,
                    cfg: Config, num_groups: int, max_len: int,
                    budgets: tuple[int, ...] = ()) -> Callable:
  """``train_step(state, batch, key) -> (state, metrics)``: one outer iteration.

  batch: {"x": int32[B, L, F], "y": float32[B, L], "length": int32[B], "group": int32[B]}.
  budgets: row budgets of the batch's length-sorted parts (:func:`meta.row_budgets`).
  """
  gap_index = 1 if cfg.gap_loss == "mae" else 0

  def train_step(state: TrainState, batch: dict, key: jax.Array):
    key = jax.random.fold_in(key, state.step)
    k_split, k_weights, k_split2 = jax.random.split(key, 3)
    support, query = meta.query_split(k_split, batch["length"], max_len, cfg.train_query)

    def loss_fn(params):
      pred = learner.predict(params, state.alpha, batch["x"], batch["y"], support, query,
                             budgets=budgets)
      y_q = meta.take_rows(batch["y"], query)
      mse, mae = query_errors(pred, y_q)
      gap_values = jax.lax.stop_gradient((mse, mae)[gap_index])
      group_loss, present = fairness.group_means(gap_values, batch["group"], num_groups)
      p = state.p
      if objective.p_rule == "step":
        p = fairness.update_p(p, group_loss, present, state.gamma, state.tau)
      w = objective.weights(k_weights, batch["group"], p)
      terms = OuterTerms(mse=mse, mae=mae, group=batch["group"], weights=w, pred=pred, y=y_q,
                         x=meta.take_rows(batch["x"], query))
      loss = weighted_mean(mse, w) + objective.penalty(terms)
      return loss, (p, w, mse, group_loss, present)

    (loss, (p, w, mse, group_loss, present)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    alpha, alpha_opt_state = state.alpha, state.alpha_opt_state
    if alpha_tx is not None:
      # MetaCS (the FAST code): a second pass on the same batch with a fresh split and the
      # updated theta, whose gradient moves only the inner learning rate.
      support2, query2 = meta.query_split(k_split2, batch["length"], max_len, cfg.train_query)

      def alpha_loss(a):
        mse2, _ = learner.query_losses(params, a, batch, support2, query2, budgets=budgets)
        return weighted_mean(mse2, w)
      alpha_grads = jax.grad(alpha_loss)(alpha)
      alpha_updates, alpha_opt_state = alpha_tx.update(alpha_grads, alpha_opt_state, alpha)
      alpha = optax.apply_updates(alpha, alpha_updates)

    new_state = state.replace(params=params, opt_state=opt_state, alpha=alpha,
                              alpha_opt_state=alpha_opt_state, p=p, step=state.step + 1)
    out = {"loss": jnp.mean(mse), "outer_loss": loss, "p": p, "group_loss": group_loss,
           "group_present": present}
    return new_state, out

  return train_step


def device_split(split) -> dict:
  """The arrays of a split as device arrays (what the jitted functions index)."""
  return {"x": jnp.asarray(split.x), "y": jnp.asarray(split.y),
          "length": jnp.asarray(split.length), "group": jnp.asarray(split.group)}


def make_train_epoch(train_step: Callable, objective: Objective, *, num_users: int,
                     num_groups: int, batch_size: int, mesh=None) -> Callable:
  """``train_epoch(state, data, key) -> (state, per-step metrics)``, one jitted scan.

  With a ``mesh`` (:mod:`fast_jax.sharding`) each batch's users are split across its
  devices.
  """

  def train_epoch(state: TrainState, data: dict, key: jax.Array):
    k_batches, k_steps = jax.random.split(key)
    if objective.sampler == "group":
      batches = fairness.group_pool_batches(k_batches, data["group"], state.p, num_groups,
                                            batch_size)
    else:
      batches = fairness.uniform_batches(k_batches, num_users, batch_size)

    def body(state, idx):
      batch = sharding.split_users(jax.tree.map(lambda a: a[idx], data), mesh)
      return train_step(state, batch, k_steps)
    return jax.lax.scan(body, state, batches)

  return jax.jit(train_epoch)


class Evaluator:
  """Adapt-and-score on the fixed last-10 query, in fixed-size chunks (one compilation)."""

  def __init__(self, learner: MetaLearner, *, max_len: int, chunk: int):
    self.max_len, self.chunk = max_len, chunk

    @jax.jit
    def score(params, alpha, x, y, length, group):
      support, query_idx = meta.last_query_split(length, max_len)
      pred = learner.predict(params, alpha, x, y, support, query_idx, group)
      return metrics.user_metrics(pred, meta.take_rows(y, query_idx))
    self._score = score

  def per_user(self, params, alpha, data: dict) -> dict[str, np.ndarray]:
    """Per-user MAE, MSE, NDCG@3 of every user of a split (host arrays, float[U])."""
    n = data["x"].shape[0]
    chunk = min(self.chunk, n)
    outs = []
    for start in range(0, n, chunk):
      idx = np.minimum(np.arange(start, start + chunk), n - 1)  # pad the last chunk
      part = self._score(params, alpha, data["x"][idx], data["y"][idx], data["length"][idx],
                         data["group"][idx])
      outs.append({k: np.asarray(v)[: min(chunk, n - start)] for k, v in part.items()})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


@dataclasses.dataclass
class Trainer:
  """Meta-training of one configuration on one prepared dataset."""
  cfg: Config
  data: Any  # fast_jax.dataset.TaskData

  def __post_init__(self):
    self.cfg = resolve(self.cfg, self.data.meta.get("dataset"))
    cfg, data = self.cfg, self.data
    self.num_groups = len(data.meta["sensitive"]["groups"])
    self.max_len = int(data.train.x.shape[1])
    train_group = np.asarray(data.train.group)
    self.group_shares = np.bincount(train_group, minlength=self.num_groups) / len(train_group)
    self.backbone = self.build_backbone()
    self.objective = self.build_objective()
    self.tx = optax.adam(cfg.lr)
    self.alpha_tx = optax.adam(cfg.lr) if cfg.backbone == "metacs" else None
    self.mesh = sharding.data_mesh(cfg.batch_size) if cfg.data_parallel else None
    self.train_data = sharding.replicate(device_split(data.train), self.mesh)
    self.valid_data = sharding.replicate(device_split(data.valid), self.mesh)
    self.test_data = sharding.replicate(device_split(data.test), self.mesh)
    params = jax.eval_shape(self.backbone.init, jax.random.key(0), self.train_data["x"][0])
    self.labels = self.backbone.labels(params)
    # Run each batch by length (meta.by_rows) unless its users are split across devices.
    self.budgets = () if self.mesh is not None else meta.row_budgets(
        data.train.length, cfg.batch_size, self.max_len, parts=self.length_parts(),
        max_short=self.max_short_rows)
    self.learner = self.build_learner()
    self.train_step = self.build_step()
    self.train_epoch = self.build_epoch(self.train_step)
    self.evaluator = Evaluator(self.learner, max_len=self.max_len, chunk=cfg.eval_chunk)
    self.attacker = attack.RepresentationAttack(self.learner, max_len=self.max_len,
                                                chunk=cfg.eval_chunk)
    self._update_p = jax.jit(fairness.update_p)

  # Extension points: a method that needs more than an Objective (e.g. CLOVER's
  # adversaries) subclasses Trainer and overrides these, keeping the epoch loop,
  # evaluation, logging and selection.
  def build_backbone(self) -> Backbone:
    cfg, data = self.cfg, self.data
    out_bias = float(np.sum(data.train.y) / np.sum(data.train.length)) if (
        cfg.out_bias == "mean") else None
    return make_backbone(data.meta, local_output=cfg.local_output,
                         drop_sensitive=cfg.drop_sensitive, torch_init=cfg.init == "torch",
                         out_bias=out_bias)

  def build_objective(self) -> Objective:
    item_columns = tuple(c for f in self.data.meta["fields"] if f["side"] == "item"
                         for c in range(f["start"], f["stop"]))
    return make_objective(self.cfg, self.num_groups, self.group_shares,
                          item_columns=item_columns)

  def build_learner(self) -> MetaLearner:
    return MetaLearner(self.backbone, self.labels, inner_steps=self.cfg.inner_steps,
                       first_order=self.cfg.first_order)

  # Batches run by length only if their shorter part needs at most this share of the rows.
  max_short_rows = 0.75

  def length_parts(self) -> int:
    """Parts of a batch run by length: ``cfg.length_parts``, or by default 2 on runs of
    at least 500 training steps, where the time saved (x1.02-1.38 per epoch idle, x1.2-1.3
    with two jobs sharing a 2-core CPU; EXPERIMENTS.md) outweighs the longer compilation
    (4-5 s more on that CPU, idle), and 1 on shorter runs."""
    if self.cfg.length_parts is not None:
      return self.cfg.length_parts
    steps = self.cfg.epochs * (self.data.train.x.shape[0] // self.cfg.batch_size)
    return 2 if steps >= 500 else 1

  def build_step(self, budgets: tuple[int, ...] | None = None) -> Callable:
    """The train step; ``budgets`` overrides the row budgets (() runs whole batches)."""
    return make_train_step(self.learner, self.objective, self.tx, self.alpha_tx, cfg=self.cfg,
                           num_groups=self.num_groups, max_len=self.max_len,
                           budgets=self.budgets if budgets is None else budgets)

  def build_epoch(self, train_step: Callable) -> Callable:
    return make_train_epoch(train_step, self.objective, num_users=self.data.train.x.shape[0],
                            num_groups=self.num_groups, batch_size=self.cfg.batch_size,
                            mesh=self.mesh)

  def learner_params(self, state: TrainState) -> Params:
    """The ``params`` argument of the learner's predict (CLOVER adds its adversaries)."""
    return state.params

  def test_report(self, state: TrainState) -> dict:
    """What a finished seed reports (``results.json`` per seed): the test metrics and
    the attacker AUC on the adapted user representations (clover.md §4.4)."""
    report = self.evaluate(state, "test")
    if not self.cfg.attack:
      return {**report, "auc_attack": None, "auc_attack_note": "attacker disabled (--no-attack)"}
    report.update(self.attacker.report(self.learner_params(state), state.alpha,
                                       self.train_data, self.test_data))
    return report

  def init_state(self, key: jax.Array) -> TrainState:
    params = self.backbone.init(key, self.train_data["x"][0])
    if self.cfg.backbone == "metacs" and self.cfg.alpha_mode == "per-param":
      local, _ = split_params(params, self.labels)
      alpha = jax.tree.map(lambda v: jnp.full_like(v, self.cfg.inner_lr), local)
    else:
      alpha = jnp.asarray(self.cfg.inner_lr, jnp.float32)
    alpha_opt_state = self.alpha_tx.init(alpha) if self.alpha_tx is not None else ()
    return TrainState(params=params, opt_state=self.tx.init(params), alpha=alpha,
                      alpha_opt_state=alpha_opt_state,
                      p=jnp.full((self.num_groups,), 1.0 / self.num_groups, jnp.float32),
                      step=jnp.zeros((), jnp.int32), gamma=jnp.float32(self.cfg.gamma),
                      tau=jnp.float32(self.cfg.tau))

  def evaluate(self, state: TrainState, split: str) -> dict:
    data = {"train": self.train_data, "valid": self.valid_data, "test": self.test_data}[split]
    per_user = self.evaluator.per_user(self.learner_params(state), state.alpha, data)
    return metrics.group_report(per_user, np.asarray(data["group"]), self.num_groups)

  def epoch_gap_update(self, state: TrainState) -> tuple[TrainState, np.ndarray]:
    """The FAST code's per-epoch p update: the group gap on all training users (fixed
    last-10 query, ``cfg.gap_loss`` per user, MAE by default)."""
    per_user = self.evaluator.per_user(self.learner_params(state), state.alpha, self.train_data)
    values = jnp.asarray(per_user[self.cfg.gap_loss])
    group_loss, present = fairness.group_means(values, self.train_data["group"],
                                               self.num_groups)
    p = self._update_p(state.p, group_loss, present, state.gamma, state.tau)
    return state.replace(p=p), np.asarray(group_loss)

  def run_seed(self, seed: int, *, log: Callable[[dict], None] = lambda r: None,
               progress: bool = True, checkpoint: SeedCheckpoint | None = None,
               checkpoint_every: int = 5) -> tuple[TrainState, dict]:
    """Train one seed for ``cfg.epochs`` epochs; return the selected state and test report.

    With ``checkpoint``, the seed continues from its last checkpoint if there is one, and
    a checkpoint is written every ``checkpoint_every`` epochs and after the last epoch.
    Epoch e always uses the key ``fold_in(key(seed), e)``, so a resumed seed ends exactly
    where an uninterrupted one would.

    Raises:
      Diverged: a non-finite training loss; names the epoch and step. The last good
        checkpoint is kept.
    """
    key = jax.random.key(seed)
    k_init, k_train = jax.random.split(key)
    state = sharding.replicate(self.init_state(k_init), self.mesh)
    best_score, best_state, start = np.inf, state, 1
    if checkpoint is not None and checkpoint.exists():
      saved = checkpoint.restore(state)
      state, best_state, best_score = saved["state"], saved["best_state"], saved["best_score"]
      start = saved["epoch"] + 1
      for record in saved["records"]:
        log(record)
      records = saved["records"]
    else:
      records = []
    bar = tqdm(range(start, self.cfg.epochs + 1), desc=f"seed {seed}", disable=not progress,
               leave=False)
    for epoch in bar:
      t0 = time.perf_counter()
      state, step_metrics = self.train_epoch(state, self.train_data,
                                             jax.random.fold_in(k_train, epoch))
      state, record = self.end_of_epoch(seed, epoch, state, jax.device_get(step_metrics), t0)
      if record["valid"]["mae"] < best_score:
        best_score, best_state = record["valid"]["mae"], state
      records.append(record)
      log(record)
      if checkpoint is not None and (epoch % checkpoint_every == 0 or epoch == self.cfg.epochs):
        checkpoint.save(state=state, best_state=best_state, best_score=best_score, epoch=epoch,
                        records=records)
      bar.set_postfix(p=np.round(record["p"], 3).tolist(),
                      L=np.round(record["group_loss"], 3).tolist(),
                      val_mae=round(record["valid"]["mae"], 4))
    if self.cfg.select == "best-valid":
      state = best_state
    return state, self.test_report(state)

  def end_of_epoch(self, seed: int, epoch: int, state: TrainState, step_metrics: dict,
                   t0: float) -> tuple[TrainState, dict]:
    """After an epoch's steps: check for divergence, the per-epoch p update (epoch mode),
    validation, and the epoch's ``metrics.jsonl`` record."""
    bad = np.flatnonzero(~np.isfinite(step_metrics["loss"]))
    if bad.size:
      raise Diverged(f"seed {seed}: the training loss became "
                     f"{step_metrics['loss'][bad[0]]} at epoch {epoch}, step {bad[0] + 1}; "
                     f"lower --lr or --inner-lr")
    group_loss = _present_mean(step_metrics["group_loss"], step_metrics["group_present"])
    if self.objective.p_rule == "epoch":
      state, group_loss = self.epoch_gap_update(state)
    valid = self.evaluate(state, "valid")
    record = {"seed": seed, "epoch": epoch, "train_loss": float(np.mean(step_metrics["loss"])),
              "p": np.asarray(state.p).tolist(), "group_loss": np.asarray(group_loss).tolist(),
              "alpha": _alpha_summary(state.alpha), "valid": valid,
              "seconds": time.perf_counter() - t0}
    return state, record

  def run_vmapped(self, seeds: list[int], *, hypers: list[tuple[float, float]] | None = None,
                  log: Callable[[int, dict], None] = lambda lane, r: None,
                  progress: bool = True) -> list[dict | Diverged]:
    """Train several lanes as one vectorised program: the epoch scan ``vmap``-ped over a
    stack of train states and their keys. Lane i is seed ``seeds[i]`` with FAST's
    ``(gamma, tau) = hypers[i]`` (default: the config's), so the seeds of a configuration
    and the points of a gamma/tau sweep train together.

    Keys, initial states and selection are those of :meth:`run_seed`, so each lane's
    result matches a sequential run up to floating-point reassociation. Validation, the
    epoch-mode p update and logging (``log(lane, record)``) run per lane on the host. No
    mid-run checkpoints.

    Returns:
      per lane, its test report, or the :class:`Diverged` error that stopped it (its
      state keeps computing with the others but is no longer logged or selected).
    """
    hypers = hypers or [(self.cfg.gamma, self.cfg.tau)] * len(seeds)
    if len(hypers) != len(seeds):
      raise ValueError(f"{len(seeds)} seeds but {len(hypers)} (gamma, tau) pairs")
    k_init, k_train = zip(*(jax.random.split(jax.random.key(s)) for s in seeds))
    states = _stack([self.init_state(k).replace(gamma=jnp.float32(g), tau=jnp.float32(t))
                     for k, (g, t) in zip(k_init, hypers)])
    # Whole batches: under vmap the by-length parts' lax.cond would run both branches.
    train_epoch = self.build_epoch(self.build_step(budgets=())) if self.budgets else (
        self.train_epoch)
    epoch_fn = jax.jit(jax.vmap(train_epoch, in_axes=(0, None, 0)))
    best: list[tuple[float, Any]] = [(np.inf, _index(states, i)) for i in range(len(seeds))]
    failed: dict[int, Diverged] = {}
    for epoch in tqdm(range(1, self.cfg.epochs + 1), desc=f"{len(seeds)} lanes",
                      disable=not progress, leave=False):
      t0 = time.perf_counter()
      keys = jnp.stack([jax.random.fold_in(k, epoch) for k in k_train])
      states, step_metrics = epoch_fn(states, self.train_data, keys)
      step_metrics = jax.device_get(step_metrics)
      new_p = []
      for i, seed in enumerate(seeds):
        state = _index(states, i)
        if i not in failed:
          try:
            state, record = self.end_of_epoch(seed, epoch, state, _index(step_metrics, i), t0)
          except Diverged as e:
            failed[i] = e
          else:
            if record["valid"]["mae"] < best[i][0]:
              best[i] = (record["valid"]["mae"], state)
            log(i, record)
        new_p.append(state.p)
      # end_of_epoch moves only p (epoch mode): restack p, not the whole train state.
      states = states.replace(p=jnp.stack(new_p))
    select = self.cfg.select == "best-valid"
    return [failed[i] if i in failed else
            self.test_report(best[i][1] if select else _index(states, i))
            for i in range(len(seeds))]


def _stack(trees: list) -> Any:
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _index(tree: Any, i: int) -> Any:
  return jax.tree.map(lambda a: a[i], tree)


class Diverged(FloatingPointError):
  """A seed's training loss became NaN or infinite."""


def _present_mean(values: np.ndarray, present: np.ndarray) -> np.ndarray:
  """Mean over steps of per-group batch losses, counting only steps where the group was."""
  return (values * present).sum(0) / np.maximum(present.sum(0), 1)


def _alpha_summary(alpha) -> float:
  leaves = jax.tree.leaves(alpha)
  return float(np.mean([np.mean(np.asarray(a)) for a in leaves]))
