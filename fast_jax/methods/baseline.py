"""What the cold-start baselines share (docs/methods.md §7).

Every baseline runs on the same prepared splits, query protocol and metrics as the
meta-learners: a test user's query is its fixed last 10 rows, the rows before them are
its support. The three networks (Wide&Deep, DropoutNet, NLBA) reuse
:class:`fast_jax.models.MeLU` (its ``embed`` and ``represent`` stages), are trained with
Adam (``cfg.baseline_lr``) for up to ``cfg.epochs`` epochs, stopped early after
``cfg.baseline_patience`` epochs without a lower validation MAE, and the epoch with the
lowest validation MAE is tested by default (``cfg.baseline_select``). Their output bias
starts at the training mean rating (the global-mean predictor). ``cfg.backbone`` plays no
role: every baseline uses the MeLU network of the dataset, which is also MetaCS's.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fast_jax import fairness, meta
from fast_jax.config import Config, UsageError
from fast_jax.methods.base import Context, Method, TrainState, scan_epoch
from fast_jax.models import MeLU, make_backbone

Params = Any


def check_config(cfg: Config) -> None:
  """Reject baseline settings that cannot work, with the flag to change."""
  for name in ("interaction_batch", "mf_dim", "mf_steps"):
    if getattr(cfg, name) < 1:
      raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
  for name in ("wide_cross", "finetune_steps", "baseline_patience"):
    if getattr(cfg, name) < 0:
      raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
  if not 0.0 <= cfg.dropout < 1.0:
    raise UsageError(f"--dropout is a probability in [0, 1), got {cfg.dropout}")
  if cfg.baseline_lr <= 0 or cfg.mf_l2 < 0:
    raise UsageError("--baseline-lr must be > 0 and --mf-l2 >= 0")
  if cfg.baseline_select not in ("best-valid", "last"):
    raise UsageError(f"--baseline-select {cfg.baseline_select!r}: expected best-valid or last")


def melu(ctx: Context, *, drop_user_fields: bool = False) -> MeLU:
  """The dataset's MeLU network (the deep part / feature stage of every baseline)."""
  module = make_backbone(ctx.data.meta, drop_sensitive=ctx.cfg.drop_sensitive,
                         torch_init=ctx.cfg.init == "torch").module
  if drop_user_fields:
    module = module.clone(drop_fields=tuple(f.name for f in module.fields if f.side == "user"))
  return module


def user_batches(ctx: Context) -> Callable:
  """Users per step: the Origin sampler (shuffle, ``N // batch_size`` batches)."""
  n, b = ctx.data.train.num_users, ctx.cfg.batch_size
  return lambda state, data, key: fairness.uniform_batches(key, n, b)


def make_step(loss_fn: Callable, tx, num_groups: int) -> Callable:
  """``step(state, batch, key) -> (state, metrics)``: one Adam step on ``loss_fn(params,
  fixed, batch, key) -> (loss, (values float[B], group int[B]))``; ``values`` are the
  per-example losses behind the per-group log. ``state.extra`` holds the fixed inputs."""

  def step(state: TrainState, batch: dict, key: jax.Array):
    key_t = jax.random.fold_in(key, state.step)
    (loss, (values, group)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.extra, batch, key_t)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state, step=state.step + 1)
    onehot = jax.nn.one_hot(group, num_groups)
    return state, {"loss": loss, "group_sum": values @ onehot, "group_count": onehot.sum(0)}
  return step


def record(state: TrainState, steps: dict) -> dict:
  return {"train_loss": float(np.mean(steps["loss"])),
          "group_loss": (steps["group_sum"].sum(0) / np.maximum(
              steps["group_count"].sum(0), 1)).tolist()}


def user_query_mse(pred: jax.Array, batch: dict, query_idx: jax.Array):
  """(mean, (per-user query MSE float[B], group int[B])) of query predictions."""
  per_user = jnp.mean(jnp.square(pred - meta.take_rows(batch["y"], query_idx)), -1)
  return jnp.mean(per_user), (per_user, batch["group"])


def trained(ctx: Context, *, init_params: Callable, loss: Callable, predict: Callable,
            init_fixed: Callable = lambda key: {}, batches: Callable | None = None,
            splits: dict | None = None, choices: Callable = lambda fixed: {}) -> Method:
  """The Method of a baseline network trained with Adam.

  Args:
    init_params: ``init_params(key) -> params``; init_fixed: ``init_fixed(key) -> inputs
      computed once per seed`` (DropoutNet's MF vectors).
    loss: ``loss(params, fixed, batch, key) -> (loss, (values float[B], group int[B]))``.
    predict: ``predict(params, fixed, x, y, support, query_idx) -> float32[B, Q]``.
    batches: ``batches(state, data, key) -> int32[steps, B]`` (default: users, uniform).
    splits: device arrays (default the context's; "fit" defaults to "train").
    choices: ``choices(fixed) -> dict`` reported beside the selected epoch.
  """
  cfg = ctx.cfg
  check_config(cfg)
  tx = optax.adam(cfg.baseline_lr)
  splits = {**ctx.splits, **(splits or {})}
  splits.setdefault("fit", splits["train"])

  def init(key):
    k_params, k_fixed = jax.random.split(key)
    params = init_params(k_params)
    return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                      extra=init_fixed(k_fixed))

  return Method(
      init=init,
      epoch=scan_epoch(make_step(loss, tx, ctx.num_groups), batches or user_batches(ctx),
                       mesh=ctx.mesh),
      predict=lambda s, x, y, support, q, group: predict(s.params, s.extra, x, y, support, q),
      record=record, splits=splits, select=cfg.baseline_select,
      patience=cfg.baseline_patience, hint="lower --baseline-lr",
      choices=lambda s, selected_epoch, epochs_run: {
          "selected_epoch": selected_epoch, "epochs_run": epochs_run, **choices(s.extra)})
