"""FAST (Zhang et al., WWW 2024): meta-learning with adaptive group sampling.

One call of :func:`make_train_step`'s ``train_step`` is one outer iteration t of the
paper's Algorithm 1::

    theta_u = inner_adapt(theta, support of u)           for u in batch B  (vmap)
    l_u     = query loss of theta_u
    L_g     = mean of l_u over the users of group g                      (Eq. 6-7)
    p       = update_p(p, L_g)       step mode only: from this batch's L_g   (Eq. 9)
    w       = resample_weights(p)    B' of Alg. 1 as counts over the users of B
    theta   = Adam step on  sum_u w_u l_u / sum_u w_u + penalty

Two modes (docs/methods.md §1.2), side by side here:

* ``step`` (the paper): p moves inside every step from the batch's gap, and B' is the
  batch resampled with p (:func:`fast_jax.fairness.resample_weights`).
* ``epoch`` (the authors' code): each batch is drawn from per-group pools with p
  (:func:`fast_jax.fairness.group_pool_batches`), and p moves once per epoch from the
  MAE gap of all training users on their fixed last-10 query (:func:`epoch_p_update`).

Origin, Static, Reg and IPW are the same outer step with other pieces (an
:class:`Objective`): they live in their own modules and call :func:`meta_method`.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fast_jax import fairness, meta
from fast_jax.config import Config, UsageError
from fast_jax.methods import learner as learn
from fast_jax.methods.base import Context, Method, TrainState, present_mean, scan_epoch


class Objective(NamedTuple):
  """A group-aware method as pieces of the outer step.

  sampler: "uniform" (shuffle all users each epoch) or "group" (per-group pools drawn
    with p, the FAST code's sampler).
  p_rule: "none", "step" (update p from each batch, paper Alg. 1) or "epoch" (from all
    training users after each epoch, the FAST code).
  weights: ``weights(key, group[B], p[G]) -> float[B]`` outer weights of the batch users.
  penalty: ``penalty(terms: OuterTerms) -> scalar`` added to the loss.
  rows: the objectives of several methods that share the sampler
    (:mod:`fast_jax.methods.rows`): each lane's p, weights and penalty are those of
    ``rows[state.hyper["row"]]``; the fields above then describe the whole (the sampler,
    and "step" if any row moves p).
  """
  sampler: str
  p_rule: str
  weights: Callable
  penalty: Callable
  rows: tuple = ()


class OuterTerms(NamedTuple):
  """What an outer penalty sees: the B users of a batch after their adaptation."""
  mse: jax.Array      # float[B] query MSE per user
  mae: jax.Array      # float[B] query MAE per user
  group: jax.Array    # int[B]
  weights: jax.Array  # float[B] outer weights
  pred: jax.Array     # float[B, Q] adapted query predictions
  y: jax.Array        # float[B, Q] query ratings
  x: jax.Array        # int[B, Q, F] query inputs
  hyper: dict         # the lane's hyperparameters (``state.hyper``: Reg's ``reg_weight``)


def uniform_weights(key, group, p):
  return jnp.ones(group.shape[0])


def no_penalty(terms: OuterTerms):
  return jnp.zeros(())


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  return jnp.sum(weights * values) / jnp.maximum(jnp.sum(weights), 1e-12)


def resampled(ctx: Context) -> Callable:
  """B' as weights over the batch's users: sampled counts (``--resample sample``) or
  their expectation (``expected``, docs/methods.md §1.4)."""
  g = ctx.num_groups
  if ctx.cfg.resample == "sample":
    return lambda key, group, p: fairness.resample_weights(key, group, p, g)
  return lambda key, group, p: fairness.expected_weights(group, p, g)


def steps_per_epoch(ctx: Context) -> int:
  return ctx.data.train.x.shape[0] // ctx.cfg.batch_size


def objective(ctx: Context) -> Objective:
  """FAST's objective in ``cfg.p_update`` mode (module docstring)."""
  if ctx.cfg.p_update == "epoch":  # the code's sampler draws the batch from p directly
    return Objective("group", "epoch", uniform_weights, no_penalty)
  return Objective("uniform", "step", resampled(ctx), no_penalty)


def make_train_step(lrn: learn.Learner, obj: Objective, rate: learn.InnerRate, tx, *,
                    ctx: Context, run: Callable = meta.whole_batch) -> Callable:
  """``train_step(state, batch, key) -> (state, metrics)``: one outer iteration.

  batch: {"x": int32[B, L, F], "y": float32[B, L], "length": int32[B], "group": int32[B]}.
  run: the batch runner (:func:`fast_jax.methods.learner.batch_runner`).
  """
  cfg, num_groups, max_len = ctx.cfg, ctx.num_groups, ctx.max_len
  gap_index = 1 if cfg.gap_loss == "mae" else 0

  def train_step(state: TrainState, batch: dict, key: jax.Array):
    key = jax.random.fold_in(key, state.step)
    k_split, k_weights, k_split2 = jax.random.split(key, 3)
    support, query = meta.query_split(k_split, batch["length"], max_len, cfg.train_query)
    y_q = meta.take_rows(batch["y"], query)
    # The rows as the inner loop sees them (query first), laid out once for the parts'
    # choice and the prediction.
    laid = learn.lay_out(batch["x"], batch["y"], support, query, learn.QUERY_FIRST)
    if cfg.gap_users == "valid":  # the gap of held-out users (--gap-users valid)
      held_loss, held_group = held_out_losses(lrn, state, batch["held_out"],
                                              jax.random.fold_in(key, 7), batch["y"].shape[0],
                                              max_len)

    def loss_fn(params, run):
      # Inner loop: every user of B adapted on its support set, scored on its query.
      pred = learn.predict(lrn, params, state.alpha, *laid, batch["group"], run=run,
                           query_first=learn.QUERY_FIRST, laid_out=True)
      mse, mae = learn.query_errors(pred, y_q)
      # Group losses (Eq. 6-7) and, in step mode, the p update (Eq. 9).
      if cfg.gap_users == "valid":
        gap_values, gap_group = held_loss[gap_index], held_group
      else:
        gap_values, gap_group = jax.lax.stop_gradient((mse, mae)[gap_index]), batch["group"]
      group_loss, present = fairness.group_means(gap_values, gap_group, num_groups)
      x_q = meta.take_rows(batch["x"], query)

      def outer(o: Objective):  # p, B' as weights over the batch's users, the penalty
        p = state.p
        if o.p_rule == "step" and cfg.p_average:  # a decaying cap
          p = fairness.update_p_decaying(p, group_loss, present, state.hyper["gamma"],
                                         state.hyper["tau"], state.step, steps_per_epoch(ctx))
        elif o.p_rule == "step":
          p = fairness.update_p(p, group_loss, present, state.hyper["gamma"],
                                state.hyper["tau"])
        w = o.weights(k_weights, batch["group"], p)
        terms = OuterTerms(mse=mse, mae=mae, group=batch["group"], weights=w, pred=pred,
                           y=y_q, x=x_q, hyper=state.hyper)
        return p, w, o.penalty(terms)
      if obj.rows:  # this lane's row: every row's terms, one taken (they are small)
        row = state.hyper["row"].astype(jnp.int32)
        p, w, penalty = jax.tree.map(lambda *a: jnp.stack(a)[row], *map(outer, obj.rows))
      else:
        p, w, penalty = outer(obj)
      loss = weighted_mean(mse, w) + penalty
      return loss, (p, w, mse, group_loss, present)

    # Outer step (by length: the parts chosen outside the gradient, learn.switch_parts).
    (loss, (p, w, mse, group_loss, present)), grads = learn.switch_parts(
        run, lambda run: jax.value_and_grad(functools.partial(loss_fn, run=run), has_aux=True)(
            state.params), laid.support, laid.query_idx)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    # MetaCS (the FAST code): a second pass on the same batch with a fresh split and the
    # updated theta, whose gradient moves only the inner learning rate.
    support2, query2 = meta.query_split(k_split2, batch["length"], max_len, cfg.train_query)
    laid2 = learn.lay_out(batch["x"], batch["y"], support2, query2, learn.QUERY_FIRST)

    def alpha_loss(a, run):
      pred2 = learn.predict(lrn, params, a, *laid2, batch["group"], run=run,
                            query_first=learn.QUERY_FIRST, laid_out=True)
      mse2, _ = learn.query_errors(pred2, meta.take_rows(batch["y"], query2))
      return weighted_mean(mse2, w)
    alpha, alpha_opt_state = learn.learn_rate_by_parts(
        rate, state.alpha, state.alpha_opt_state, alpha_loss, run, laid2.support,
        laid2.query_idx)

    new_state = state.replace(params=params, opt_state=opt_state, alpha=alpha,
                              alpha_opt_state=alpha_opt_state, p=p, step=state.step + 1)
    out = {"loss": jnp.mean(mse), "outer_loss": loss, "p": p, "group_loss": group_loss,
           "group_present": present}
    return new_state, out

  return train_step


def held_out_losses(lrn: learn.Learner, state: TrainState, split: dict, key: jax.Array,
                    size: int, max_len: int) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
  """``--gap-users valid`` in step mode: ``size`` held-out users drawn without
  replacement from ``split`` (all of them if fewer), adapted on their support and scored
  on their fixed last-10 query (the evaluation protocol), with the step's meta-parameters
  (called outside the differentiated loss: no gradient flows through it). Returns
  ((mse float[size], mae float[size]), group int[size])."""
  n = split["group"].shape[0]
  idx = jax.random.choice(key, n, (min(size, n),), replace=False)
  users = jax.tree.map(lambda a: a[idx], split)
  support, query = meta.last_query_split(users["length"], max_len)
  pred = learn.predict(lrn, state.params, state.alpha, users["x"], users["y"], support,
                       query, users["group"])
  return learn.query_errors(pred, meta.take_rows(users["y"], query)), users["group"]


def batches(obj: Objective, ctx: Context) -> Callable:
  """``batches(state, data, key) -> int32[steps, B]``: the objective's sampler."""
  num_users, b = ctx.data.train.x.shape[0], ctx.cfg.batch_size
  if obj.sampler == "group":
    return lambda state, data, key: fairness.group_pool_batches(key, data["group"], state.p,
                                                                ctx.num_groups, b)
  return lambda state, data, key: fairness.uniform_batches(key, num_users, b)


def epoch_p_update(ctx: Context) -> Callable:
  """The FAST code's per-epoch p update as an ``end_of_epoch``: the group gap of
  ``cfg.gap_loss`` (MAE by default) over all training users (``--gap-users valid``: all
  validation users) on their fixed last-10 query, then Eq. 9 (with ``--p-average``, its
  cap decays as in step mode)."""
  update = jax.jit(fairness.update_p)
  users = "valid" if ctx.cfg.gap_users == "valid" else "train"
  users_group = ctx.splits[users]["group"]

  def end_of_epoch(state: TrainState, evaluate: Callable):
    per_user = evaluate(state, users)
    group_loss, present = fairness.group_means(jnp.asarray(per_user[ctx.cfg.gap_loss]),
                                               users_group, ctx.num_groups)
    tau = state.hyper["tau"]
    if ctx.cfg.p_average:  # the cap of fairness.update_p_decaying after this epoch's steps
      tau = tau / (1.0 + state.step / steps_per_epoch(ctx))
    p = update(state.p, group_loss, present, state.hyper["gamma"], tau)
    return state.replace(p=p), {"group_loss": np.asarray(group_loss).tolist()}
  return end_of_epoch


def alpha_summary(alpha) -> float:
  return float(np.mean([np.mean(np.asarray(a)) for a in jax.tree.leaves(alpha)]))


def meta_record(state: TrainState, steps: dict) -> dict:
  """The meta-learners' epoch record: train loss, p, group losses, mean alpha."""
  return {"train_loss": float(np.mean(steps["loss"])), "p": np.asarray(state.p).tolist(),
          "group_loss": present_mean(steps["group_loss"], steps["group_present"]).tolist(),
          "alpha": alpha_summary(state.alpha)}


def init_state(ctx: Context, backbone, labels, rate: learn.InnerRate, tx, key) -> TrainState:
  """A meta-learner's initial state: theta, Adam, alpha, p uniform, and the lane's
  hyperparameters (FAST's gamma and tau, Reg's weight)."""
  cfg = ctx.cfg
  params = backbone.init(key, ctx.splits["train"]["x"][0])
  alpha = rate.init(params, labels)
  return TrainState(params=params, opt_state=tx.init(params), alpha=alpha,
                    alpha_opt_state=rate.tx.init(alpha) if rate.tx is not None else (),
                    p=jnp.full((ctx.num_groups,), 1.0 / ctx.num_groups, jnp.float32),
                    step=jnp.zeros((), jnp.int32),
                    hyper={"gamma": jnp.float32(cfg.gamma), "tau": jnp.float32(cfg.tau),
                           "reg_weight": jnp.float32(cfg.reg_weight)})


# The meta-learning settings with a fixed set of values (the command line offers only
# these; a Config built in Python is checked here).
CHOICES = {"p_update": ("step", "epoch"), "gap_loss": ("mse", "mae"),
           "gap_users": ("train", "valid"),
           "resample": ("sample", "expected"), "train_query": ("random", "last"),
           "select": ("last", "best-valid"), "alpha_mode": ("scalar", "per-param")}


def check_config(cfg: Config) -> None:
  """Reject a meta-learning setting outside :data:`CHOICES`, naming the flag."""
  for name, allowed in CHOICES.items():
    if getattr(cfg, name) not in allowed:
      raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: expected one of "
                       f"{', '.join(allowed)}")


def meta_method(ctx: Context, obj: Objective, *, by_length: bool = True,
                network: Callable = learn.network) -> Method:
  """The Method of a meta-learner whose fairness is the Objective ``obj``, on the
  backbone ``network(ctx) -> (Backbone, labels)`` (default the configured MeLU/MetaCS)."""
  cfg = ctx.cfg
  check_config(cfg)
  backbone, labels = network(ctx)
  lrn = learn.maml(backbone, labels, steps=cfg.inner_steps, first_order=cfg.first_order)
  rate, tx = learn.inner_rate(cfg), optax.adam(cfg.lr)
  step = make_train_step(lrn, obj, rate, tx, ctx=ctx,
                         run=learn.batch_runner(ctx, by_length=by_length))
  return Method(
      init=lambda key: init_state(ctx, backbone, labels, rate, tx, key),
      epoch=scan_epoch(step, batches(obj, ctx), mesh=ctx.mesh),
      predict=lambda s, x, y, support, q, group: learn.predict(lrn, s.params, s.alpha, x, y,
                                                               support, q, group),
      predict_unadapted=lambda s, x, y, support, q, group: learn.predict(
          lrn, s.params, s.alpha, x, y, support, q, group, adapt=False),
      represent=lambda s, x, y, support, valid, group: learn.represent(
          lrn, s.params, s.alpha, x, y, support, valid, group),
      record=meta_record, splits={**ctx.splits, "fit": fit_split(ctx, obj)},
      end_of_epoch=epoch_p_update(ctx) if obj.p_rule == "epoch" else (
          lambda state, evaluate: (state, {})),
      select=cfg.select, lanes=True)


def fit_split(ctx: Context, obj: Objective) -> dict:
  """What the epoch trains on: the training users, plus the validation users whole
  (``held_out``) when the step-mode gap comes from them (``--gap-users valid``)."""
  if obj.p_rule == "step" and ctx.cfg.gap_users == "valid":
    return {**ctx.splits["train"], "held_out": ctx.splits["valid"]}
  return ctx.splits["train"]


def make(ctx: Context, *, by_length: bool = True) -> Method:
  """``--method fast``: :func:`objective` in ``cfg.p_update`` mode."""
  return meta_method(ctx, objective(ctx), by_length=by_length)
