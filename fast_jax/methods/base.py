"""The method interface and what every method shares: its context and its epoch scan.

A training method is a :class:`Method`, a record of pure functions that
:class:`fast_jax.runner.Runner` drives (seed loop, checkpoints, divergence, logging,
selection, vmapped lanes, evaluation, attacker)::

    state          = init(key)
    state, steps   = epoch(state, splits["fit"], key)       # one jitted scan of steps
    state, fields  = end_of_epoch(state, evaluate)          # e.g. FAST's per-epoch p
    y_hat          = predict(state, x, y, support, query_idx, group)    # float32[B, Q]
    y_hat_0        = predict_unadapted(state, x, y, support, query_idx, group)
    h_u            = represent(state, x, y, support, valid, group)      # float32[B, D]

Each method module has ``make(ctx, *, by_length=True) -> Method``; the registry in
:mod:`fast_jax.methods` maps ``--method`` names to them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax
import jax
import numpy as np

from fast_jax import models, sharding
from fast_jax.config import Config

Params = Any


class Method(NamedTuple):
  """One training method as pure functions (module docstring).

  init: ``init(key) -> state``, a pytree with an int32 ``step`` counter.
  epoch: ``epoch(state, data, key) -> (state, step metrics)``, jitted; step metrics hold
    at least ``loss`` float[steps]. None: nothing to train (reference predictors).
  predict: ``predict(state, x, y, support, query_idx, group) -> float32[B, Q]`` query
    predictions after the method's own adaptation on ``support`` (jittable).
  record: ``record(state, step metrics) -> dict``: the method's fields of an epoch's
    ``metrics.jsonl`` record (host values).
  splits: device arrays: "train", "valid", "test" (what ``predict`` reads) and "fit"
    (what ``epoch`` reads).
  represent: ``represent(state, x, y, support, valid, group) -> float32[B, D] | None``,
    adapted user representations for the attacker; None: not a meta-learner (no attack).
  predict_unadapted: ``predict``'s arguments -> float32[B, Q]: the query predictions of
    the meta-parameters with the inner loop switched off (``support`` unused), through
    the same readout as ``predict``; what the adaptation diagnostics compare ``predict``
    with (:mod:`fast_jax.diagnostics`). None: the method has no inner loop (baselines,
    reference predictors), and reports no adaptation.
  end_of_epoch: ``end_of_epoch(state, evaluate) -> (state, record fields)`` after an
    epoch's steps; ``evaluate(state, split) -> per-user metrics`` (host float[U]).
  select: "last" or "best-valid" (the lowest validation MAE).
  patience: stop after this many epochs without a lower validation MAE (0: never).
  choices: ``choices(state, selected_epoch, epochs_run) -> dict | None``, derived settings
    reported beside the test metrics (None: no "choices" entry).
  hint: the flags to change when the loss diverges.
  lanes: ``init``'s state carries its hyperparameters (``state.hyper``), so seeds and
    hyperparameter points can train as ``vmap``-ped lanes of one program.
  """
  init: Callable
  epoch: Callable | None
  predict: Callable
  record: Callable
  splits: dict
  represent: Callable | None = None
  predict_unadapted: Callable | None = None
  end_of_epoch: Callable = lambda state, evaluate: (state, {})
  select: str = "last"
  patience: int = 0
  choices: Callable = lambda state, selected_epoch, epochs_run: None
  hint: str = "lower --lr or --inner-lr"
  lanes: bool = False


@dataclasses.dataclass(frozen=True)
class Context:
  """What every method builds on: the resolved config, the data and its device arrays."""
  cfg: Config
  data: Any                 # fast_jax.dataset.TaskData
  splits: dict              # {"train", "valid", "test"}: device arrays, replicated on mesh
  mesh: Any                 # fast_jax.sharding mesh, or None
  num_groups: int
  max_len: int

  @property
  def train_mean(self) -> float:
    """Mean rating over all rows of the training users (the global-mean predictor and
    the output bias of ``--out-bias mean``)."""
    train = self.data.train
    return float(train.y.sum(dtype=np.float64) / train.length.sum())

  @property
  def group_shares(self) -> np.ndarray:
    """float[G]: each group's share of the training users."""
    group = np.asarray(self.data.train.group)
    return np.bincount(group, minlength=self.num_groups) / len(group)

  @property
  def item_columns(self) -> tuple[int, ...]:
    """The columns of x holding item fields."""
    return tuple(c for f in self.data.meta["fields"] if f["side"] == "item"
                 for c in range(f["start"], f["stop"]))

  @functools.cached_property
  def user_rows_shared(self) -> bool:
    """Whether every user's user fields are the same on all its rows, in every split
    (:func:`fast_jax.models.user_rows_shared`)."""
    return models.user_rows_shared(models.fields_from_meta(self.data.meta), self.data.train,
                                   self.data.valid, self.data.test)

  @property
  def num_train_steps(self) -> int:
    return self.cfg.epochs * (self.data.train.x.shape[0] // self.cfg.batch_size)


def device_split(split, mesh=None) -> dict:
  """The arrays of a split as device arrays (what the jitted functions index), on every
  device of ``mesh`` when given (:func:`fast_jax.sharding.replicate`)."""
  return sharding.replicate({"x": split.x, "y": split.y, "length": split.length,
                             "group": split.group}, mesh)


def make_context(cfg: Config, data) -> Context:
  """The context of a resolved ``cfg`` on ``data``; with ``cfg.data_parallel`` the
  batches' users are split across all devices (:mod:`fast_jax.sharding`)."""
  mesh = sharding.data_mesh(cfg.batch_size) if cfg.data_parallel else None
  splits = {name: device_split(data.split(name), mesh) for name in ("train", "valid", "test")}
  return Context(cfg=cfg, data=data, splits=splits, mesh=mesh,
                 num_groups=len(data.meta["sensitive"]["groups"]),
                 max_len=int(data.train.x.shape[1]))


def scan_epoch(step: Callable, batches: Callable, *, mesh=None) -> Callable:
  """``epoch(state, data, key) -> (state, per-step metrics)``: one jitted ``lax.scan``.

  Args:
    step: ``step(state, batch, key) -> (state, metrics)``; the same key every step (a
      step folds in its counter).
    batches: ``batches(state, data, key) -> int32[steps, B]`` rows of ``data`` per step.
    mesh: split each batch's users across its devices (:mod:`fast_jax.sharding`).

  ``data["held_out"]``, when present (a split's arrays, e.g. FAST's ``--gap-users
  valid``), reaches every step whole as ``batch["held_out"]``.
  """

  def epoch(state, data: dict, key: jax.Array):
    k_batches, k_steps = jax.random.split(key)
    rows = {k: v for k, v in data.items() if k != "held_out"}

    def body(state, idx):
      batch = sharding.split_users(jax.tree.map(lambda a: a[idx], rows), mesh)
      if "held_out" in data:
        batch = {**batch, "held_out": data["held_out"]}
      return step(state, batch, k_steps)
    return jax.lax.scan(body, state, batches(state, rows, k_batches))

  return jax.jit(epoch)


@flax.struct.dataclass
class TrainState:
  """A method's train state: what the outer optimizer moves, plus counters.

  ``hyper`` holds the hyperparameters a vectorised sweep varies per lane (FAST's
  ``gamma``, ``tau``, Reg's ``reg_weight``), as float32 scalars in the state rather than
  constants of the program; ``extra`` the method's own players (CLOVER's adversaries).
  """
  params: Params
  opt_state: Any
  step: jax.Array                 # int32 outer step counter
  alpha: Any = ()                 # inner learning rate (fixed or learned)
  alpha_opt_state: Any = ()       # () when alpha is not learned
  p: Any = ()                     # float[G] group sampling probabilities
  hyper: Any = dataclasses.field(default_factory=dict)
  extra: Any = ()


def present_mean(values: np.ndarray, present: np.ndarray) -> np.ndarray:
  """Mean over steps of per-group batch losses, counting only steps where the group was."""
  return (values * present).sum(0) / np.maximum(present.sum(0), 1)
