"""Cold-start baselines of the FAST paper's Table 2 and two reference predictors.

Every method here runs on the same prepared splits, query protocol and metrics module as
the meta-learners (research/fast.md §5): a test user's query is its fixed last 10 rows,
the rows before them are its support, and per-user MAE / MSE / NDCG@3 come from
:func:`fast_jax.metrics.user_metrics`, grouped by :func:`fast_jax.metrics.group_report`.

    global-mean   the mean training rating on every query row                  (§5.9)
    support-mean  the mean rating of the user's own support rows               (§5.9)
    widedeep      y = wide(x) + deep(x): deep = the dataset's MeLU network, wide = a
                  linear model over the one-hot features (optionally plus hashed
                  user x item crosses); trained on all rows of the training users as
                  i.i.d. samples; tested from features alone, or after ``k`` SGD steps
                  on the support set                                            (§5.6)
    dropoutnet    the MeLU network with two preference inputs concatenated before fc1:
                  the user's mean biased-MF item vector over its support items (the
                  DropoutNet transform) and the item's MF vector, each zeroed with
                  probability ``dropout`` per row while training                (§5.7)
    nlba          per-user hidden and output biases linear in the class-conditional
                  means R^0, R^1 of the support items' representations; no gradient
                  adaptation                                                    (§5.8)

The three models reuse :class:`fast_jax.models.MeLU` (its ``embed`` and ``represent``
stages, i.e. the field embeddings and item_fc / user_fc). They are trained with Adam
(``cfg.baseline_lr``); one epoch is one jitted ``lax.scan`` over batches; all randomness
comes from ``jax.random`` keys derived from the seed. The network's output bias starts
at the training mean rating (the global-mean predictor), so no epochs are spent climbing
to the rating level. The epoch with the lowest validation MAE is tested by default
(``cfg.baseline_select``). ``cfg.backbone`` plays no role: every baseline uses the MeLU
network of the dataset, which is also MetaCS's network.

``make_runner(cfg, data).run_seed(seed, log=..., progress=...) -> (state, report)`` is the
protocol :mod:`fast_jax.experiment` drives, as for :class:`fast_jax.train.Trainer`.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from fast_jax import fairness, meta, metrics
from fast_jax.config import Config
from fast_jax.dataset import SPLITS
from fast_jax.models import Field, MeLU, _torch_uniform, make_backbone, param_labels
from fast_jax.train import Evaluator, device_split

Params = Any
MF_LR = 0.02  # Adam rate of DropoutNet's full-batch biased-MF pretraining
# DropoutNet trains on item vectors fitted without the user's own ratings (MF_FOLDS
# fits, each leaving one fold of the training users out), as a test user's are.
MF_FOLDS = 2


def train_mean(data) -> float:
  """Mean rating over all rows of the training users (the global-mean predictor)."""
  return float(data.train.y.sum(dtype=np.float64) / data.train.length.sum())


def _dense(features: int, fan_in: int, torch_init: bool, *, use_bias: bool = True,
           bias: float | None = None, name: str | None = None) -> nn.Dense:
  """A Dense layer initialised like MeLU's (PyTorch defaults when ``torch_init``)."""
  kw = {}
  if torch_init:
    kw = dict(kernel_init=_torch_uniform(fan_in), bias_init=_torch_uniform(fan_in))
  if bias is not None:
    kw["bias_init"] = nn.initializers.constant(bias)
  return nn.Dense(features, use_bias=use_bias, name=name, **kw)


def _masked_slot_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean of ``values`` over the valid slots of the last axis."""
  return metrics.masked_mean(values, valid, axis=-1)


# ----------------------------------------------------------------------------- Wide&Deep


def _hash(a: jax.Array, b: jax.Array, salt: int, buckets: int) -> jax.Array:
  """Bucket of the cross feature (a, b) of field pair ``salt`` (uint32 mixing)."""
  a, b = a.astype(jnp.uint32), b.astype(jnp.uint32)
  h = a * jnp.uint32(0x9E3779B1) ^ (b + jnp.uint32(salt) * jnp.uint32(0x85EBCA6B)) * jnp.uint32(
      0xC2B2AE35)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x2C1B3C6D)
  h = h ^ (h >> 12)
  return (h % jnp.uint32(buckets)).astype(jnp.int32)


def _slots(x: jax.Array, f: Field) -> tuple[jax.Array, jax.Array]:
  """(indices int32[..., W], valid bool[..., W]) of field ``f`` in x int32[..., F]."""
  cols = x[..., f.start:f.stop]
  valid = cols != f.pad_index if f.kind == "multi" else jnp.ones(cols.shape, bool)
  return cols, valid


class Wide(nn.Module):
  """The wide part: a linear model over the one-hot features.

  ``wide(x) = b + sum_f w_f[x_f] (+ sum_{user f, item f'} w_cross[hash(x_f, x_f')])``;
  a multi-valued field contributes the mean of its values' weights (as its embedding is
  the mean of its values' embeddings). Weights start at 0 and ``b`` at ``offset``.
  """
  fields: Sequence[Field]
  drop_fields: Sequence[str] = ()
  cross_buckets: int = 0
  offset: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: int32[..., F] -> float32[...]."""
    used = [f for f in self.fields if f.name not in self.drop_fields]
    out = self.param("offset", nn.initializers.constant(self.offset), ())
    for f in used:
      w = self.param(f"w_{f.name}", nn.initializers.zeros, (f.table_size,))
      cols, valid = _slots(x, f)
      out = out + _masked_slot_mean(w[cols], valid)
    if self.cross_buckets:
      w = self.param("w_cross", nn.initializers.zeros, (self.cross_buckets,))
      pairs = [(u, i) for u in used if u.side == "user" for i in used if i.side == "item"]
      for salt, (fu, fi) in enumerate(pairs):
        (cu, vu), (ci, vi) = _slots(x, fu), _slots(x, fi)
        ids = _hash(cu[..., :, None], ci[..., None, :], salt, self.cross_buckets)
        valid = vu[..., :, None] & vi[..., None, :]
        flat = ids.shape[:-2] + (-1,)
        out = out + _masked_slot_mean(w[ids].reshape(flat), valid.reshape(flat))
    return out


class WideDeep(nn.Module):
  """Wide&Deep (Cheng et al. 2016): ``wide(x) + deep(x)`` with deep = the MeLU network."""
  deep: MeLU
  wide: Wide

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: int32[..., F] -> float32[...] ratings."""
    return self.wide(x) + self.deep(x)


# ----------------------------------------------------------------------------- DropoutNet


class DropoutNet(nn.Module):
  """MeLU with preference inputs: ``fc1(concat(h_item, h_user, u_pref, v_pref))``.

  The field embeddings and item_fc / user_fc are the MeLU module's; fc1, fc2 and out
  take the wider input.
  """
  melu: MeLU
  hidden: int = 64
  torch_init: bool = True
  out_bias: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, u_pref: jax.Array, v_pref: jax.Array) -> jax.Array:
    """x: int32[..., F]; u_pref, v_pref: float32[..., P] -> float32[...] ratings."""
    h_item, h_user = self.melu.represent(self.melu.embed(x))
    h = jnp.concatenate([h_item] + ([] if h_user is None else [h_user]) + [u_pref, v_pref],
                        axis=-1)
    h = nn.relu(_dense(self.hidden, h.shape[-1], self.torch_init, name="fc1")(h))
    h = nn.relu(_dense(self.hidden, self.hidden, self.torch_init, name="fc2")(h))
    out = _dense(1, self.hidden, self.torch_init, bias=self.out_bias, name="out")(h)
    return out[..., 0]


def preference_dropout(key: jax.Array, u_pref: jax.Array, v_pref: jax.Array,
                       rate: float | jax.Array) -> tuple[jax.Array, jax.Array]:
  """DropoutNet's input dropout: zero each row's user and (independently) item
  preference vector with probability ``rate``; no rescaling, as a zeroed vector stands
  for a cold user or item.

  u_pref, v_pref: float32[..., P] -> the same shapes.
  """
  k_u, k_v = jax.random.split(key)
  keep_u = jax.random.bernoulli(k_u, 1.0 - rate, u_pref.shape[:-1] + (1,))
  keep_v = jax.random.bernoulli(k_v, 1.0 - rate, v_pref.shape[:-1] + (1,))
  return jnp.where(keep_u, u_pref, 0.0), jnp.where(keep_v, v_pref, 0.0)


@functools.partial(jax.jit, static_argnames=("num_users", "num_items", "dim", "steps"))
def fit_biased_mf(key: jax.Array, user: jax.Array, item: jax.Array, rating: jax.Array,
                  weight: jax.Array, l2: float, *, num_users: int, num_items: int, dim: int,
                  steps: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Biased MF ``r ~ mu + b_u + b_v + P_u . Q_v`` by full-batch Adam on the weighted rows.

  Loss: weighted mean over rows of the squared error + ``l2`` (|P_u|^2 + |Q_v|^2 + b_u^2 +
  b_v^2). Rows with weight 0 are left out, so held-out fits keep the shapes (and the
  compilation) of the full fit.

  Args:
    user, item: int32[N] row indices into the user and item tables; rating: float32[N];
    weight: float32[N], 1 for the rows to fit and 0 for the others.
  Returns:
    (vectors float32[num_items + 1, dim + 1] = [Q_v, b_v] per item, known bool[num_items +
    1], training RMSE). Items without a fitted row, and the extra last row (unseen items,
    padding), have ``known`` False and a zero vector.
  """
  norm = jnp.maximum(jnp.sum(weight), 1.0)
  mu = jnp.sum(weight * rating) / norm
  k_p, k_q = jax.random.split(key)
  params = {"P": 0.1 * jax.random.normal(k_p, (num_users, dim)),
            "Q": 0.1 * jax.random.normal(k_q, (num_items, dim)),
            "bu": jnp.zeros(num_users), "bv": jnp.zeros(num_items)}
  tx = optax.adam(MF_LR)

  def loss_fn(p):
    pu, qv, bu, bv = p["P"][user], p["Q"][item], p["bu"][user], p["bv"][item]
    sq = jnp.square(mu + bu + bv + jnp.sum(pu * qv, -1) - rating)
    reg = jnp.sum(pu ** 2, -1) + jnp.sum(qv ** 2, -1) + bu ** 2 + bv ** 2
    mse = jnp.sum(weight * sq) / norm
    return mse + l2 * jnp.sum(weight * reg) / norm, mse

  def step(carry, _):
    p, s = carry
    grads, _ = jax.grad(loss_fn, has_aux=True)(p)
    updates, s = tx.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
  known = jnp.zeros(num_items + 1).at[item].add(weight) > 0
  vectors = jnp.concatenate([params["Q"], params["bv"][:, None]], -1)
  vectors = jnp.concatenate([vectors, jnp.zeros((1, dim + 1))], 0)
  return jnp.where(known[:, None], vectors, 0.0), known, jnp.sqrt(loss_fn(params)[1])


# ----------------------------------------------------------------------------- NLBA


def class_means(f: jax.Array, y: jax.Array, support: jax.Array,
                threshold: float) -> tuple[jax.Array, jax.Array]:
  """NLBA's R^0, R^1: means of ``f`` over the support rows with rating below / at least
  ``threshold`` (zero vectors when a class has no support row).

  f: float32[B, L, P]; y: float32[B, L]; support: bool[B, L] -> (float32[B, P]) * 2.
  """
  positive = y >= threshold
  r0 = metrics.masked_mean(f, (support & ~positive)[..., None], axis=-2)
  r1 = metrics.masked_mean(f, (support & positive)[..., None], axis=-2)
  return r0, r1


class NLBA(nn.Module):
  """Non-linear bias adaptation (Vartak et al. 2017) with users as tasks::

      F(x) = relu(item_fc(item field embeddings))                (MeLU's item stage)
      h    = relu(W F(x) + V_h^0 R^0 + V_h^1 R^1 + b_h)
      y    = w . h + v_o^0 . R^0 + v_o^1 . R^1 + b_o

  ``melu`` should have its user fields dropped: the user enters only through R^0, R^1.
  """
  melu: MeLU
  threshold: float
  hidden: int = 64
  torch_init: bool = True
  out_bias: float = 0.0

  def setup(self):
    p = self.melu.proj_dim
    self.hidden_w = _dense(self.hidden, p, self.torch_init, use_bias=False)
    self.hidden_b = _dense(self.hidden, 2 * p, self.torch_init)
    self.out_w = _dense(1, self.hidden, self.torch_init, use_bias=False)
    self.out_b = _dense(1, 2 * p, self.torch_init, bias=self.out_bias)

  def item_repr(self, x: jax.Array) -> jax.Array:
    """F(x): x int32[..., F] -> float32[..., P]."""
    return self.melu.represent(self.melu.embed(x))[0]

  def _biases(self, f, y, support):
    r = jnp.concatenate(class_means(f, y, support, self.threshold), axis=-1)
    return self.hidden_b(r), self.out_b(r)[..., 0]

  def biases(self, x: jax.Array, y: jax.Array, support: jax.Array):
    """Per-user (hidden float32[B, H], output float32[B]) biases from the support rows.

    x: int32[B, L, F]; y: float32[B, L]; support: bool[B, L].
    """
    return self._biases(self.item_repr(x), y, support)

  def __call__(self, x: jax.Array, y: jax.Array, support: jax.Array,
               query_idx: jax.Array) -> jax.Array:
    """Query predictions float32[B, Q] from x int32[B, L, F], y float32[B, L],
    support bool[B, L] and query_idx int32[B, Q]."""
    f = self.item_repr(x)
    hidden_bias, out_bias = self._biases(f, y, support)
    h = nn.relu(self.hidden_w(meta.take_rows(f, query_idx)) + hidden_bias[:, None, :])
    return self.out_w(h)[..., 0] + out_bias[:, None]


def nlba_threshold(cfg: Config, rating_range: tuple[float, float]) -> float:
  """Class-1 threshold: ``cfg.nlba_threshold``, or three quarters up the rating scale
  rounded up (4 on 1-5, 8 on 1-10, as fast.md §5.8)."""
  if cfg.nlba_threshold is not None:
    return float(cfg.nlba_threshold)
  lo, hi = rating_range
  return float(math.ceil(lo + 0.75 * (hi - lo)))


# ----------------------------------------------------------------------------- training


@flax.struct.dataclass
class BaselineState:
  """params: trained by Adam; fixed: inputs computed once per seed (DropoutNet's MF
  vectors), empty otherwise."""
  params: Params
  fixed: Any
  opt_state: Any
  step: jax.Array


def make_train_epoch(loss_fn: Callable, tx, batches_fn: Callable, num_groups: int) -> Callable:
  """``train_epoch(state, data, key) -> (state, per-step metrics)``: one jitted scan.

  Args:
    loss_fn: ``loss_fn(params, fixed, batch, key) -> (loss, (values float[B], group
      int[B]))``; ``values`` are the per-example losses behind the per-group log.
    batches_fn: ``batches_fn(key) -> int32[steps, B]`` rows of ``data`` per step.
  """

  def train_epoch(state: BaselineState, data: dict, key: jax.Array):
    k_batches, k_steps = jax.random.split(key)

    def body(state, idx):
      batch = jax.tree.map(lambda a: a[idx], data)
      key_t = jax.random.fold_in(k_steps, state.step)
      (loss, (values, group)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, state.fixed, batch, key_t)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      state = state.replace(params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state, step=state.step + 1)
      onehot = jax.nn.one_hot(group, num_groups)
      return state, {"loss": loss, "group_sum": values @ onehot, "group_count": onehot.sum(0)}

    return jax.lax.scan(body, state, batches_fn(k_batches))

  return jax.jit(train_epoch)


class _Runner:
  """What every baseline shares: device data, evaluation on the fixed last-10 query
  through :class:`fast_jax.train.Evaluator`, and the report."""

  def __init__(self, cfg: Config, data):
    self.cfg, self.data = cfg, data
    self.num_groups = data.num_groups
    self.max_len = data.train.max_len
    self.train_mean = train_mean(data)
    self.splits = {s: self.device_data(data.split(s)) for s in SPLITS}
    self.evaluator = Evaluator(self, max_len=self.max_len, chunk=cfg.eval_chunk)

  def device_data(self, split) -> dict:
    return device_split(split)

  def predict(self, variables, alpha, x, y, support, query_idx, group=None) -> jax.Array:
    """Query predictions float32[B, Q] (the Evaluator's learner protocol; ``variables``
    = {"params", "fixed"}; ``alpha`` and ``group`` are unused: no baseline sees the
    sensitive group beyond its input features)."""
    raise NotImplementedError

  def evaluate(self, state: BaselineState, split: str) -> dict:
    variables = {"params": state.params, "fixed": state.fixed}
    per_user = self.evaluator.per_user(variables, None, self.splits[split])
    return metrics.group_report(per_user, self.data.split(split).group, self.num_groups)

  def choices(self) -> dict:
    """Derived settings worth recording beside the test metrics."""
    return {}


class ReferencePredictor(_Runner):
  """global-mean / support-mean: no parameters to learn, one record with epoch 0."""

  def __init__(self, cfg: Config, data):
    self.kind = cfg.method
    super().__init__(cfg, data)

  def predict(self, variables, alpha, x, y, support, query_idx, group=None):
    if self.kind == "global-mean":
      return jnp.full(query_idx.shape, variables["params"]["mean"])
    return jnp.broadcast_to(metrics.masked_mean(y, support)[:, None], query_idx.shape)

  def run_seed(self, seed: int, *, log: Callable[[dict], None] = lambda r: None,
               progress: bool = True) -> tuple[BaselineState, dict]:
    t0 = time.perf_counter()
    state = BaselineState(params={"mean": jnp.float32(self.train_mean)}, fixed={},
                          opt_state=(), step=jnp.zeros((), jnp.int32))
    train = self.evaluate(state, "train")
    log({"seed": seed, "epoch": 0, "train_loss": train["mse"],
         "group_loss": [train["group"][str(g)]["mse"] for g in range(self.num_groups)],
         "valid": self.evaluate(state, "valid"), "seconds": time.perf_counter() - t0})
    report = self.evaluate(state, "test")
    report["choices"] = {"train_mean": self.train_mean}
    return state, report


class _TrainedRunner(_Runner):
  """A baseline network trained with Adam for up to ``cfg.epochs`` epochs, stopped early
  after ``cfg.baseline_patience`` epochs without a lower validation MAE; the epoch with
  the lowest validation MAE is tested (``cfg.baseline_select``)."""

  def __init__(self, cfg: Config, data):
    super().__init__(cfg, data)
    self.tx = optax.adam(cfg.baseline_lr)
    self.train_data = self.training_data()
    self.train_epoch = make_train_epoch(self.loss, self.tx, self.batches, self.num_groups)

  # Each model defines these.
  def init_params(self, key: jax.Array) -> Params:
    raise NotImplementedError

  def init_fixed(self, key: jax.Array) -> Any:
    return {}

  def training_data(self) -> dict:
    return self.splits["train"]

  def batches(self, key: jax.Array) -> jax.Array:
    """Users per step: the Origin sampler (shuffle, ``N // batch_size`` batches)."""
    return fairness.uniform_batches(key, self.data.train.num_users, self.cfg.batch_size)

  def loss(self, params, fixed, batch, key):
    raise NotImplementedError

  def init_state(self, key: jax.Array) -> BaselineState:
    k_params, k_fixed = jax.random.split(key)
    params = self.init_params(k_params)
    return BaselineState(params=params, fixed=self.init_fixed(k_fixed),
                         opt_state=self.tx.init(params), step=jnp.zeros((), jnp.int32))

  def run_seed(self, seed: int, *, log: Callable[[dict], None] = lambda r: None,
               progress: bool = True) -> tuple[BaselineState, dict]:
    """Train one seed; return the selected state and its test report."""
    key = jax.random.key(seed)
    k_init, k_train = jax.random.split(key)
    state = self.init_state(k_init)
    best = (np.inf, state, 0)
    bar = tqdm(range(1, self.cfg.epochs + 1), desc=f"{self.cfg.method} seed {seed}",
               disable=not progress, leave=False)
    for epoch in bar:
      t0 = time.perf_counter()
      state, step_metrics = self.train_epoch(state, self.train_data,
                                             jax.random.fold_in(k_train, epoch))
      step_metrics = jax.device_get(step_metrics)
      train_loss = float(np.mean(step_metrics["loss"]))
      if not np.isfinite(train_loss):
        raise FloatingPointError(f"{self.cfg.method} seed {seed}: training loss is "
                                 f"{train_loss} in epoch {epoch}; lower --baseline-lr")
      group_loss = step_metrics["group_sum"].sum(0) / np.maximum(
          step_metrics["group_count"].sum(0), 1)
      valid = self.evaluate(state, "valid")
      if valid["mae"] < best[0]:
        best = (valid["mae"], state, epoch)
      log({"seed": seed, "epoch": epoch, "train_loss": train_loss,
           "group_loss": group_loss.tolist(), "valid": valid,
           "seconds": time.perf_counter() - t0})
      bar.set_postfix(loss=round(train_loss, 4), val_mae=round(valid["mae"], 4))
      if self.cfg.baseline_patience and epoch - best[2] >= self.cfg.baseline_patience:
        break
    selected = epoch
    if self.cfg.baseline_select == "best-valid":
      _, state, selected = best
    report = self.evaluate(state, "test")
    report["choices"] = {"selected_epoch": selected, "epochs_run": epoch, **self.choices()}
    return state, report


def _melu(cfg: Config, data, *, drop_user_fields: bool = False) -> MeLU:
  """The dataset's MeLU network (the deep part / feature stage of every baseline)."""
  module = make_backbone(data.meta, drop_sensitive=cfg.drop_sensitive,
                         torch_init=cfg.init == "torch").module
  if drop_user_fields:
    module = module.clone(drop_fields=tuple(f.name for f in module.fields if f.side == "user"))
  return module


class WideDeepRunner(_TrainedRunner):
  """Wide&Deep trained on the training users' rows as i.i.d. samples."""

  def __init__(self, cfg: Config, data):
    melu = _melu(cfg, data)
    self.backbone_local = make_backbone(data.meta, local_output=cfg.local_output).local_modules
    self.model = WideDeep(deep=melu, wide=Wide(fields=melu.fields, drop_fields=melu.drop_fields,
                                               cross_buckets=cfg.wide_cross,
                                               offset=train_mean(data)))
    super().__init__(cfg, data)

  def training_data(self) -> dict:
    split = self.data.train
    mask = split.mask
    return {"x": jnp.asarray(split.x[mask]), "y": jnp.asarray(split.y[mask]),
            "group": jnp.asarray(np.repeat(split.group, split.length))}

  def batches(self, key):
    """Rows per step: a shuffle of all training rows in batches of ``interaction_batch``."""
    n, b = self.train_data["y"].shape[0], self.cfg.interaction_batch
    perm = jax.random.permutation(key, n)
    return perm[: (n // b) * b].reshape(n // b, b)

  def init_params(self, key):
    return self.model.init(key, self.splits["train"]["x"][0])["params"]

  def apply(self, params, x):
    return self.model.apply({"params": params}, x)

  def loss(self, params, fixed, batch, key):
    sq = jnp.square(self.apply(params, batch["x"]) - batch["y"])
    return jnp.mean(sq), (sq, batch["group"])

  def predict(self, variables, alpha, x, y, support, query_idx, group=None):
    params = variables["params"]
    if self.cfg.finetune_steps == 0:
      return self.apply(params, meta.take_rows(x, query_idx))
    # Per-user fine-tuning: the deep head's local modules (as the meta-learners adapt)
    # and the wide offset take k SGD steps on the support set.
    labels = param_labels(params, self.backbone_local + ("offset",))
    return meta.adapted_query_predictions(self.apply, params, labels, self.cfg.finetune_lr,
                                          x, y, support, query_idx,
                                          steps=self.cfg.finetune_steps, first_order=True)

  def choices(self):
    return {"finetuned_modules": list(self.backbone_local + ("offset",))
            if self.cfg.finetune_steps else []}


class DropoutNetRunner(_TrainedRunner):
  """DropoutNet adapted to rating prediction for cold users (fast.md §5.7).

  Items have no id in the prepared data, so an item is identified by its item-side
  feature columns (unique rows of them; on ML-100K some films share year and genres and
  thus one vector). The item index rides along as an extra last column of x, which the
  MeLU stage ignores (it reads only its fields' columns); items unseen in training and
  padding rows get index ``K`` whose vector is 0.

  The MF is fitted per seed on all training rows (the vectors test and validation users
  see) and ``MF_FOLDS`` more times, each time leaving one fold of the training users out;
  a training user sees the vectors of the fit without its fold. Otherwise the vector of
  an item rated by few users encodes the very rating to predict (most Book-Crossing
  items have one or two ratings), and the network learns to read it off.
  """

  def __init__(self, cfg: Config, data):
    self.num_columns = data.num_columns
    self.item_columns = max(f["stop"] for f in data.meta["fields"] if f["side"] == "item")
    train = data.train
    keys, inverse = np.unique(train.x[train.mask][:, :self.item_columns], axis=0,
                              return_inverse=True)
    self.num_items = keys.shape[0]
    self._index = {row.tobytes(): i for i, row in enumerate(keys)}
    self.mf_rows = {"user": jnp.asarray(np.repeat(np.arange(train.num_users), train.length)),
                    "item": jnp.asarray(inverse.reshape(-1).astype(np.int32)),
                    "rating": jnp.asarray(train.y[train.mask])}
    self.model = DropoutNet(melu=_melu(cfg, data), torch_init=cfg.init == "torch",
                            out_bias=train_mean(data))
    super().__init__(cfg, data)

  def item_index(self, split) -> np.ndarray:
    """int32[U, L]: MF index of every row's item; K for unseen items and padding."""
    flat = np.ascontiguousarray(split.x[..., :self.item_columns]).reshape(-1, self.item_columns)
    idx = np.array([self._index.get(r.tobytes(), self.num_items) for r in flat], np.int32)
    return np.where(split.mask, idx.reshape(split.mask.shape), self.num_items).astype(np.int32)

  def device_data(self, split) -> dict:
    d = device_split(split)
    d["x"] = jnp.concatenate([d["x"], jnp.asarray(self.item_index(split))[..., None]], -1)
    return d

  def training_data(self) -> dict:
    return {**self.splits["train"], "user": jnp.arange(self.data.train.num_users)}

  def _fit(self, key, weight):
    rows = self.mf_rows
    return fit_biased_mf(key, rows["user"], rows["item"], rows["rating"], weight,
                         self.cfg.mf_l2, num_users=self.data.train.num_users,
                         num_items=self.num_items, dim=self.cfg.mf_dim, steps=self.cfg.mf_steps)

  def init_fixed(self, key):
    k_fold, k_full, k_held = jax.random.split(key, 3)
    n = self.data.train.num_users
    user_fold = jax.random.permutation(k_fold, n) % MF_FOLDS
    row_fold = user_fold[self.mf_rows["user"]]
    items, known, rmse = self._fit(k_full, jnp.ones(row_fold.shape))
    held = [self._fit(k, (row_fold != f).astype(jnp.float32))
            for f, k in enumerate(jax.random.split(k_held, MF_FOLDS))]
    self._mf_rmse = float(rmse)
    return {"items": items, "known": known, "user_fold": user_fold,
            "fold_items": jnp.stack([h[0] for h in held]),
            "fold_known": jnp.stack([h[1] for h in held])}

  def init_params(self, key):
    p = self.cfg.mf_dim + 1
    x = self.splits["train"]["x"][0, :, :self.num_columns]
    return self.model.init(key, x, jnp.zeros(x.shape[:-1] + (p,)),
                           jnp.zeros(x.shape[:-1] + (p,)))["params"]

  def forward(self, params, fixed, x, support, query_idx, *, user=None, key=None):
    """Query predictions float32[B, Q].

    x: int32[B, L, F + 1] (last column: item index); support: bool[B, L]. Training users
    (``user``: int32[B] rows of the training split) get their held-out item vectors and,
    when ``key`` is given, preference dropout.
    """
    item = x[..., -1]
    if user is None:
      vectors, known = fixed["items"][item], fixed["known"][item]       # [B, L, P], [B, L]
    else:
      fold = fixed["user_fold"][user][:, None]
      vectors, known = fixed["fold_items"][fold, item], fixed["fold_known"][fold, item]
    u_pref = metrics.masked_mean(vectors, (support & known)[..., None], axis=-2)  # [B, P]
    v_pref = meta.take_rows(vectors, query_idx)                         # [B, Q, P]
    u_pref = jnp.broadcast_to(u_pref[:, None, :], v_pref.shape)
    if key is not None:
      u_pref, v_pref = preference_dropout(key, u_pref, v_pref, self.cfg.dropout)
    x_query = meta.take_rows(x, query_idx)[..., :self.num_columns]
    return self.model.apply({"params": params}, x_query, u_pref, v_pref)

  def loss(self, params, fixed, batch, key):
    k_split, k_drop = jax.random.split(key)
    support, query_idx = meta.random_query_split(k_split, batch["length"], self.max_len)
    pred = self.forward(params, fixed, batch["x"], support, query_idx, user=batch["user"],
                        key=k_drop)
    per_user = jnp.mean(jnp.square(pred - meta.take_rows(batch["y"], query_idx)), -1)
    return jnp.mean(per_user), (per_user, batch["group"])

  def predict(self, variables, alpha, x, y, support, query_idx, group=None):
    return self.forward(variables["params"], variables["fixed"], x, support, query_idx)

  def choices(self):
    return {"mf_items": int(self.num_items), "mf_train_rmse": self._mf_rmse,
            "mf_folds": MF_FOLDS}


class NLBARunner(_TrainedRunner):
  """NLBA trained on user batches: R^0, R^1 from a random support set, MSE on the rest."""

  def __init__(self, cfg: Config, data):
    self.threshold = nlba_threshold(cfg, data.rating_range)
    self.model = NLBA(melu=_melu(cfg, data, drop_user_fields=True), threshold=self.threshold,
                      torch_init=cfg.init == "torch",
                      out_bias=train_mean(data))
    super().__init__(cfg, data)

  def init_params(self, key):
    d = self.splits["train"]
    support, query_idx = meta.last_query_split(d["length"][:1], self.max_len)
    return self.model.init(key, d["x"][:1], d["y"][:1], support, query_idx)["params"]

  def apply(self, params, x, y, support, query_idx):
    return self.model.apply({"params": params}, x, y, support, query_idx)

  def loss(self, params, fixed, batch, key):
    support, query_idx = meta.random_query_split(key, batch["length"], self.max_len)
    pred = self.apply(params, batch["x"], batch["y"], support, query_idx)
    per_user = jnp.mean(jnp.square(pred - meta.take_rows(batch["y"], query_idx)), -1)
    return jnp.mean(per_user), (per_user, batch["group"])

  def predict(self, variables, alpha, x, y, support, query_idx, group=None):
    return self.apply(variables["params"], x, y, support, query_idx)

  def choices(self):
    return {"nlba_threshold": self.threshold}


RUNNERS = {"global-mean": ReferencePredictor, "support-mean": ReferencePredictor,
           "widedeep": WideDeepRunner, "dropoutnet": DropoutNetRunner, "nlba": NLBARunner}


def check_config(cfg: Config) -> None:
  """Reject baseline settings that cannot work, with the flag to change."""
  from fast_jax.config import UsageError
  if cfg.method not in RUNNERS:
    raise UsageError(f"--method {cfg.method!r} is not a baseline; expected one of "
                     f"{', '.join(RUNNERS)}")
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


def make_runner(cfg: Config, data):
  """The runner of baseline ``cfg.method`` on ``data`` (``run_seed`` as Trainer's)."""
  check_config(cfg)
  return RUNNERS[cfg.method](cfg, data)
