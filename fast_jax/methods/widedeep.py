"""Wide&Deep (Cheng et al. 2016) as a cold-start baseline (docs/methods.md §7).

``y = wide(x) + deep(x)``: deep = the dataset's MeLU network, wide = a linear model over
the one-hot features (optionally plus hashed user x item crosses); trained on all rows
of the training users as i.i.d. samples; tested from features alone, or after ``k`` SGD
steps on the support set (``--finetune-steps``).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fast_jax import meta, metrics
from fast_jax.methods import baseline
from fast_jax.methods.base import Context, Method
from fast_jax.models import Field, MeLU, make_backbone, param_labels


def _masked_slot_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean of ``values`` over the valid slots of the last axis."""
  return metrics.masked_mean(values, valid, axis=-1)


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


def make(ctx: Context, *, by_length: bool = True) -> Method:
  """``--method widedeep``: trained on the training users' rows as i.i.d. samples."""
  cfg, data = ctx.cfg, ctx.data
  deep = baseline.melu(ctx)
  model = WideDeep(deep=deep, wide=Wide(fields=deep.fields, drop_fields=deep.drop_fields,
                                        cross_buckets=cfg.wide_cross, offset=ctx.train_mean))
  # Per-user fine-tuning: the deep head's local modules (as the meta-learners adapt) and
  # the wide offset take k SGD steps on the support set.
  finetuned = make_backbone(data.meta, local_output=cfg.local_output).local_modules + (
      "offset",)
  split = data.train
  rows = {"x": jnp.asarray(split.x[split.mask]), "y": jnp.asarray(split.y[split.mask]),
          "group": jnp.asarray(np.repeat(split.group, split.length))}

  def apply(params, x):
    return model.apply({"params": params}, x)

  def batches(state, data, key):
    """Rows per step: a shuffle of all training rows in batches of ``interaction_batch``."""
    n, b = data["y"].shape[0], cfg.interaction_batch
    perm = jax.random.permutation(key, n)
    return perm[: (n // b) * b].reshape(n // b, b)

  def loss(params, fixed, batch, key):
    sq = jnp.square(apply(params, batch["x"]) - batch["y"])
    return jnp.mean(sq), (sq, batch["group"])

  def predict(params, fixed, x, y, support, query_idx):
    if cfg.finetune_steps == 0:
      return apply(params, meta.take_rows(x, query_idx))
    labels = param_labels(params, finetuned)
    return meta.adapted_query_predictions(apply, params, labels, cfg.finetune_lr, x, y,
                                          support, query_idx, steps=cfg.finetune_steps,
                                          first_order=True)

  return baseline.trained(
      ctx, init_params=lambda key: model.init(key, ctx.splits["train"]["x"][0])["params"],
      loss=loss, predict=predict, batches=batches, splits={"fit": rows},
      choices=lambda fixed: {"finetuned_modules": list(finetuned) if cfg.finetune_steps
                             else []})
