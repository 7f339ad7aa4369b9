"""NLBA (Vartak et al. 2017), non-linear bias adaptation with users as tasks (docs/methods.md §7).

Per-user hidden and output biases linear in the class-conditional means R^0, R^1 of the
support items' representations; no gradient adaptation. Trained on user batches: R^0,
R^1 from a random support set, MSE on the rest.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fast_jax import meta, metrics
from fast_jax.config import Config
from fast_jax.methods import baseline
from fast_jax.methods.base import Context, Method
from fast_jax.models import MeLU, dense


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
    self.hidden_w = dense(self.hidden, p, self.torch_init, use_bias=False)
    self.hidden_b = dense(self.hidden, 2 * p, self.torch_init)
    self.out_w = dense(1, self.hidden, self.torch_init, use_bias=False)
    self.out_b = dense(1, 2 * p, self.torch_init, bias=self.out_bias)

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
  rounded up (4 on 1-5, 8 on 1-10, as docs/methods.md §7)."""
  if cfg.nlba_threshold is not None:
    return float(cfg.nlba_threshold)
  lo, hi = rating_range
  return float(math.ceil(lo + 0.75 * (hi - lo)))


def make(ctx: Context, *, by_length: bool = True) -> Method:
  """``--method nlba``."""
  cfg = ctx.cfg
  threshold = nlba_threshold(cfg, ctx.data.rating_range)
  model = NLBA(melu=baseline.melu(ctx, drop_user_fields=True), threshold=threshold,
               torch_init=cfg.init == "torch", out_bias=ctx.train_mean)
  d = ctx.splits["train"]

  def init_params(key):
    support, query_idx = meta.last_query_split(d["length"][:1], ctx.max_len)
    return model.init(key, d["x"][:1], d["y"][:1], support, query_idx)["params"]

  def apply(params, x, y, support, query_idx):
    return model.apply({"params": params}, x, y, support, query_idx)

  def loss(params, fixed, batch, key):
    support, query_idx = meta.random_query_split(key, batch["length"], ctx.max_len)
    pred = apply(params, batch["x"], batch["y"], support, query_idx)
    return baseline.user_query_mse(pred, batch, query_idx)

  return baseline.trained(
      ctx, init_params=init_params, loss=loss,
      predict=lambda params, fixed, x, y, support, q: apply(params, x, y, support, q),
      choices=lambda fixed: {"nlba_threshold": threshold})
