"""Backbones: the MeLU user-preference estimator (also MetaCS's network) in Flax.

A backbone is a Flax module with ``apply(params, x) -> rating`` plus a declared
partition of its parameters into *local* (adapted in the inner loop) and *global*
(updated only by the outer optimizer). The partition is a pytree of labels with the
structure of ``params`` (see :func:`param_labels`), so the meta-learning code never
matches parameter names itself.

Network (docs/methods.md §4), for embedding size d = 32::

    e_item = concat(field embeddings of the item fields)   # multi-valued: mean of slots
    e_user = concat(field embeddings of the user fields)
    h = concat(relu(item_fc(e_item)), relu(user_fc(e_user)))  # 32 + 32
    y = out(relu(fc2(relu(fc1(h)))))                        # 64 -> 64 -> 1
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fast_jax import metrics
from fast_jax.dataset import Field

Params = Any
LOCAL, GLOBAL = "local", "global"


def fields_from_meta(meta: dict) -> tuple[Field, ...]:
  return tuple(Field.from_dict(f) for f in meta["fields"])


def _torch_uniform(fan_in: int) -> Callable:
  """PyTorch's nn.Linear default for weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(max(fan_in, 1))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def dense(features: int, fan_in: int, torch_init: bool, *, use_bias: bool = True,
          bias: float | tuple[float, ...] | None = None, name: str | None = None) -> nn.Dense:
  """A Dense layer initialised like the authors' (PyTorch defaults when ``torch_init``),
  its bias starting at ``bias`` when given (a scalar, or one value per output)."""
  kw = {}
  if torch_init:
    kw = dict(kernel_init=_torch_uniform(fan_in), bias_init=_torch_uniform(fan_in))
  if bias is not None:
    kw["bias_init"] = nn.initializers.constant(np.asarray(bias, np.float32))
  return nn.Dense(features, use_bias=use_bias, name=name, **kw)


def sensitive_fields(meta: dict) -> tuple[str, ...]:
  """Names of the input fields holding the sensitive attribute (none if it is not an
  input column)."""
  col = (meta.get("sensitive") or {}).get("column")
  return tuple(f["name"] for f in meta["fields"]
               if col is not None and f["start"] <= col < f["stop"])


class MeLU(nn.Module):
  """MeLU / FAST / CLOVER user preference estimator.

  Two stages, so that the meta-learner can look the embeddings up once per batch and
  adapt only the dense head per user: ``embed(x) -> e`` (global parameters only) and
  ``head(e) -> rating``; ``__call__(x) = head(embed(x))``.

  Attributes:
    fields: the dataset's input fields (item fields first).
    embed_dim: field embedding size (32).
    proj_dim: width of the item_fc / user_fc projections (32).
    hidden: width of fc1 and fc2 (64).
    out_dim: 1 for rating regression; C for classification over rating classes.
    drop_fields: names of fields not fed to the network (e.g. the sensitive attribute).
    torch_init: PyTorch default initialisation (N(0,1) embeddings, U(+-1/sqrt(fan_in))
      dense weights and biases) as in the authors' code; Flax defaults otherwise.
    out_bias: if set, the output bias starts at this value (e.g. the training mean), or
      at these values, one per output (e.g. log class frequencies).
  """
  fields: Sequence[Field]
  embed_dim: int = 32
  proj_dim: int = 32
  hidden: int = 64
  out_dim: int = 1
  drop_fields: Sequence[str] = ()
  torch_init: bool = True
  out_bias: float | tuple[float, ...] | None = None

  def _used(self, side: str) -> list[Field]:
    return [f for f in self.fields if f.side == side and f.name not in self.drop_fields]

  def _dense(self, features: int, fan_in: int,
             bias_value: float | tuple[float, ...] | None = None):
    return dense(features, fan_in, self.torch_init, bias=bias_value)

  def setup(self):
    if not self._used("item"):
      raise ValueError("MeLU needs at least one item field")
    init = nn.initializers.normal(1.0) if self.torch_init else nn.initializers.variance_scaling(
        1.0, "fan_in", "normal", out_axis=0)
    self.emb = {f.name: nn.Embed(f.table_size, self.embed_dim, embedding_init=init)
                for f in self.fields if f.name not in self.drop_fields}
    self.item_dim = self.embed_dim * len(self._used("item"))
    user_dim = self.embed_dim * len(self._used("user"))
    self.item_fc = self._dense(self.proj_dim, self.item_dim)
    self.user_fc = self._dense(self.proj_dim, user_dim) if user_dim else None
    concat_dim = self.proj_dim * (2 if user_dim else 1)
    self.fc1 = self._dense(self.hidden, concat_dim)
    self.fc2 = self._dense(self.hidden, self.hidden)
    self.out = self._dense(self.out_dim, self.hidden, self.out_bias)

  def _lookup(self, f: Field, cols: jax.Array) -> jax.Array:
    table = self.emb[f.name]
    if f.kind == "categorical":
      return table(cols[..., 0])
    valid = (cols != f.pad_index)[..., None]
    summed = jnp.sum(jnp.where(valid, table(cols), 0.0), axis=-2)
    return summed / jnp.maximum(jnp.sum(valid, axis=-2), 1)

  def embed(self, x: jax.Array) -> jax.Array:
    """Concatenated field embeddings, item fields first. x: int32[..., F] -> [..., D]."""
    used = self._used("item") + self._used("user")
    return jnp.concatenate([self._lookup(f, x[..., f.start:f.stop]) for f in used], axis=-1)

  def represent(self, e: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Item and user representations (after item_fc / user_fc) from ``embed``'s output."""
    h_item = nn.relu(self.item_fc(e[..., :self.item_dim]))
    h_user = None if self.user_fc is None else nn.relu(self.user_fc(e[..., self.item_dim:]))
    return h_item, h_user

  def head(self, e: jax.Array) -> jax.Array:
    """Ratings (or logits [..., C]) from ``embed``'s output."""
    h_item, h_user = self.represent(e)
    h = h_item if h_user is None else jnp.concatenate([h_item, h_user], axis=-1)
    h = nn.relu(self.fc1(h))
    h = nn.relu(self.fc2(h))
    out = self.out(h)
    return out[..., 0] if self.out_dim == 1 else out

  def head_one_user(self, e: jax.Array) -> jax.Array:
    """``head`` on rows that all belong to one user, whose user fields are therefore the
    same on every row (e: [..., R, D], the rows on axis -2, row 0 a real one): the user
    tower, ``user_fc`` and its half of ``fc1``, runs once on row 0 and is broadcast to
    the R rows. The same function as ``head`` up to rounding (fc1's dot is split in
    two), with 28-37% fewer multiply-adds per row; the meta-learners' inner loop and
    query pass run on it (:meth:`Backbone.head_user`)."""
    return self.forward_one_user(e)[0]

  def forward_one_user(self, e: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(``head_one_user(e)``, h_item [..., R, P], h_user [..., R, P] or None): the output
    with both representations, the user one computed once and broadcast to the rows."""
    if self.user_fc is None:
      h_item, _ = self.represent(e)
      return self.head(e), h_item, None
    h_item = nn.relu(self.item_fc(e[..., :self.item_dim]))
    h_user = nn.relu(self.user_fc(e[..., :1, self.item_dim:]))
    fc1 = self.fc1.variables["params"]
    split = h_item.shape[-1]
    h = nn.relu(h_item @ fc1["kernel"][:split] + (h_user @ fc1["kernel"][split:] + fc1["bias"]))
    h = nn.relu(self.fc2(h))
    out = self.out(h)
    out = out[..., 0] if self.out_dim == 1 else out
    return out, h_item, jnp.broadcast_to(h_user, h_item.shape[:-1] + h_user.shape[-1:])

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: int32[..., F] -> float32[...] ratings (or [..., C] logits when out_dim > 1)."""
    return self.head(self.embed(x))


def one_step_forward(module: MeLU, params: Params, local_modules: Sequence[str],
                     alpha: jax.Array, e: jax.Array, e_query: jax.Array,
                     support_loss: Callable, *, shared_user: bool,
                     first_order: bool = False) -> tuple[tuple, tuple]:
  """MeLU's forward pass on the query rows after one inner SGD step on a support loss,
  without forming the adapted weights: the *kernel form* of the step.

  One step of a local dense layer ``z = x W + b`` on the support loss moves it to
  ``W' = W - alpha X^T dZ`` and ``b' = b - alpha 1^T dZ``, where X [L, in] holds the
  layer's inputs on the user's L rows and dZ [L, out] the loss gradient at its
  pre-activations. A query row x_q then gives::

      x_q W' + b' = x_q W + b - alpha ((x_q X^T) dZ + 1^T dZ)

  so the per-user products are [Q, in] x [in, L] and [Q, L] x [L, out] instead of the
  weight gradient [in, L] x [L, out] and the adapted layer [Q, in] x [in, out]: at
  Book-Crossing's mean of 32 rows and Q = 10 query rows, 3.4x fewer per-user
  multiply-adds in the forward pass (x_q W is one product with the shared weights for
  the whole batch). The same function up to rounding, the second-order meta-gradient
  included, as autodiff sees the same math. dZ comes from one backward pass to zero
  "taps" added to the local pre-activations. With ``shared_user`` the user tower runs
  once per user on row 0, as in :meth:`MeLU.head_one_user`; fc1's user half then sees
  that row broadcast to all L, so its weight gradient is ``h_u^T (1^T dZ)``.

  Only one step: a second step's support pass would need [L, L] support kernels, which
  cost more than the weight gradients they replace.

  Args:
    module: the MeLU network; params: its parameters; local_modules: the adapted layers.
    alpha: the scalar inner learning rate.
    e: the user's embedded rows [L, D]; e_query: the embedded query rows [Q, D].
    support_loss: ``support_loss((out, h_item, h_user)) -> scalar``: the inner loss of
      the forward pass on the L rows (as :meth:`MeLU.forward_one_user` returns it).
    first_order: stop the gradient through the inner gradient (FOMAML).
  Returns:
    ((out, h_item, h_user) on the query rows after the step, the same on the L rows
    before it); out [R] (or [R, C] for C > 1 outputs), h_user broadcast to the rows or
    None.
  """
  item_dim = module.embed_dim * len(module._used("item"))
  has_user = bool(module._used("user"))
  shared = shared_user and has_user
  split = module.proj_dim
  # In the network's order, not a set's: a set of strings iterates in an order that
  # changes with each process's hash seed, and so would the program built from it (the
  # taps below), which then missed the persistent compilation cache in every new process.
  local = tuple(name for name in ("item_fc", "user_fc", "fc1", "fc2", "out")
                if name in local_modules and (has_user or name != "user_fc"))

  def forward(rows, adjust):
    """The head on ``rows`` with ``adjust(name, z, x) -> z`` applied to each local layer's
    pre-activation z of input x (fc1's input: the item and user halves) -> (output,
    {layer: its input})."""
    def dense(name, x):
      z = x @ params[name]["kernel"] + params[name]["bias"]
      return adjust(name, z, x) if name in local else z

    x_item = rows[:, :item_dim]
    h_item = nn.relu(dense("item_fc", x_item))
    h_user, inputs = None, {"item_fc": x_item}
    if has_user:
      inputs["user_fc"] = rows[:1, item_dim:] if shared else rows[:, item_dim:]
      h_user = nn.relu(dense("user_fc", inputs["user_fc"]))
      w = params["fc1"]["kernel"]
      z = h_item @ w[:split] + (h_user @ w[split:] + params["fc1"]["bias"])
      inputs["fc1"] = (h_item, h_user)
      h = nn.relu(adjust("fc1", z, inputs["fc1"]) if "fc1" in local else z)
    else:
      inputs["fc1"] = h_item
      h = nn.relu(dense("fc1", h_item))
    inputs["fc2"] = h
    inputs["out"] = h = nn.relu(dense("fc2", h))
    out = dense("out", h)
    out = out[..., 0] if module.out_dim == 1 else out
    if h_user is not None:
      h_user = jnp.broadcast_to(h_user, h_item.shape[:-1] + h_user.shape[-1:])
    return (out, h_item, h_user), inputs

  def loss(taps):
    output, inputs = forward(e, lambda name, z, x: z + taps[name])
    return support_loss(output), (output, inputs)

  rows = e.shape[0]
  widths = {"item_fc": split, "user_fc": split, "fc1": module.hidden, "fc2": module.hidden,
            "out": module.out_dim}
  taps = {name: jnp.zeros((1 if name == "user_fc" and shared else rows, widths[name]), e.dtype)
          for name in local}
  dz, (support_output, support) = jax.grad(loss, has_aux=True)(taps)
  if first_order:
    support, dz = jax.lax.stop_gradient((support, dz))

  def step(name, z, x):
    d = dz[name]
    if not isinstance(x, tuple):
      return z - alpha * ((x @ support[name].T) @ d + jnp.sum(d, axis=0))
    (x_item, x_user), (s_item, s_user) = x, support[name]
    # fc1's user half saw one row broadcast to all L when the tower is shared.
    d_user = jnp.sum(d, 0, keepdims=True) if shared else d
    return z - alpha * ((x_item @ s_item.T) @ d + (x_user @ s_user.T) @ d_user
                        + jnp.sum(d, axis=0))

  query_output, _ = forward(e_query, step)
  return query_output, support_output


def one_step_query(module: MeLU, params: Params, local_modules: Sequence[str], alpha: jax.Array,
                   e: jax.Array, y: jax.Array, support: jax.Array, e_query: jax.Array, *,
                   shared_user: bool, first_order: bool = False) -> jax.Array:
  """The query output after one inner SGD step on the masked MSE of the support rows (the
  MAML step of :func:`fast_jax.meta.inner_adapt`), in kernel form
  (:func:`one_step_forward`). e: [L, D]; y: float32[L]; support: bool[L];
  e_query: [Q, D] -> float32[Q] (or [Q, C])."""
  (out, _, _), _ = one_step_forward(
      module, params, local_modules, alpha, e, e_query,
      lambda output: metrics.masked_mse(output[0], y, support), shared_user=shared_user,
      first_order=first_order)
  return out


# Local (inner-loop) modules. The FAST code adapts item_fc, user_fc, fc1, fc2 but, by a
# name typo, not the output layer (docs/methods.md §4); MeLU and CLOVER adapt it too.
FAST_LOCAL = ("item_fc", "user_fc", "fc1", "fc2")
MELU_LOCAL = FAST_LOCAL + ("out",)


def param_labels(params: Params, local_modules: Sequence[str]) -> Params:
  """Pytree of "local"/"global" labels with the structure of ``params``."""
  flat = traverse_util.flatten_dict(params)
  labels = {k: LOCAL if any(part in local_modules for part in k) else GLOBAL for k in flat}
  return traverse_util.unflatten_dict(labels)


def split_params(params: Params, labels: Params) -> tuple[dict, dict]:
  """Split into (local, global) flat dicts keyed by parameter path."""
  flat, flat_labels = traverse_util.flatten_dict(params), traverse_util.flatten_dict(labels)
  local = {k: v for k, v in flat.items() if flat_labels[k] == LOCAL}
  glob = {k: v for k, v in flat.items() if flat_labels[k] != LOCAL}
  return local, glob


def merge_params(local: dict, glob: dict) -> Params:
  """Inverse of :func:`split_params`."""
  return traverse_util.unflatten_dict({**glob, **local})


@functools.partial(jax.jit, static_argnums=0)
def _init_params(module: nn.Module, key: jax.Array, x: jax.Array) -> Params:
  # Jitted once per network (an eager Flax init compiles every initialiser op
  # separately, and a jit made per call compiles again for every seed).
  return module.init(key, x)["params"]


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A network plus its local/global partition: what the meta-learner needs."""
  module: nn.Module
  local_modules: tuple[str, ...]
  user_rows_shared: bool = False

  def init(self, key: jax.Array, x: jax.Array) -> Params:
    return _init_params(self.module, key, x)

  def apply(self, params: Params, x: jax.Array) -> jax.Array:
    """Predictions from raw inputs. x: int32[..., F]."""
    return self.module.apply({"params": params}, x)

  def embed(self, params: Params, x: jax.Array) -> jax.Array:
    """The non-adapted input stage (embedding lookups). x: int32[..., F] -> [..., D]."""
    return self.module.apply({"params": params}, x, method="embed")

  def head(self, params: Params, e: jax.Array) -> jax.Array:
    """The adapted stage: predictions from ``embed``'s output."""
    return self.module.apply({"params": params}, e, method="head")

  def head_user(self, params: Params, e: jax.Array) -> jax.Array:
    """``head`` on the embedded rows of one user (e: [..., R, D], row 0 a real row): the
    module's ``head_one_user`` when ``user_rows_shared`` (every user's user fields are
    the same on all its rows, :func:`user_rows_shared`), else ``head``."""
    if not self.user_rows_shared:
      return self.head(params, e)
    return self.module.apply({"params": params}, e, method="head_one_user")

  @property
  def kernel_form(self) -> bool:
    """Whether one inner step can run in kernel form (:func:`one_step_forward`): MeLU's
    network; any other adapts its parameters and calls :meth:`head_user`."""
    return isinstance(self.module, MeLU)

  def one_step_query(self, params: Params, alpha: jax.Array, e: jax.Array, y: jax.Array,
                     support: jax.Array, e_query: jax.Array, *,
                     first_order: bool = False) -> jax.Array:
    """The query output after one inner SGD step on one user's embedded rows, in kernel
    form (:func:`one_step_query`; only when :attr:`kernel_form`)."""
    return one_step_query(self.module, params, self.local_modules, alpha, e, y, support,
                          e_query, shared_user=self.user_rows_shared, first_order=first_order)

  def user_repr(self, params: Params, e: jax.Array) -> jax.Array | None:
    """Per-row user representation from ``embed``'s output (CLOVER's adversary input)."""
    return self.module.apply({"params": params}, e, method=lambda m, e: m.represent(e)[1])

  def labels(self, params: Params) -> Params:
    return param_labels(params, self.local_modules)


def user_rows_shared(fields: Sequence[Field], *splits) -> bool:
  """Whether, in every given split (objects with ``x`` int[U, L, F] and ``length``
  int[U]), each user's user-field columns hold the same values on all its valid rows:
  the condition under which :meth:`MeLU.head_one_user` equals ``head``."""
  cols = [c for f in fields if f.side == "user" for c in range(f.start, f.stop)]
  if not cols:
    return False
  for split in splits:
    x = np.asarray(split.x)[..., cols]
    valid = np.arange(x.shape[1])[None, :] < np.asarray(split.length)[:, None]
    if not np.all((x == x[:, :1]).all(-1) | ~valid):
      return False
  return True


def make_backbone(meta: dict, *, local_output: bool = False, drop_sensitive: bool = False,
                  torch_init: bool = True, out_bias: float | tuple[float, ...] | None = None,
                  out_dim: int = 1, user_rows_shared: bool = False,
                  embed_dim: int = 32, hidden: int = 64) -> Backbone:
  """The MeLU/MetaCS network for a prepared dataset's ``meta.json``."""
  fields = fields_from_meta(meta)
  drop = sensitive_fields(meta) if drop_sensitive else ()
  module = MeLU(fields=fields, embed_dim=embed_dim, proj_dim=embed_dim, hidden=hidden,
                out_dim=out_dim, drop_fields=drop, torch_init=torch_init, out_bias=out_bias)
  return Backbone(module=module, local_modules=MELU_LOCAL if local_output else FAST_LOCAL,
                  user_rows_shared=user_rows_shared)
