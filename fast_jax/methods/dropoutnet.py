"""DropoutNet (Volkovs et al. 2017) adapted to rating prediction for cold users
(docs/methods.md §7).

The MeLU network with two preference inputs concatenated before fc1: the user's mean
biased-MF item vector over its support items (the DropoutNet transform) and the item's
MF vector, each zeroed with probability ``dropout`` per row while training.

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

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fast_jax import meta, metrics
from fast_jax.methods import baseline
from fast_jax.methods.base import Context, Method, device_split
from fast_jax.models import MeLU, dense

MF_LR = 0.02  # Adam rate of DropoutNet's full-batch biased-MF pretraining
# DropoutNet trains on item vectors fitted without the user's own ratings (MF_FOLDS
# fits, each leaving one fold of the training users out), as a test user's are.
MF_FOLDS = 2


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
    h = nn.relu(dense(self.hidden, h.shape[-1], self.torch_init, name="fc1")(h))
    h = nn.relu(dense(self.hidden, self.hidden, self.torch_init, name="fc2")(h))
    out = dense(1, self.hidden, self.torch_init, bias=self.out_bias, name="out")(h)
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


class ItemIndex:
  """The MF index of every row's item: unique item-column rows of the training split."""

  def __init__(self, data):
    self.item_columns = max(f["stop"] for f in data.meta["fields"] if f["side"] == "item")
    train = data.train
    keys, inverse = np.unique(train.x[train.mask][:, :self.item_columns], axis=0,
                              return_inverse=True)
    self.num_items = keys.shape[0]
    self._index = {row.tobytes(): i for i, row in enumerate(keys)}
    self.train_rows = inverse.reshape(-1).astype(np.int32)

  def __call__(self, split) -> np.ndarray:
    """int32[U, L]: MF index of every row's item; K for unseen items and padding."""
    flat = np.ascontiguousarray(split.x[..., :self.item_columns]).reshape(-1, self.item_columns)
    idx = np.array([self._index.get(r.tobytes(), self.num_items) for r in flat], np.int32)
    return np.where(split.mask, idx.reshape(split.mask.shape), self.num_items).astype(np.int32)


def make(ctx: Context, *, by_length: bool = True) -> Method:
  """``--method dropoutnet``: user batches, a random support/query split per step."""
  cfg, data = ctx.cfg, ctx.data
  num_columns, train = data.num_columns, data.train
  index = ItemIndex(data)
  mf_rows = {"user": jnp.asarray(np.repeat(np.arange(train.num_users), train.length)),
             "item": jnp.asarray(index.train_rows), "rating": jnp.asarray(train.y[train.mask])}
  model = DropoutNet(melu=baseline.melu(ctx), torch_init=cfg.init == "torch",
                     out_bias=ctx.train_mean)

  def device_data(split) -> dict:
    d = device_split(split)
    d["x"] = jnp.concatenate([d["x"], jnp.asarray(index(split))[..., None]], -1)
    return d
  splits = {name: device_data(data.split(name)) for name in ("train", "valid", "test")}
  splits["fit"] = {**splits["train"], "user": jnp.arange(train.num_users)}

  def fit(key, weight):
    return fit_biased_mf(key, mf_rows["user"], mf_rows["item"], mf_rows["rating"], weight,
                         cfg.mf_l2, num_users=train.num_users, num_items=index.num_items,
                         dim=cfg.mf_dim, steps=cfg.mf_steps)

  def init_fixed(key):
    k_fold, k_full, k_held = jax.random.split(key, 3)
    user_fold = jax.random.permutation(k_fold, train.num_users) % MF_FOLDS
    row_fold = user_fold[mf_rows["user"]]
    items, known, rmse = fit(k_full, jnp.ones(row_fold.shape))
    held = [fit(k, (row_fold != f).astype(jnp.float32))
            for f, k in enumerate(jax.random.split(k_held, MF_FOLDS))]
    return {"items": items, "known": known, "user_fold": user_fold,
            "fold_items": jnp.stack([h[0] for h in held]),
            "fold_known": jnp.stack([h[1] for h in held]), "mf_rmse": rmse}

  def init_params(key):
    p = cfg.mf_dim + 1
    x = splits["train"]["x"][0, :, :num_columns]
    return model.init(key, x, jnp.zeros(x.shape[:-1] + (p,)),
                      jnp.zeros(x.shape[:-1] + (p,)))["params"]

  def forward(params, fixed, x, support, query_idx, *, user=None, key=None):
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
      u_pref, v_pref = preference_dropout(key, u_pref, v_pref, cfg.dropout)
    x_query = meta.take_rows(x, query_idx)[..., :num_columns]
    return model.apply({"params": params}, x_query, u_pref, v_pref)

  def loss(params, fixed, batch, key):
    k_split, k_drop = jax.random.split(key)
    support, query_idx = meta.random_query_split(k_split, batch["length"], ctx.max_len)
    pred = forward(params, fixed, batch["x"], support, query_idx, user=batch["user"],
                   key=k_drop)
    return baseline.user_query_mse(pred, batch, query_idx)

  return baseline.trained(
      ctx, init_params=init_params, init_fixed=init_fixed, loss=loss,
      predict=lambda params, fixed, x, y, support, q: forward(params, fixed, x, support, q),
      splits=splits,
      choices=lambda fixed: {"mf_items": int(index.num_items),
                             "mf_train_rmse": float(fixed["mf_rmse"]), "mf_folds": MF_FOLDS})
