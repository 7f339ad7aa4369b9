"""Inner loop (MAML-style local adaptation) and support/query masks.

One user's adaptation is written once (:func:`inner_adapt`) and ``jax.vmap``-ped over
the users of a batch. Support and query sets are boolean masks over a user's padded
rows, never re-padded copies:

* ``last``: the query is the last ``Q`` valid rows (evaluation, and the paper's text);
* ``random``: a fresh random ``Q`` of the valid rows per use (the FAST code's training).

The query is also given as row indices, so its forward pass touches only ``Q`` rows.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fast_jax import metrics
from fast_jax.models import merge_params, split_params

QUERY_SIZE = 10
Params = Any


def last_query_split(length: jax.Array, max_len: int, q: int = QUERY_SIZE):
  """The last ``q`` valid rows as query, the rows before them as support.

  Args:
    length: int32[...] valid rows per user (>= q + 1).
  Returns:
    (support bool[..., L], query_idx int32[..., q]) -- the query as row indices, so the
    query forward pass runs on q rows instead of all L padded rows.
  """
  pos = jnp.arange(max_len)
  support = pos < length[..., None] - q
  query_idx = length[..., None] - q + jnp.arange(q)
  return support, query_idx.astype(jnp.int32)


def random_query_split(key: jax.Array, length: jax.Array, max_len: int, q: int = QUERY_SIZE):
  """``q`` valid rows per user drawn uniformly without replacement as query; the other
  valid rows are the support (a fresh permutation per use, as in the FAST code)."""
  pos = jnp.arange(max_len)
  valid = pos < length[..., None]
  noise = jnp.where(valid, jax.random.uniform(key, valid.shape), -1.0)
  _, query_idx = jax.lax.top_k(noise, q)
  is_query = jnp.any(pos[..., None] == query_idx[..., None, :], axis=-1)
  return valid & ~is_query, query_idx.astype(jnp.int32)


def query_split(key: jax.Array, length: jax.Array, max_len: int, mode: str):
  """(support mask bool[..., L], query row indices int32[..., Q]) for ``mode``."""
  if mode == "last":
    return last_query_split(length, max_len)
  if mode == "random":
    return random_query_split(key, length, max_len)
  raise ValueError(f"unknown query split {mode!r}; expected 'last' or 'random'")


def take_rows(a: jax.Array, idx: jax.Array) -> jax.Array:
  """Rows ``idx`` (int[B, Q]) of a per-user array ``a`` ([B, L, ...]) -> [B, Q, ...]."""
  idx = idx.reshape(idx.shape + (1,) * (a.ndim - 2))
  return jnp.take_along_axis(a, idx, axis=1)


def inner_adapt(apply_fn: Callable, params: Params, labels: Params, alpha: Any,
                x: jax.Array, y: jax.Array, support: jax.Array, *, steps: int = 1,
                first_order: bool = False, loss_fn: Callable | None = None) -> Params:
  """Adapt the local parameters to one user with ``steps`` SGD steps on its support set.

  theta_loc <- theta_loc - alpha * grad_{theta_loc} L_s(theta)   (MAML / MeLU local update)

  Args:
    apply_fn: ``apply_fn(params, x) -> prediction``.
    params: the meta-parameters theta.
    labels: pytree of "local"/"global" labels with the structure of ``params``.
    alpha: inner learning rate: a scalar (MeLU, MetaCS scalar) or a flat dict with the
      structure of the local parameters (Meta-SGD style per-parameter rates).
    x: the user's inputs [L, ...] (raw features or embedded rows); y: float32[L];
      support: bool[L].
    steps: number of inner SGD steps (``lax.scan``).
    first_order: stop the gradient through the inner gradient (FOMAML); by default the
      meta-gradient is second order, as in the FAST code.
    loss_fn: ``loss_fn(pred, y, mask) -> scalar``; the masked MSE by default.
  Returns:
    the adapted parameters theta_u (same structure as ``params``).
  """
  loss_fn = loss_fn or metrics.masked_mse
  local, glob = split_params(params, labels)
  rates = alpha if isinstance(alpha, dict) else jax.tree.map(lambda _: alpha, local)

  def support_loss(loc):
    return loss_fn(apply_fn(merge_params(loc, glob), x), y, support)

  def sgd_step(loc, _):
    grads = jax.grad(support_loss)(loc)
    if first_order:
      grads = jax.lax.stop_gradient(grads)
    return jax.tree.map(lambda p, g, a: p - a * g, loc, grads, rates), None

  local, _ = jax.lax.scan(sgd_step, local, None, length=steps)
  return merge_params(local, glob)


def adapted_query_predictions(apply_fn: Callable, params: Params, labels: Params,
                                alpha: Any, x: jax.Array, y: jax.Array, support: jax.Array,
                                query_idx: jax.Array, *, steps: int,
                                first_order: bool = False) -> jax.Array:
  """Query-row predictions of a batch of users, each after its own adaptation.

  Args:
    x: [B, L, ...] inputs of ``apply_fn``; y: float32[B, L]; support: bool[B, L];
    query_idx: int32[B, Q] query rows.
  Returns:
    float32[B, Q].
  """
  x_query = take_rows(x, query_idx)

  def one_user(x_u, y_u, s_u, xq_u):
    theta_u = inner_adapt(apply_fn, params, labels, alpha, x_u, y_u, s_u, steps=steps,
                          first_order=first_order)
    return apply_fn(theta_u, xq_u)
  return jax.vmap(one_user)(x, y, support, x_query)
