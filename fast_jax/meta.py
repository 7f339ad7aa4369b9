"""Inner loop (MAML-style local adaptation) and support/query masks.

One user's adaptation is written once (:func:`inner_adapt`) and ``jax.vmap``-ped over
the users of a batch. Support and query sets are boolean masks over a user's padded
rows, never re-padded copies:

* ``last``: the query is the last ``Q`` valid rows (evaluation, and the paper's text);
* ``random``: a fresh random ``Q`` of the valid rows per use (the FAST code's training).

The query is also given as row indices, so its forward pass touches only ``Q`` rows. A
training step then lays each user's rows out *query first* (:func:`query_first`): its
query rows, then its support rows, so that the inner loop runs on the rows after the
query's and no longer carries the query rows as masked padding.

Users are padded to the longest user's ``L`` rows, but most have far fewer (mean 32 of
100 on Book-Crossing), and the inner loop's cost grows with the rows it runs on. So a
training batch can be run *by length* (:func:`by_rows`): its users sorted by the rows
they use and split into equal parts, each part on only the first ``n_j`` rows, with a
static ``n_j`` per part (:func:`row_budgets`, from the training lengths) and a fall-back
to all ``L`` rows for a part whose users do not fit. Padding rows are masked out, so the
result is the same up to floating-point reassociation. Each part chooses with a
``lax.cond``; a training step makes the choices once, around its gradient
(:func:`switch_parts`), so that autodiff never sees the ``cond``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fast_jax import metrics
from fast_jax.dataset import QUERY_SIZE
from fast_jax.models import merge_params, split_params

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


def query_first(support: jax.Array, query_idx: jax.Array, *rows: jax.Array):
  """A batch's rows laid out *query first*: each user's ``Q`` query rows (in the order of
  ``query_idx``), then its support rows (in their order), then its other rows.

  A training step's inner loop then runs on rows ``Q:`` and its query on rows ``:Q``
  (``query_first=True`` in :func:`fast_jax.methods.learner.predict`), so the inner loop
  no longer carries the ``Q`` query rows of each user as masked padding: 10 of the 56
  rows of ML-1M's shorter length part. A user still uses its first ``length`` rows, so
  the row budgets of :func:`by_rows` stay the same.

  Args:
    support: bool[B, L]; query_idx: int32[B, Q] (rows that are not in the support);
    rows: per-user arrays [B, L, ...] (inputs, ratings).
  Returns:
    (support bool[B, L], query_idx int32[B, Q] = 0..Q-1, *rows re-laid).
  """
  order = _query_first_order(support, query_idx)
  q = query_idx.shape[-1]
  moved = tuple(take_rows(a, order) for a in rows)
  new_query = jnp.broadcast_to(jnp.arange(q, dtype=jnp.int32), query_idx.shape)
  return (take_rows(support, order), new_query) + moved


def _query_first_order(support: jax.Array, query_idx: jax.Array) -> jax.Array:
  """int32[..., L]: the rows of :func:`query_first`'s layout, ``order[k]`` the row that
  goes to place k: the query rows in the order of their first entry in ``query_idx``,
  then the support rows, then the others, each in row order. Each row's place is counted
  (cumulative sums) and the rows go to their places by a scatter, rather than sorting
  rank keys: the same order, without a [B, L] sort (two a step, the parts' choice and
  the layout; EXPERIMENTS.md, Speed)."""
  num_rows = support.shape[-1]
  pos = jnp.arange(num_rows)
  is_query = pos[..., None] == query_idx[..., None, :]                   # [..., L, Q]
  in_query = jnp.any(is_query, -1)
  # An entry of query_idx that repeats an earlier one names no new row.
  same = query_idx[..., :, None] == query_idx[..., None, :]              # [..., Q, Q]
  earlier = jnp.tril(jnp.ones(same.shape[-2:], bool), -1)
  new_entry = ~jnp.any(same & earlier, -1)
  entry_place = jnp.cumsum(new_entry, -1) - 1
  query_place = jnp.take_along_axis(entry_place, jnp.argmax(is_query, -1), -1)
  n_query = jnp.sum(new_entry, -1, keepdims=True)
  in_support, rest = support & ~in_query, ~support & ~in_query
  n_support = jnp.sum(in_support, -1, keepdims=True)
  after_query = jnp.where(in_support, jnp.cumsum(in_support, -1),
                          n_support + jnp.cumsum(rest, -1)) - 1
  place = jnp.where(in_query, query_place, n_query + after_query).astype(jnp.int32)
  rows = jnp.broadcast_to(pos.astype(jnp.int32), place.shape)
  return jnp.put_along_axis(jnp.zeros_like(place), place, rows, axis=-1, inplace=False)


def take_rows(a: jax.Array, idx: jax.Array) -> jax.Array:
  """Rows ``idx`` (int[B, Q]) of a per-user array ``a`` ([B, L, ...]) -> [B, Q, ...]."""
  idx = idx.reshape(idx.shape + (1,) * (a.ndim - 2))
  return jnp.take_along_axis(a, idx, axis=1)


# Inner loops this short run unrolled: XLA then neither stacks each step's activations for
# the second-order backward pass nor copies them out of a loop. On a 2-core CPU a 3-step
# MeLU epoch runs x1.13 faster (ML-1M) and a 3-step MeLU+CLOVER epoch x1.34 faster
# (ML-100K), for 3-5 s more compilation; 1-step loops (Book-Crossing MeLU) run as before.
UNROLL_STEPS = 8


def sgd(grads_fn: Callable, params: Params, rates: Params, *, steps: int,
        first_order: bool = False) -> Params:
  """``steps`` SGD steps ``params <- params - rates * grads_fn(params)`` (``lax.scan``,
  unrolled up to :data:`UNROLL_STEPS` steps).

  The one inner loop of every method: ``params`` and ``rates`` are pytrees of the same
  structure (CLOVER's carry both players, each with its own rates); ``first_order``
  stops the gradient through the inner gradients (FOMAML).
  """
  def step(p, _):
    grads = grads_fn(p)
    if first_order:
      grads = jax.lax.stop_gradient(grads)
    return jax.tree.map(lambda p, g, a: p - a * g, p, grads, rates), None

  params, _ = jax.lax.scan(step, params, None, length=steps,
                          unroll=steps <= UNROLL_STEPS)
  return params


def local_rates(alpha: Any, local: dict) -> dict:
  """Per-parameter rates of the local parameters: ``alpha`` itself when it is already a
  dict of them (Meta-SGD style), else the scalar ``alpha`` for every one."""
  return alpha if isinstance(alpha, dict) else jax.tree.map(lambda _: alpha, local)


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

  def support_loss(loc):
    return loss_fn(apply_fn(merge_params(loc, glob), x), y, support)

  local = sgd(jax.grad(support_loss), local, local_rates(alpha, local), steps=steps,
              first_order=first_order)
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


def row_budgets(lengths: np.ndarray, batch_size: int, max_len: int, *, parts: int = 4,
                quantile: float = 0.9, multiple: int = 8, draws: int = 2000,
                seed: int = 0, max_short: float = 0.75) -> tuple[int, ...]:
  """Static row budgets for the ``parts`` length-sorted parts of a training batch.

  Part ``j``'s budget is the ``quantile`` of its longest user's length over ``draws``
  random batches of ``lengths`` (rounded up to a ``multiple``); the last part always
  gets ``max_len``. Returns () (run whole batches) when ``parts <= 1``, when
  ``batch_size`` is not a multiple of ``parts``, or when the shortest part would still
  need more than ``max_short`` of ``max_len`` rows (too little saved for the extra
  compilation, each shorter part compiling the inner loop once more, and for the
  choice around it).
  """
  if parts <= 1 or batch_size % parts or len(lengths) == 0:
    return ()
  rng = np.random.default_rng(seed)
  batches = np.sort(rng.choice(np.asarray(lengths), (draws, batch_size)), axis=1)
  longest = batches.reshape(draws, parts, batch_size // parts).max(axis=2)
  budgets = np.ceil(np.quantile(longest, quantile, axis=0) / multiple) * multiple
  budgets = np.minimum(budgets, max_len).astype(int)
  budgets[-1] = max_len
  return tuple(int(b) for b in budgets) if budgets[0] <= max_short * max_len else ()


def rows_used(support: jax.Array, query_idx: jax.Array) -> jax.Array:
  """int32[B]: 1 + the last row a user's support or query touches."""
  pos = jnp.arange(1, support.shape[-1] + 1)
  last_support = jnp.max(jnp.where(support, pos, 0), axis=-1)
  return jnp.maximum(last_support, jnp.max(query_idx, axis=-1) + 1).astype(jnp.int32)


def by_rows(fn: Callable, support: jax.Array, query_idx: jax.Array, *rows: jax.Array,
            budgets: Sequence[int] = (), cut: Sequence[bool] | None = None) -> Any:
  """``fn(support, query_idx, *rows)`` run on length-sorted parts of the batch, each on
  only the rows it needs (see the module docstring).

  Args:
    fn: per-user computation in which a user's rows at or beyond
      :func:`rows_used` do not matter (masked padding); returns arrays (or a pytree of
      arrays) with the users on axis 0.
    support: bool[B, L]; query_idx: int32[B, Q] (not cut); rows: other per-user arrays,
      [B, L, ...] ones (inputs, ratings) cut with the support mask, [B] ones (groups) only
      reordered.
    budgets: from :func:`row_budgets`; () runs ``fn`` on the whole batch.
    cut: per part, whether it runs on its budget (True) or on all rows (False), decided
      outside (:func:`parts_fit`, as :func:`switch_parts` does); None: each part decides
      with a ``lax.cond`` on its longest user.
  Returns:
    ``fn``'s output for every user, in the batch's order.
  """
  batch, max_len = support.shape
  if not budgets or batch % len(budgets):
    return fn(support, query_idx, *rows)
  size = batch // len(budgets)
  need = rows_used(support, query_idx)
  order = jnp.argsort(need)
  need = need[order]
  arrays = [a[order] for a in (support, query_idx) + rows]
  first_rows = lambda a, n: a[:, :n] if a.ndim > 1 else a
  outs = []
  for j, budget in enumerate(budgets):
    part = [a[j * size:(j + 1) * size] for a in arrays]
    if budget >= max_len:
      outs.append(fn(*part))
      continue

    def short(part, n=budget):
      s, q, *r = part
      return fn(s[:, :n], q, *(first_rows(a, n) for a in r))
    if cut is not None:
      outs.append(short(part) if cut[j] else fn(*part))
      continue
    fits = need[(j + 1) * size - 1] <= budget  # sorted: the part's last user is its longest
    outs.append(jax.lax.cond(fits, short, lambda part: fn(*part), part))
  back = jnp.argsort(order)
  return jax.tree.map(lambda *o: jnp.concatenate(o)[back], *outs)


def whole_batch(fn: Callable, support: jax.Array, query_idx: jax.Array, *rows: jax.Array) -> Any:
  """``fn(support, query_idx, *rows)`` on the whole batch (the no-bucketing wrapper)."""
  return fn(support, query_idx, *rows)


def parts_fit(support: jax.Array, query_idx: jax.Array, budgets: Sequence[int]) -> jax.Array:
  """bool[P]: whether each of :func:`by_rows`'s length-sorted parts fits its budget (its
  longest user's :func:`rows_used` at most the budget), as ``by_rows`` decides it."""
  size = support.shape[0] // len(budgets)
  need = jnp.sort(rows_used(support, query_idx))
  return jnp.stack([need[(j + 1) * size - 1] <= b for j, b in enumerate(budgets)])


@dataclasses.dataclass(frozen=True)
class ByLength:
  """A batch runner by length: :func:`by_rows` with ``budgets`` (and ``cut``, a static
  pattern, when :func:`switch_parts` has chosen it), called as
  ``run(fn, support, query_idx, *rows)``."""
  budgets: tuple[int, ...]
  cut: tuple[bool, ...] | None = None

  def __call__(self, fn: Callable, support: jax.Array, query_idx: jax.Array,
               *rows: jax.Array) -> Any:
    return by_rows(fn, support, query_idx, *rows, budgets=self.budgets, cut=self.cut)


def length_bucketing(budgets: Sequence[int]) -> Callable:
  """The batch runner chosen once per method: :class:`ByLength` with ``budgets``, or
  :func:`whole_batch` when there are none. Both are called as
  ``run(fn, support, query_idx, *rows)``."""
  if not budgets:
    return whole_batch
  return ByLength(tuple(budgets))


def switch_parts(run: Callable, f: Callable, support: jax.Array, query_idx: jax.Array) -> Any:
  """``f(run)``, with the parts' choices of a runner by length made once, outside ``f``.

  ``f(runner)`` calls the runner on ``support`` and ``query_idx`` (as given here), e.g. a
  loss and its gradient. Inside a differentiated function, :func:`by_rows`'s
  ``lax.cond`` per part makes autodiff carry both sides' residuals through the forward
  pass, the side not taken filled with zeros. Here :func:`parts_fit` picks the pattern
  of cut parts first and one ``lax.switch`` runs ``f`` with a runner that cuts by that
  static pattern, so each branch differentiates plain code: on a 2-core CPU, epochs of
  2 parts x0.78-0.93 (MeLU+FAST), x0.80-0.82 (MeLU+CLOVER) (EXPERIMENTS.md, Speed). The
  same function up to rounding; each branch is a copy of ``f`` (two with two parts).
  Any other ``run`` (:func:`whole_batch`, a :class:`ByLength` already cut, or a callable
  of one's own): ``f(run)``.
  """
  if not isinstance(run, ByLength) or run.cut is not None:
    return f(run)
  budgets = run.budgets
  shorter = [j for j, b in enumerate(budgets) if b < support.shape[-1]]
  if not shorter or support.shape[0] % len(budgets):
    return f(run)
  fits = parts_fit(support, query_idx, budgets)
  index = sum(fits[j].astype(jnp.int32) << k for k, j in enumerate(shorter))

  def branch(pattern: int) -> Callable:
    cut = [False] * len(budgets)
    for k, j in enumerate(shorter):
      cut[j] = bool(pattern >> k & 1)
    return lambda: f(ByLength(budgets, tuple(cut)))
  return jax.lax.switch(index, [branch(i) for i in range(2 ** len(shorter))])
