"""CLOVER (Wei & He, KDD 2022): adversarial fair meta-learning, on any backbone.

Spec: docs/methods.md §6 (§6.1-6.2 method, §6.3 attacker, §6.4 presets, §6.5 the code's
bugs). Two players share each meta-batch. The *recommender* (the backbone, parameters
theta_R, local part theta_L) and the *adversary* (A1 and optionally A2, parameters
theta_A, all local)::

    L_adv = CE_A1 + (lambda_2 / lambda_1) * CE_A2                     (docs/methods.md §6.1)
    inner loop, K steps on the support, both players stepping from the same point:
        phi_L <- phi_L - alpha * grad_phi_L [L_rec - [inner max] * lambda_1 * L_adv]
        phi_A <- phi_A - alpha * grad_phi_A L_adv             (unless --disable-inner-adv)
    outer step on the query (second order through both inner loops):
        G_R = grad_theta_R mean_u [L_rec - lambda_1 * L_adv]     recommender: min-max
        G_A = grad_theta_A mean_u L_adv                          adversary: min
        clamp G_R, G_A to [-10, 10]; Adam step on both            (docs/methods.md §6.2)

Each adversary is Linear(in -> 32) -> ReLU [+ ReLU(Linear(h_item))] -> Linear(32 -> G),
run on every row of the user; the logits are averaged over the rows (support rows in
the inner loop, query rows in the outer step) and scored with CE against the user's
group. Inputs per row (``--out1`` for A1 = CLOVER's ``--out``; ``--out2`` for A2):

    0  h_u                        the user representation relu(user_fc(e_user))
    1  y_hat                      rating logits (softmax with --normalize) or the rating
    2  [y_hat, onehot(y)]         ([y_hat, y] with --loss mse): label-conditioned
    4  y - y_hat                  residual (--loss mse only)
    5  [h_u, y]                   "with external information" (the README's A1)
    7  [h_u, h_i, y]              (A1 only)

``--item-adv`` adds the item branch to the adversaries of type 1, 2 and 4.
The rating loss is MSE or (``--loss ce``) cross-entropy over the C rating classes, whose
prediction is argmax + the lowest rating (docs/methods.md §6.1) or, with ``--decode
expected``, the expected rating under the class probabilities (:func:`decode`); the
learner's readout turns logits into ratings so that evaluation, GF and the attacker are
the framework's.

Where the authors' code has a bug, this module implements the evident intent:

* ``--item_adv`` adds the item branch in place onto a ReLU output, which makes autograd
  fail (the README's full command crashes, docs/methods.md §6.5): the addition here is out of
  place.
* The item branch is wired differently per dataset folder (ML-100K: A2 only; ML-1M/BX:
  also A1 of type 1/2/4, sharing one layer) and crashes in some combinations: here every
  adversary of type 1/2/4 gets the branch when ``--item-adv`` is on, each its own layer.
* The BX adversaries size their output by ``--num_age``, the ML ones by ``--num_gender``:
  here the output size is the number of sensitive groups on every dataset.

Choices beyond the code: the two players use separate Adam states with the same learning
rate, which is the same as the authors' single Adam over both (Adam is elementwise). The
adversary's inner learning rate is ``--inner-lr`` (fixed, even when MetaCS learns the
recommender's). MetaCS learns its inner rate from the query rating loss after the
outer step, as its FAST version does. Test-time adaptation runs the training inner loop
(fooling term and adversary step as the disable flags say, docs/methods.md §6.2); the attacker
representations use the fooling term but not the adversary step (§6.3).
Not implemented (the code calls them "just tested"): the counterfactual adversaries
(--out 6/8/9), --out 3, --adv_loss_power, --schedule, --outer, --inner_fc, --all_adv,
--dual, --train_adv, --re_w, --con; nor the CF metric.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fast_jax import config as config_lib
from fast_jax import fairness, meta, metrics, models
from fast_jax.config import Config, UsageError
from fast_jax.methods import fast, origin
from fast_jax.methods import learner as learn
from fast_jax.methods.base import Context, Method, scan_epoch
from fast_jax.models import Backbone, merge_params, sensitive_fields, split_params

Params = Any
ADV_HIDDEN = 32
GRAD_CLAMP = 10.0
A1_TYPES = (0, 1, 2, 4, 5, 7)
A2_TYPES = (0, 1, 2, 4)
USER_TYPES = (0, 5, 7)         # need the user representation h_u
PRED_TYPES = (1, 2)            # see the predicted-rating distribution (--normalize)
ITEM_BRANCH_TYPES = (1, 2, 4)  # get the item branch with --item-adv
MSE_ONLY_TYPES = (4,)
_NOT_IMPLEMENTED = {3: "declared but broken in the authors' code (shape error / no forward)",
                    6: "a counterfactual |difference| adversary, not a classifier ('tested only')",
                    8: "a counterfactual |difference| adversary, not a classifier ('tested only')",
                    9: "a counterfactual |difference| adversary, not a classifier ('tested only')"}


@dataclasses.dataclass(frozen=True)
class CloverSpec:
  """The CLOVER settings of a run (from a resolved Config and the data)."""
  lam1: float
  lam2: float
  out1: int
  out2: int
  item_adv: bool
  normalize: bool
  inner_max: bool
  inner_adv: bool
  loss: str
  decode: str           # ce prediction: "argmax" or "expected"
  num_classes: int      # rating classes C (ce), 1 (mse)
  rating_min: float
  num_groups: int

  @property
  def use_a2(self) -> bool:
    return self.lam2 != 0 and self.out2 >= 0


def spec_from_config(cfg: Config, data) -> CloverSpec:
  rmin, rmax = (float(data.meta["rating"][k]) for k in ("min", "max"))
  return CloverSpec(lam1=float(cfg.adv), lam2=float(cfg.adv2), out1=int(cfg.out1),
                    out2=int(cfg.out2), item_adv=bool(cfg.item_adv),
                    normalize=bool(cfg.normalize), inner_max=not cfg.disable_inner_max,
                    inner_adv=not cfg.disable_inner_adv, loss=cfg.loss, decode=cfg.decode,
                    num_classes=int(round(rmax - rmin)) + 1 if cfg.loss == "ce" else 1,
                    rating_min=rmin, num_groups=len(data.meta["sensitive"]["groups"]))


def check_config(cfg: Config, data) -> None:
  """Reject CLOVER settings that cannot work, naming the flag (UsageError)."""
  if cfg.clover_preset not in config_lib.CLOVER_PRESETS:
    raise UsageError(f"--clover-preset {cfg.clover_preset!r}: expected one of "
                     f"{', '.join(config_lib.CLOVER_PRESETS)}")
  if cfg.loss not in ("mse", "ce"):
    raise UsageError(f"--loss {cfg.loss!r}: expected mse or ce")
  if cfg.decode not in DECODES:
    raise UsageError(f"--decode {cfg.decode!r}: expected one of {', '.join(DECODES)}")
  if cfg.decode != "argmax" and cfg.loss != "ce":
    raise UsageError(f"--decode {cfg.decode} reads rating classes and needs --loss ce")
  if not cfg.adv > 0:
    raise UsageError(f"--adv must be > 0 for --method clover (it weights the adversarial "
                     f"loss; use --method origin for the plain backbone), got {cfg.adv}")
  if cfg.adv2 < 0:
    raise UsageError(f"--adv2 must be >= 0, got {cfg.adv2}")
  for flag, value, allowed in (("--out1", cfg.out1, A1_TYPES), ("--out2", cfg.out2, A2_TYPES)):
    if flag == "--out2" and value == -1:
      continue
    if value in _NOT_IMPLEMENTED:
      raise UsageError(f"{flag} {value} is not implemented: {_NOT_IMPLEMENTED[value]}; use "
                       f"one of {allowed}")
    if value not in allowed:
      raise UsageError(f"{flag} {value}: expected one of {allowed}"
                       + (" or -1 (no A2)" if flag == "--out2" else ""))
  if cfg.adv2 > 0 and cfg.out2 < 0:
    raise UsageError("--adv2 weights the second adversary: give its input type with --out2")
  if cfg.adv2 == 0 and cfg.out2 >= 0:
    raise UsageError(f"--out2 {cfg.out2} has no effect without --adv2 > 0")
  types = [cfg.out1] + ([cfg.out2] if cfg.adv2 > 0 else [])
  for t in types:
    if t in MSE_ONLY_TYPES and cfg.loss != "mse":
      raise UsageError(f"adversary input type {t} (residual) needs --loss mse")
  if cfg.normalize and cfg.loss != "ce":
    raise UsageError("--normalize softmaxes rating logits and needs --loss ce"
                     + _preset_hint(cfg, "normalize"))
  if cfg.normalize and not any(t in PRED_TYPES for t in types):
    raise UsageError("--normalize has no effect: no adversary sees the predicted ratings "
                     "(--out1/--out2 1 or 2)" + _preset_hint(cfg, "normalize"))
  if cfg.item_adv and not any(t in ITEM_BRANCH_TYPES for t in types):
    raise UsageError("--item-adv has no effect: it adds the item branch to adversaries of "
                     "type 1, 2 or 4 (--out1/--out2)" + _preset_hint(cfg, "item_adv"))
  if data is None:
    return
  dropped = sensitive_fields(data.meta) if cfg.drop_sensitive else ()
  user_fields = [f for f in data.meta["fields"]
                 if f["side"] == "user" and f["name"] not in dropped]
  if not user_fields and any(t in USER_TYPES for t in types):
    raise UsageError(f"adversary input types {USER_TYPES} use the user representation, but "
                     f"{cfg.dataset} has no user fields the network sees; pick --out1 1 or 2")
  if cfg.loss == "ce":
    ys = np.concatenate([s.y[s.mask] for s in (data.train, data.valid, data.test)])
    if not np.allclose(ys, np.round(ys)):
      raise UsageError(f"--loss ce classifies integer ratings, but {cfg.dataset} has "
                       f"non-integer ratings; use --loss mse")


def _preset_hint(cfg: Config, field: str) -> str:
  if not config_lib.CLOVER_PRESETS[cfg.clover_preset].get(field):
    return ""
  flag = field.replace("_", "-")
  return (f" (--clover-preset {cfg.clover_preset} turns --{flag} on unless you pass "
          f"--no-{flag})")


DECODES = ("argmax", "expected")


def decode(logits: jax.Array, rating_min: float, how: str) -> jax.Array:
  """Ratings from class logits ``float[..., C]`` (class c is rating ``rating_min + c``).

  ``argmax`` (the authors' code): the most probable class. ``expected``: the mean rating
  under ``softmax(logits)``. When the logits barely vary from row to row, the argmax is
  the same class for every row (the mode of the training ratings, docs/methods.md §6.5),
  while the expectation still moves with them. Returns float32[...].
  """
  ratings = rating_min + jnp.arange(logits.shape[-1], dtype=jnp.float32)
  if how == "expected":
    return jax.nn.softmax(logits, -1) @ ratings
  return ratings[jnp.argmax(logits, -1)]


class Adversary(nn.Module):
  """Linear(in -> hidden) -> ReLU [+ ReLU(Linear(hidden)(h_item))] -> Linear(-> classes).

  The item branch is added out of place (the authors' in-place add breaks autograd).
  """
  classes: int
  hidden: int = ADV_HIDDEN
  item_branch: bool = False

  @nn.compact
  def __call__(self, inputs: jax.Array, h_item: jax.Array) -> jax.Array:
    # torch's U(+-1/sqrt(fan_in))
    init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    h = nn.relu(nn.Dense(self.hidden, kernel_init=init, name="fc")(inputs))
    if self.item_branch:
      h = h + nn.relu(nn.Dense(self.hidden, kernel_init=init, name="fc_item")(h_item))
    return nn.Dense(self.classes, kernel_init=init, name="out")(h)


def _forward(backbone: Backbone, params: Params, e: jax.Array):
  """(output, h_item, h_user) of the recommender on one user's embedded rows e: [R, D]
  (the user tower once per user when the backbone allows it, :meth:`Backbone.head_user`)."""
  if backbone.user_rows_shared:
    return backbone.module.apply({"params": params}, e, method="forward_one_user")

  def fn(m, e):
    h_item, h_user = m.represent(e)
    return m.head(e), h_item, h_user
  return backbone.module.apply({"params": params}, e, method=fn)


class Players:
  """The backbone as a CLOVER recommender plus its adversaries: their losses and their
  joint inner loop. ``adv`` parameters are ``{"a1": .., ["a2": ..]}``."""

  def __init__(self, backbone: Backbone, labels: Params, spec: CloverSpec, *,
               inner_steps: int, first_order: bool, adv_inner_lr: float):
    self.backbone, self.labels, self.spec = backbone, labels, spec
    self.inner_steps, self.first_order, self.adv_inner_lr = inner_steps, first_order, adv_inner_lr
    # One inner step in kernel form, as learner.maml's (docs/methods.md §4).
    self.kernel_form = learn.ONE_STEP_KERNEL and inner_steps == 1 and backbone.kernel_form
    self.adversaries = {"a1": Adversary(spec.num_groups, item_branch=self._branch(spec.out1))}
    if spec.use_a2:
      self.adversaries["a2"] = Adversary(spec.num_groups, item_branch=self._branch(spec.out2))

  def _branch(self, kind: int) -> bool:
    return self.spec.item_adv and kind in ITEM_BRANCH_TYPES

  def init_adversaries(self, key: jax.Array, rec_params: Params, e_rows: jax.Array) -> Params:
    """Adversary parameters; e_rows: [R, D] embedded rows (for the input shapes)."""
    out, h_item, h_user = _forward(self.backbone, rec_params, e_rows)
    y = jnp.full(e_rows.shape[:-1], self.spec.rating_min)
    keys = dict(zip(self.adversaries, jax.random.split(key, len(self.adversaries))))
    kinds = {"a1": self.spec.out1, "a2": self.spec.out2}
    return {name: adv.init(keys[name], self._inputs(kinds[name], out, h_item, h_user, y),
                           h_item)["params"]
            for name, adv in self.adversaries.items()}

  def _inputs(self, kind: int, out, h_item, h_user, y) -> jax.Array:
    """Per-row adversary input of type ``kind`` (module docstring). y: float[R]."""
    spec = self.spec
    y_col = y[..., None]
    if spec.loss == "ce":
      y_hat = jax.nn.softmax(out, -1) if spec.normalize else out
      label = jax.nn.one_hot(jnp.round(y - spec.rating_min).astype(jnp.int32),
                             spec.num_classes, dtype=out.dtype)
    else:
      y_hat, label = out[..., None], y_col
    if kind == 0:
      return h_user
    if kind == 1:
      return y_hat
    if kind == 2:
      return jnp.concatenate([y_hat, label], -1)
    if kind == 4:
      return y_col - y_hat
    if kind == 5:
      return jnp.concatenate([h_user, y_col], -1)
    if kind == 7:
      return jnp.concatenate([h_user, h_item, y_col], -1)
    raise ValueError(f"adversary input type {kind} is not implemented")

  def rating_loss(self, out: jax.Array, y: jax.Array) -> jax.Array:
    """Per-row rating loss: squared error or CE against class y - min. -> float[R]."""
    if self.spec.loss == "mse":
      return jnp.square(out - y)
    label = jnp.clip(jnp.round(y - self.spec.rating_min), 0, self.spec.num_classes - 1)
    return optax.softmax_cross_entropy_with_integer_labels(out, label.astype(jnp.int32))

  def to_rating(self, out: jax.Array) -> jax.Array:
    """Predicted rating: the output (mse) or the classes decoded (ce, :func:`decode`)."""
    if self.spec.loss == "mse":
      return out
    return decode(out, self.spec.rating_min, self.spec.decode)

  def losses(self, rec: Params, adv: Params, e: jax.Array, y: jax.Array, mask: jax.Array,
             group: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One user's (L_rec, L_adv) on the masked rows. e: [R, D]; y: float[R]; mask: bool[R];
    group: int scalar."""
    return self.losses_of(_forward(self.backbone, rec, e), adv, y, mask, group)

  def losses_of(self, forward: tuple, adv: Params, y: jax.Array, mask: jax.Array,
                group: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:meth:`losses` from the recommender's (output, h_item, h_user) on the rows."""
    spec = self.spec
    out, h_item, h_user = forward
    l_rec = metrics.masked_mean(self.rating_loss(out, y), mask)
    kinds = {"a1": spec.out1, "a2": spec.out2}
    weights = {"a1": 1.0, "a2": spec.lam2 / spec.lam1}
    l_adv = jnp.zeros(())
    for name, module in self.adversaries.items():
      logits = module.apply({"params": adv[name]},
                            self._inputs(kinds[name], out, h_item, h_user, y), h_item)
      pooled = metrics.masked_mean(logits, mask[:, None], axis=0)  # mean logits over rows
      l_adv += weights[name] * optax.softmax_cross_entropy_with_integer_labels(pooled, group)
    return l_rec, l_adv

  def adapt(self, rec: Params, adv: Params, alpha, e: jax.Array, y: jax.Array,
            support: jax.Array, group: jax.Array, *, inner_max: bool, inner_adv: bool):
    """One user's inner loop (docs/methods.md §6.2): both players step from the same
    point, each down its own loss. Returns the adapted (recommender, adversary)
    parameters."""
    if not (inner_max or inner_adv):  # the players are independent: plain MAML step
      theta = meta.inner_adapt(self.backbone.head_user, rec, self.labels, alpha, e, y, support,
                               steps=self.inner_steps, first_order=self.first_order,
                               loss_fn=lambda out, y, m: metrics.masked_mean(
                                   self.rating_loss(out, y), m))
      return theta, adv
    local, glob = split_params(rec, self.labels)
    fool = self.spec.lam1 if inner_max else 0.0

    def grads(carry):
      # One forward pass of the recommender; then each player's gradient of its own loss
      # with respect to its own parameters only: the recommender's backward pass skips
      # the adversaries when its loss does not see them (no fooling term), and the
      # adversary's skips the recommender, whose outputs are constants to it. The same
      # values, up to rounding, as a joint backward pass per player.
      loc, adv_u = carry
      forward, forward_vjp = jax.vjp(
          lambda l: _forward(self.backbone, merge_params(l, glob), e), loc)

      def rec_loss(forward):
        l_rec, l_adv = self.losses_of(forward, adv_u, y, support, group)
        return l_rec - fool * l_adv if fool else l_rec
      g_loc, = forward_vjp(jax.grad(rec_loss)(forward))
      g_adv = (jax.grad(lambda a: self.losses_of(forward, a, y, support, group)[1])(adv_u)
               if inner_adv else jax.tree.map(jnp.zeros_like, adv_u))
      return g_loc, g_adv

    rates = (meta.local_rates(alpha, local),
             jax.tree.map(lambda _: self.adv_inner_lr if inner_adv else 0.0, adv))
    local, adv = meta.sgd(grads, (local, adv), rates, steps=self.inner_steps,
                          first_order=self.first_order)
    return merge_params(local, glob), adv

  def adapt_forward(self, rec: Params, adv: Params, alpha, e: jax.Array, y: jax.Array,
                    support: jax.Array, group: jax.Array, e_query: jax.Array, *,
                    inner_max: bool, inner_adv: bool):
    """:meth:`adapt` for one inner step, in kernel form
    (:func:`fast_jax.models.one_step_forward`): the adapted recommender's (output, h_item,
    h_user) on the query rows e_query [Q, D], without forming its parameters, and the
    adapted adversary. The recommender steps down the same loss as in :meth:`adapt`, the
    adversary down its own from the same forward pass."""
    fool = self.spec.lam1 if inner_max else 0.0

    def rec_loss(forward):
      if not (inner_max or inner_adv):
        return metrics.masked_mean(self.rating_loss(forward[0], y), support)
      l_rec, l_adv = self.losses_of(forward, adv, y, support, group)
      return l_rec - fool * l_adv if fool else l_rec
    forward_query, forward = models.one_step_forward(
        self.backbone.module, rec, self.backbone.local_modules, alpha, e, e_query, rec_loss,
        shared_user=self.backbone.user_rows_shared, first_order=self.first_order)
    if inner_adv:
      g_adv = jax.grad(lambda a: self.losses_of(forward, a, y, support, group)[1])(adv)
      if self.first_order:
        g_adv = jax.lax.stop_gradient(g_adv)
      adv = jax.tree.map(lambda a, g: a - self.adv_inner_lr * g, adv, g_adv)
    return forward_query, adv

  def batch_losses(self, rec: Params, adv: Params, alpha, batch: dict, support: jax.Array,
                   query_idx: jax.Array, *, run: Callable = meta.whole_batch,
                   laid_out: bool = False):
    """Per-user query (L_rec, L_adv) after the training inner loop: (float[B], float[B]).
    ``run``: the batch runner (:func:`fast_jax.methods.learner.batch_runner`); the rows
    laid out query first when :data:`fast_jax.methods.learner.QUERY_FIRST`, here or
    before (``laid_out``: ``batch``'s x and y, ``support`` and ``query_idx`` already are
    as :func:`fast_jax.methods.learner.lay_out` gives them)."""
    direct = self.kernel_form and not isinstance(alpha, dict)
    query_first = learn.QUERY_FIRST
    x, y = batch["x"], batch["y"]
    if not laid_out:
      x, y, support, query_idx = learn.lay_out(x, y, support, query_idx, query_first)

    def part(support, query_idx, x, y, group):
      e = self.backbone.embed(rec, x)
      y_q = meta.take_rows(y, query_idx)
      e_q, e, y, support = learn.query_rows(e, y, support, query_idx, query_first)
      q_mask = jnp.ones(y_q.shape[-1], bool)

      def one_user(e_u, y_u, s_u, g_u, eq_u, yq_u):
        flags = dict(inner_max=self.spec.inner_max, inner_adv=self.spec.inner_adv)
        if direct:
          forward, adv_u = self.adapt_forward(rec, adv, alpha, e_u, y_u, s_u, g_u, eq_u,
                                              **flags)
          return self.losses_of(forward, adv_u, yq_u, q_mask, g_u)
        rec_u, adv_u = self.adapt(rec, adv, alpha, e_u, y_u, s_u, g_u, **flags)
        return self.losses(rec_u, adv_u, eq_u, yq_u, q_mask, g_u)
      return jax.vmap(one_user)(e, y, support, group, e_q, y_q)
    return run(part, support, query_idx, x, y, batch["group"])

  def learner(self) -> learn.Learner:
    """The recommender adapted as at test time (docs/methods.md §6.2: fooling term and adversary
    step as the disable flags say); the attacker's representations use the fooling term
    but not the adversary step (§6.3). ``params`` = {"rec", "adv"}."""
    inner_max, inner_adv = self.spec.inner_max, self.spec.inner_adv

    def adapter(with_adv: bool):
      def adapt(params, alpha, e_u, y_u, s_u, g_u):
        rec_u, _ = self.adapt(params["rec"], params["adv"], alpha, e_u, y_u, s_u, g_u,
                              inner_max=inner_max, inner_adv=with_adv and inner_max)
        return rec_u
      return adapt

    def query_output(params, alpha, e_u, y_u, s_u, g_u, eq_u):
      # One step: both players step from the same point, so the adversary's own step
      # does not move the recommender's, and is skipped.
      (out, _, _), _ = self.adapt_forward(params["rec"], params["adv"], alpha, e_u, y_u, s_u,
                                          g_u, eq_u, inner_max=inner_max, inner_adv=False)
      return out
    return learn.Learner(self.backbone, self.labels, adapter(inner_adv),
                         recommender=lambda params: params["rec"], readout=self.to_rating,
                         adapt_for_repr=adapter(False),
                         query_output=query_output if self.kernel_form else None)


def player_grads(objectives: Callable, rec: Params, adv: Params, lam1: float, *,
                 one_pass: bool):
  """Both players' outer gradients: G_R of L_rec - lambda_1 L_adv with respect to the
  recommender, G_A of L_adv with respect to the adversary, where ``objectives(rec, adv)
  -> ((L_rec, L_adv), aux)``. ``one_pass``: G_A from the same backward pass, as
  -1/lambda_1 times its adversary part, which holds when L_rec does not depend on the
  adversary; otherwise a second backward pass. Returns ((L_rec, L_adv), aux, G_R, G_A)."""
  (m_rec, m_adv), vjp, aux = jax.vjp(objectives, rec, adv, has_aux=True)
  one = jnp.ones_like(m_rec)
  g_rec, g_adv = vjp((one, -lam1 * one))   # recommender: min L_rec - lambda_1 L_adv
  if one_pass:
    g_adv = jax.tree.map(lambda g: g / -lam1, g_adv)
  else:
    _, g_adv = vjp((jnp.zeros_like(one), one))  # adversary: min L_adv
  return (m_rec, m_adv), aux, g_rec, g_adv


def laid_batch(batch: dict, support: jax.Array, query_idx: jax.Array):
  """(batch, support, query_idx) with the rows laid out as the inner loop sees them
  (:func:`fast_jax.methods.learner.lay_out` with :data:`~fast_jax.methods.learner.QUERY_FIRST`)."""
  rows = learn.lay_out(batch["x"], batch["y"], support, query_idx, learn.QUERY_FIRST)
  return {**batch, "x": rows.x, "y": rows.y}, rows.support, rows.query_idx


def make_train_step(players: Players, tx, adv_tx, rate: learn.InnerRate, *, ctx: Context,
                    run: Callable = meta.whole_batch, one_pass: bool | None = None) -> Callable:
  """``train_step(state, batch, key) -> (state, metrics)``: one CLOVER outer iteration.

  ``state.extra`` = ``{"adv": adversary params, "adv_opt": their Adam state}``.
  ``one_pass``: both players' outer gradients from one backward pass, of
  L_rec - lambda_1 L_adv, whose gradient with respect to the adversary is then
  -lambda_1 G_A (:func:`player_grads`). That holds when the recommender's query loss
  has no gradient path to the adversary: without the inner loop's fooling term, or with
  it and a first-order meta-gradient (which stops the path). That is the default
  (None); False always runs a second backward pass for G_A.
  """
  lam1, cfg, max_len = players.spec.lam1, ctx.cfg, ctx.max_len
  if one_pass is None:
    one_pass = not players.spec.inner_max or players.first_order

  def train_step(state, batch: dict, key: jax.Array):
    key = jax.random.fold_in(key, state.step)
    k_split, k_split2 = jax.random.split(key)
    support, query = meta.query_split(k_split, batch["length"], max_len, cfg.train_query)
    # The rows as the inner loop sees them, laid out once for the parts' choice and the
    # losses.
    laid, support, query = laid_batch(batch, support, query)

    def objectives(rec, adv, run):
      l_rec, l_adv = players.batch_losses(rec, adv, state.alpha, laid, support, query,
                                          run=run, laid_out=True)
      return (jnp.mean(l_rec), jnp.mean(l_adv)), l_rec

    # By length: the parts chosen outside the gradients (learn.switch_parts).
    (m_rec, m_adv), l_rec, g_rec, g_adv = learn.switch_parts(
        run, lambda run: player_grads(functools.partial(objectives, run=run), state.params,
                                      state.extra["adv"], lam1, one_pass=one_pass),
        support, query)
    clamp = lambda g: jax.tree.map(lambda v: jnp.clip(v, -GRAD_CLAMP, GRAD_CLAMP), g)
    updates, opt_state = tx.update(clamp(g_rec), state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    adv_updates, adv_opt = adv_tx.update(clamp(g_adv), state.extra["adv_opt"],
                                         state.extra["adv"])
    adv = optax.apply_updates(state.extra["adv"], adv_updates)

    # MetaCS: the inner rate from the query rating loss of a second pass.
    support2, query2 = meta.query_split(k_split2, batch["length"], max_len, cfg.train_query)
    laid2, support2, query2 = laid_batch(batch, support2, query2)

    def alpha_loss(a, run):
      l_rec2, _ = players.batch_losses(params, adv, a, laid2, support2, query2, run=run,
                                       laid_out=True)
      return jnp.mean(l_rec2)
    alpha, alpha_opt_state = learn.learn_rate_by_parts(
        rate, state.alpha, state.alpha_opt_state, alpha_loss, run, support2, query2)

    group_loss, present = fairness.group_means(l_rec, batch["group"], ctx.num_groups)
    new_state = state.replace(params=params, opt_state=opt_state, alpha=alpha,
                              alpha_opt_state=alpha_opt_state, step=state.step + 1,
                              extra={"adv": adv, "adv_opt": adv_opt})
    out = {"loss": m_rec, "adv_loss": m_adv, "outer_loss": m_rec - lam1 * m_adv, "p": state.p,
           "group_loss": group_loss, "group_present": present}
    return new_state, out

  return train_step


def game(ctx: Context, *, run: Callable | None = None, one_pass: bool | None = None):
  """CLOVER's pieces on ``ctx``: (players, train step, ``init(key) -> state``).
  ``run``: the step's batch runner (default: by length where it pays,
  :func:`fast_jax.methods.learner.batch_runner`); ``one_pass``: :func:`make_train_step`'s."""
  cfg = ctx.cfg
  fast.check_config(cfg)
  check_config(cfg, ctx.data)
  spec = spec_from_config(cfg, ctx.data)
  backbone, labels = learn.network(ctx, out_dim=spec.num_classes)
  x0 = ctx.splits["train"]["x"][0]
  players = Players(backbone, labels, spec, inner_steps=cfg.inner_steps,
                    first_order=cfg.first_order, adv_inner_lr=cfg.inner_lr)
  rate, tx, adv_tx = learn.inner_rate(cfg), optax.adam(cfg.lr), optax.adam(cfg.lr)
  if run is None:
    run = learn.batch_runner(ctx, by_length=True)
  step = make_train_step(players, tx, adv_tx, rate, ctx=ctx, run=run, one_pass=one_pass)

  def init(key):
    k_rec, k_adv = jax.random.split(key)
    state = fast.init_state(ctx, backbone, labels, rate, tx, k_rec)
    adv = players.init_adversaries(k_adv, state.params, backbone.embed(state.params, x0))
    return state.replace(extra={"adv": adv, "adv_opt": adv_tx.init(adv)})
  return players, step, init


def make(ctx: Context, *, by_length: bool = True) -> Method:
  """``--method clover``: the backbone (C rating classes with ``--loss ce``) and its
  adversaries, trained min-max on uniform batches."""
  players, step, init = game(ctx, run=None if by_length else meta.whole_batch)
  lrn = players.learner()

  def both(state):
    return {"rec": state.params, "adv": state.extra["adv"]}

  return Method(
      init=init, epoch=scan_epoch(step, fast.batches(origin.OBJECTIVE, ctx), mesh=ctx.mesh),
      predict=lambda s, x, y, support, q, group: learn.predict(lrn, both(s), s.alpha, x, y,
                                                               support, q, group),
      predict_unadapted=lambda s, x, y, support, q, group: learn.predict(
          lrn, both(s), s.alpha, x, y, support, q, group, adapt=False),
      represent=lambda s, x, y, support, valid, group: learn.represent(
          lrn, both(s), s.alpha, x, y, support, valid, group),
      record=fast.meta_record, splits={**ctx.splits, "fit": ctx.splits["train"]},
      select=ctx.cfg.select, lanes=True)
