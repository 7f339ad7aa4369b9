"""A backbone as a meta-learner: its inner-loop policy and the adapted predictions.

Two concepts, kept apart from the network:

* the **inner-rate policy** (:class:`InnerRate`): the inner learning rate alpha is fixed
  (MeLU), or learned as a scalar or per local parameter (MetaCS, the FAST code: after the
  outer step, Adam on alpha against the query loss of a second pass);
* the **learner** (:class:`Learner`): how one user's recommender is adapted on its
  support rows. Its query predictions (:func:`predict`) and user representations
  (:func:`represent`) are written once for every method.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fast_jax import meta, metrics
from fast_jax.config import Config
from fast_jax.models import Backbone, make_backbone, split_params

Params = Any


class InnerRate(NamedTuple):
  """The inner learning rate alpha: its initial value and, when learned, its optimizer.

  init: ``init(params, labels) -> alpha`` (a scalar, or a dict of per-parameter rates
    with the structure of the local parameters).
  tx: Adam on alpha, or None when alpha stays fixed.
  """
  init: Callable
  tx: optax.GradientTransformation | None


def inner_rate(cfg: Config) -> InnerRate:
  """The policy of ``cfg.backbone``: MetaCS learns alpha (``cfg.alpha_mode`` scalar or
  per-param, Adam at the outer ``cfg.lr``); MeLU keeps ``cfg.inner_lr``."""
  if cfg.backbone == "metacs" and cfg.alpha_mode == "per-param":
    def init(params, labels):
      local, _ = split_params(params, labels)
      return jax.tree.map(lambda v: jnp.full_like(v, cfg.inner_lr), local)
  else:
    def init(params, labels):
      return jnp.asarray(cfg.inner_lr, jnp.float32)
  return InnerRate(init, optax.adam(cfg.lr) if cfg.backbone == "metacs" else None)


def learn_rate(rate: InnerRate, alpha, opt_state, loss_fn: Callable):
  """One Adam step of a learned alpha on ``loss_fn(alpha) -> scalar`` (no-op if fixed).
  Returns (alpha, opt_state)."""
  if rate.tx is None:
    return alpha, opt_state
  grads = jax.grad(loss_fn)(alpha)
  updates, opt_state = rate.tx.update(grads, opt_state, alpha)
  return optax.apply_updates(alpha, updates), opt_state


def learn_rate_by_parts(rate: InnerRate, alpha, opt_state, loss_fn: Callable, run: Callable,
                       support: jax.Array, query_idx: jax.Array):
  """:func:`learn_rate` on ``loss_fn(alpha, run) -> scalar``, a loss of a training batch's
  :func:`predict` through the batch runner ``run``, whose parts are chosen outside the
  gradient (:func:`switch_parts`) on ``support`` and ``query_idx`` as that predict sees
  them (laid out by :func:`lay_out`)."""
  if rate.tx is None:
    return alpha, opt_state
  return switch_parts(
      run, lambda run: learn_rate(rate, alpha, opt_state, lambda a: loss_fn(a, run)), support,
      query_idx)


class Learner(NamedTuple):
  """A backbone adapted per user.

  adapt: ``adapt(params, alpha, e_u, y_u, s_u, g_u) -> theta_u``: one user's adapted
    recommender parameters from its embedded rows e_u [L, D], ratings float[L], support
    bool[L] and group (int scalar).
  recommender: ``recommender(params) -> the backbone's parameters`` (CLOVER's params also
    hold its adversaries).
  readout: ``readout(head output) -> rating`` (CLOVER's ``--loss ce``: argmax + min).
  adapt_for_repr: the adaptation behind the attacker's representations (default adapt).
  query_output: ``query_output(params, alpha, e_u, y_u, s_u, g_u, eq_u) -> head output``
    on the query rows eq_u after the adaptation, computed without forming theta_u (one
    step in kernel form, :meth:`Backbone.one_step_query`); :func:`predict` uses it in
    place of ``adapt`` + ``head_user`` when set and alpha is a scalar.
  """
  backbone: Backbone
  labels: Params
  adapt: Callable
  recommender: Callable = lambda params: params
  readout: Callable = lambda out: out
  adapt_for_repr: Callable | None = None
  query_output: Callable | None = None


# One-step MAML runs in kernel form (Backbone.one_step_query; CLOVER's players too): on a
# 2-core CPU an epoch of every one-step row (MeLU on Book-Crossing, MetaCS and MetaCS+CLOVER
# on all three datasets) ran x1.18-1.31 faster alone, x1.06-1.17 beside a second job; the
# same function up to rounding (EXPERIMENTS.md, Speed). bench.py --inner-forms times both.
ONE_STEP_KERNEL = True


def maml(backbone: Backbone, labels: Params, *, steps: int, first_order: bool) -> Learner:
  """MAML's local update (:func:`fast_jax.meta.inner_adapt`) of the backbone's head; a
  single step's query output in kernel form when the backbone has one
  (:data:`ONE_STEP_KERNEL`)."""

  def adapt(params, alpha, e_u, y_u, s_u, g_u):
    return meta.inner_adapt(backbone.head_user, params, labels, alpha, e_u, y_u, s_u, steps=steps,
                            first_order=first_order)

  def query_output(params, alpha, e_u, y_u, s_u, g_u, eq_u):
    return backbone.one_step_query(params, alpha, e_u, y_u, s_u, eq_u, first_order=first_order)
  direct = ONE_STEP_KERNEL and steps == 1 and backbone.kernel_form
  return Learner(backbone, labels, adapt, query_output=query_output if direct else None)


def predict(learner: Learner, params, alpha, x, y, support, query_idx, group, *,
            run: Callable = meta.whole_batch, adapt: bool = True,
            query_first: bool = False, laid_out: bool = False) -> jax.Array:
  """Adapted query predictions. x: int32[B, L, F]; y, support: [B, L]; query_idx:
  int32[B, Q]; group: int32[B] -> float32[B, Q].

  Embeddings are global, so they are looked up once, outside the inner loop; only the
  head runs inside each user's adaptation. ``run`` is the batch runner
  (:func:`fast_jax.meta.length_bucketing`). ``adapt=False`` switches the inner loop off:
  the meta-parameters' own predictions, through the same readout (what
  :mod:`fast_jax.diagnostics` compares the adapted ones with). ``query_first``: lay the
  rows out query first and run the inner loop on the rows after the query's
  (:func:`lay_out`; a training step passes :data:`QUERY_FIRST`). ``laid_out``: the rows
  already are as :func:`lay_out` with ``query_first`` gives them (a training step lays
  its batch out once, before choosing its parts).
  """
  backbone, rec = learner.backbone, learner.recommender(params)
  direct = adapt and learner.query_output is not None and not isinstance(alpha, dict)
  if not laid_out:
    x, y, support, query_idx = lay_out(x, y, support, query_idx, query_first)

  def part(support, query_idx, x, y, group):
    e = backbone.embed(rec, x)
    e_query, e, y, support = query_rows(e, y, support, query_idx, query_first)

    def one_user(e_u, y_u, s_u, g_u, eq_u):
      if direct:
        return learner.readout(learner.query_output(params, alpha, e_u, y_u, s_u, g_u, eq_u))
      theta_u = learner.adapt(params, alpha, e_u, y_u, s_u, g_u) if adapt else rec
      return learner.readout(backbone.head_user(theta_u, eq_u))
    return jax.vmap(one_user)(e, y, support, group, e_query)
  return run(part, support, query_idx, x, y, group)


# A training step lays its batch out query first (meta.query_first), so that the inner
# loop skips the query rows. On a 2-core CPU, epochs run alternately in one process beside
# a second such process: ML-1M MeLU+FAST x0.91, MeLU+CLOVER x0.95, MetaCS+FAST x0.97,
# Book-Crossing MeLU+FAST x0.93 (EXPERIMENTS.md, Speed). The same function up to
# rounding; False keeps the rows where they are (what tests/test_query_first.py compares).
QUERY_FIRST = True


# A training step by length chooses its parts outside its gradient (meta.switch_parts):
# on a 2-core CPU, epochs run alternately in one process, MeLU+FAST x0.78 (ML-100K) to
# x0.93 (Book-Crossing), MeLU+CLOVER x0.80-0.82 (EXPERIMENTS.md, Speed). The same function
# up to rounding; False leaves each part's lax.cond inside the gradient (what bench.py
# --part-choice compares).
PARTS_OUTSIDE_GRAD = True


def switch_parts(run: Callable, f: Callable, support: jax.Array, query_idx: jax.Array) -> Any:
  """``f(run)`` with a runner by length's parts chosen outside ``f``
  (:func:`fast_jax.meta.switch_parts`, when :data:`PARTS_OUTSIDE_GRAD`), on ``support``
  and ``query_idx`` as ``f``'s :func:`predict` sees them (laid out by :func:`lay_out`:
  the choice must see the layout the parts run on)."""
  if not PARTS_OUTSIDE_GRAD or not isinstance(run, meta.ByLength):
    return f(run)
  return meta.switch_parts(run, f, support, query_idx)


class Rows(NamedTuple):
  """A batch's rows as the inner loop sees them (:func:`lay_out`)."""
  x: jax.Array          # int32[B, L, F]
  y: jax.Array          # float32[B, L]
  support: jax.Array    # bool[B, L]
  query_idx: jax.Array  # int32[B, Q]


def lay_out(x: jax.Array, y: jax.Array, support: jax.Array, query_idx: jax.Array,
            query_first: bool) -> Rows:
  """The rows laid out query first (:func:`fast_jax.meta.query_first`) when
  ``query_first``, else as they are."""
  if not query_first:
    return Rows(x, y, support, query_idx)
  support, query_idx, x, y = meta.query_first(support, query_idx, x, y)
  return Rows(x, y, support, query_idx)


def query_rows(e: jax.Array, y: jax.Array, support: jax.Array, query_idx: jax.Array,
               query_first: bool):
  """(query rows of e, then e, y and support as the inner loop sees them): with
  ``query_first`` (rows from :func:`lay_out`) the first ``Q`` rows and the rows after them,
  else the rows ``query_idx`` and all rows, the query's masked out of the support."""
  if query_first:
    q = query_idx.shape[-1]
    return e[:, :q], e[:, q:], y[:, q:], support[:, q:]
  return meta.take_rows(e, query_idx), e, y, support


def represent(learner: Learner, params, alpha, x, y, support, valid, group):
  """Each user's adapted user representation: the mean over its valid rows of the
  user-tower output (``user_fc``) after its inner adaptation on ``support``.

  x: int32[B, L, F]; y: float32[B, L]; support, valid: bool[B, L]; group: int32[B]
  -> float32[B, D], or None when the backbone has no user representation.
  """
  backbone, rec = learner.backbone, learner.recommender(params)
  adapt = learner.adapt_for_repr or learner.adapt
  e = backbone.embed(rec, x)

  def one_user(e_u, y_u, s_u, g_u, v_u):
    h = backbone.user_repr(adapt(params, alpha, e_u, y_u, s_u, g_u), e_u)
    return None if h is None else metrics.masked_mean(h, v_u[:, None], axis=0)
  return jax.vmap(one_user)(e, y, support, group, valid)


def query_errors(pred: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-user MSE and MAE of query predictions. pred, y: float[B, Q] -> (float[B], float[B])."""
  err = pred - y
  return jnp.mean(jnp.square(err), -1), jnp.mean(jnp.abs(err), -1)


def network(ctx, *, out_dim: int = 1) -> tuple[Backbone, Params]:
  """The configured MeLU/MetaCS network of the context's dataset and its local/global
  labels. ``--out-bias mean`` starts the output at the training ratings: the bias at
  their mean for a rating output, at the log of each rating class's training frequency
  for ``out_dim`` > 1 class logits (:func:`class_log_priors`). When every user's user
  fields are the same on all its rows (the built-in datasets), the per-user passes run
  the user tower once per user (:func:`fast_jax.models.user_rows_shared`)."""
  cfg = ctx.cfg
  bias = None
  if cfg.out_bias == "mean":
    bias = ctx.train_mean if out_dim == 1 else class_log_priors(ctx, out_dim)
  backbone = make_backbone(ctx.data.meta, local_output=cfg.local_output,
                           drop_sensitive=cfg.drop_sensitive, torch_init=cfg.init == "torch",
                           out_bias=bias, out_dim=out_dim,
                           user_rows_shared=ctx.user_rows_shared)
  shapes = jax.eval_shape(backbone.init, jax.random.key(0), ctx.splits["train"]["x"][0])
  return backbone, backbone.labels(shapes)


def class_log_priors(ctx, num_classes: int) -> tuple[float, ...]:
  """log of the share of each rating class (class c is the rating ``min + c`` of the
  dataset's scale) among the training users' ratings, a class never seen counted as half
  a rating: softmax of these logits is the training distribution, whose argmax is its mode
  and whose expectation is its mean (up to that smoothing)."""
  train = ctx.data.train
  rmin = float(ctx.data.meta["rating"]["min"])
  classes = np.clip(np.round(train.y[train.mask] - rmin), 0, num_classes - 1).astype(int)
  counts = np.bincount(classes, minlength=num_classes).astype(np.float64)
  counts = np.where(counts > 0, counts, 0.5)
  return tuple(float(v) for v in np.log(counts / counts.sum()))


def length_parts(ctx, *, backend: str | None = None) -> int:
  """Parts of a batch run by length: ``cfg.length_parts``, or by default, on a CPU,
  2 on runs of at least 500 training steps, where the time saved (x1.02-1.38 per epoch
  idle, x1.2-1.3 with two jobs sharing a 2-core CPU; EXPERIMENTS.md) outweighs the
  longer compilation (4-5 s more on that CPU, idle), and 1 on shorter runs. So too with
  one inner step in kernel form: alone such an epoch gains x0.7-1.2 from the parts, but
  as two jobs at once, as a Table 2 block runs, Book-Crossing's block took 2,244 s in
  parts against 2,481 s on whole batches (EXPERIMENTS.md, Speed; two alike runs outside
  a block were as fast or faster whole, which is not yet explained). On a GPU or
  TPU (``backend``: default JAX's) whole batches: there the parts cost more than the
  padded rows they save (a Book-Crossing MeLU+FAST epoch on an H200: 0.034 s in parts,
  0.021 s whole)."""
  if ctx.cfg.length_parts is not None:
    return ctx.cfg.length_parts
  if (backend or jax.default_backend()) != "cpu":
    return 1
  return 2 if ctx.num_train_steps >= 500 else 1


def row_budgets(ctx, *, max_short: float = 0.75) -> tuple[int, ...]:
  """Row budgets of a training batch's length-sorted parts (:func:`fast_jax.meta.row_budgets`);
  () (whole batches) when the users are split across devices."""
  if ctx.mesh is not None:
    return ()
  return meta.row_budgets(np.asarray(ctx.data.train.length), ctx.cfg.batch_size, ctx.max_len,
                          parts=length_parts(ctx), max_short=max_short)


def batch_runner(ctx, *, by_length: bool, max_short: float = 0.75) -> Callable:
  """The batch runner of a training step, chosen once: by length
  (:func:`fast_jax.meta.by_rows`) when asked and worth it (:func:`row_budgets`), whole
  batches otherwise."""
  return meta.length_bucketing(row_budgets(ctx, max_short=max_short) if by_length else ())
