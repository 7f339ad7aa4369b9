"""FAST's adaptive group sampling and the other group-aware pieces of the outer loop.

Paper symbols: ``p[g]`` is the probability of sampling a user of group ``g`` (the
paper's ``p`` is ``p[0]``), ``delta_g`` the group loss gap, ``gamma`` the rate and
``tau`` the cap of one update (the FAST code calls tau ``--beta``).

Everything here is a pure function usable inside ``jit``; shapes are static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_means(values: jax.Array, group: jax.Array, num_groups: int,
                weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Per-group (weighted) means of per-user values.

  Args:
    values: float[B]; group: int[B]; weights: optional float[B] (default 1).
  Returns:
    (means float[G], present bool[G]); the mean of an absent group is 0.
  """
  w = jnp.ones_like(values) if weights is None else weights
  onehot = jax.nn.one_hot(group, num_groups, dtype=values.dtype) * w[:, None]  # [B, G]
  total = onehot.sum(0)
  means = (onehot * values[:, None]).sum(0) / jnp.maximum(total, 1e-12)
  present = total > 0
  return jnp.where(present, means, 0.0), present


def update_p(p: jax.Array, group_losses: jax.Array, present: jax.Array, gamma: float,
             tau: float) -> jax.Array:
  """FAST's sampling-probability update (paper Eq. 9), generalised to G >= 2 groups.

  Two groups: with ``delta_g = L_1 - L_0``,
  ``p_0 <- clip(p_0 - sign(delta_g) * min(gamma * |delta_g|, tau), 0, 1)`` and
  ``p_1 = 1 - p_0``.

  G groups (our rule): each present group g moves by
  ``sign(d_g) * min(gamma * |d_g|, tau)`` with ``d_g = L_g - mean_{h present, h != g} L_h``,
  so a group served worse than the others is sampled more; the moved entries are
  clipped to [0, 1] and rescaled to keep the probability mass the present groups had.
  Absent groups keep their p, and with fewer than two present groups nothing changes.
  For G = 2 this is exactly Eq. 9 with clipping.

  Args:
    p: float[G] sampling probabilities (sum 1).
    group_losses: float[G] per-group mean losses; present: bool[G].
  Returns:
    the new p, float[G].
  """
  n_present = present.sum()
  losses = jnp.where(present, group_losses, 0.0)
  others_mean = (losses.sum() - losses) / jnp.maximum(n_present - 1, 1)
  d = losses - others_mean
  step = jnp.sign(d) * jnp.minimum(gamma * jnp.abs(d), tau)
  moved = jnp.clip(p + jnp.where(present, step, 0.0), 0.0, 1.0)
  mass_before = jnp.where(present, p, 0.0).sum()
  mass_after = jnp.where(present, moved, 0.0).sum()
  # If every present group was clipped to 0, share their mass equally instead.
  rescaled = jnp.where(mass_after > 0, moved * mass_before / jnp.maximum(mass_after, 1e-12),
                       mass_before / jnp.maximum(n_present, 1))
  new_p = jnp.where(present, rescaled, p)
  return jnp.where(n_present >= 2, new_p, p)


def update_p_decaying(p: jax.Array, group_losses: jax.Array, present: jax.Array,
                      gamma: float, tau: float, step: jax.Array,
                      steps_per_epoch: int) -> jax.Array:
  """``--p-average``: Eq. 9 with the cap ``tau_t = tau / (1 + t / T)``, a p that converges.

  Theorem 2 bounds ``|p_t - p*| <= max(|p_0 - p*| - t tau, tau)`` for the update on
  ``L_g^opt(p)``, the group losses of the model *at its optimum for p*. The paper's rule
  moves p by up to tau every step on one batch's gap, so that premise never holds: the
  model cannot catch up with a p that jumps by tau, and the sign of a 32-user batch's gap
  is mostly sampling noise, so p wanders over the whole interval (between 0 and 1 within
  a few epochs on Theorem-1 data). A cap that decays after t outer steps (T per epoch)
  makes the update a Robbins-Monro scheme on a second, slower timescale:

  * ``sum_t tau_t = inf``: p can still travel to any p*;
  * ``sum_t tau_t^2 < inf``: the batch noise it integrates has finite variance, so p
    settles; summing many small signed steps *is* the average of the noisy gap's sign;
  * ``tau_t / (outer lr) -> 0``: p becomes the slow player, and the model, on the fast
    timescale, tracks its optimum for the current p, which is what ``L^opt(p)`` assumes.
    Theorem 2's bound becomes ``|p_t - p*| <= tau_t -> 0``.

  An explicit moving average of the gap (over 2 to 32 steps) made p *less* stable on
  Theorem-1 data: its lag turns the sign feedback into an oscillation of p around p*
  (EXPERIMENTS.md), so the averaging is left to the decaying steps.

  Args:
    p, group_losses, present, gamma, tau: as :func:`update_p`.
    step: t, the number of outer steps done (int32 scalar, in the train state).
    steps_per_epoch: T.
  Returns:
    the new p, float[G].
  """
  return update_p(p, group_losses, present, gamma, tau / (1.0 + step / steps_per_epoch))


def resample_weights(key: jax.Array, group: jax.Array, p: jax.Array,
                     num_groups: int) -> jax.Array:
  """FAST's resampled outer batch B', as integer counts over the users of the batch.

  Each of the ``B`` slots of B' picks group g with probability ``p[g]`` (renormalised
  over the groups present in the batch), then a user of that group in the batch
  uniformly, with replacement. ``counts[u]`` is how often user u is in B'; the outer loss
  is ``sum(counts * loss) / B``. In expectation group g holds ``p[g] * B`` slots.

  Args:
    group: int[B]; p: float[G].
  Returns:
    float[B] counts summing to B.
  """
  b = group.shape[0]
  k_group, k_user = jax.random.split(key)
  onehot = jax.nn.one_hot(group, num_groups)  # [B, G]
  present = onehot.sum(0) > 0
  probs = jnp.where(present, p, 0.0)
  probs = jnp.where(probs.sum() > 0, probs, present.astype(p.dtype))
  slot_group = jax.random.categorical(k_group, jnp.log(probs), shape=(b,))  # [B]
  # Within the chosen group every member is equally likely.
  member = onehot[:, slot_group].T  # [slots, B]
  logits = jnp.where(member > 0, 0.0, -jnp.inf)
  slot_user = jax.random.categorical(k_user, logits, axis=-1)  # [slots]
  return jnp.zeros(b).at[slot_user].add(1.0)


def expected_weights(group: jax.Array, p: jax.Array, num_groups: int) -> jax.Array:
  """Deterministic version of :func:`resample_weights`: its expectation (docs/methods.md §1.4)."""
  onehot = jax.nn.one_hot(group, num_groups)
  n_g = onehot.sum(0)
  probs = jnp.where(n_g > 0, p, 0.0)
  probs = probs / jnp.maximum(probs.sum(), 1e-12)
  return group.shape[0] * (onehot @ (probs / jnp.maximum(n_g, 1.0)))


def ipw_weights(group: jax.Array, shares: jax.Array) -> jax.Array:
  """Inverse-propensity weights ``1 / pi_g``, self-normalised to mean 1 within the batch."""
  w = 1.0 / shares[group]
  return w * group.shape[0] / w.sum()


def gap_penalty(values: jax.Array, group: jax.Array, num_groups: int,
                weights: jax.Array | None = None) -> jax.Array:
  """Spread of the group means of ``values`` (|L_0 - L_1| for two groups; max - min
  over present groups otherwise; 0 when fewer than two groups are present)."""
  means, present = group_means(values, group, num_groups, weights)
  hi = jnp.max(jnp.where(present, means, -jnp.inf))
  lo = jnp.min(jnp.where(present, means, jnp.inf))
  return jnp.where(present.sum() >= 2, hi - lo, 0.0)


def value_unfairness(pred: jax.Array, y: jax.Array, item_key: jax.Array, group: jax.Array,
                     num_groups: int) -> jax.Array:
  """Yao & Huang's (2017) value unfairness over the items rated by both groups.

  ``U_val = mean_j | (E_0[y_hat]_j - E_0[r]_j) - (E_1[y_hat]_j - E_1[r]_j) |`` where
  ``E_g[.]_j`` averages over group g's rows of item j, and j runs over the items that
  both groups rated among the given rows (each such item counts once). With more than two
  groups the inner |.| is max - min over the groups that rated the item. 0 when no item
  was rated by two groups.

  The schema has no item-id column, so an item is identified by its item-field
  columns: items with identical features count as one item.

  Args:
    pred, y: float[B, Q] predictions and ratings; item_key: int[B, Q, K] item columns;
    group: int[B] group of each user.
  """
  b, q = pred.shape
  dev = (pred - y).reshape(b * q)
  key = item_key.reshape(b * q, -1)
  same = jnp.all(key[:, None, :] == key[None, :, :], axis=-1).astype(dev.dtype)  # [N, N]
  onehot = jax.nn.one_hot(jnp.repeat(group, q), num_groups, dtype=dev.dtype)     # [N, G]
  count = same @ onehot                                  # rows of row i's item per group
  mean_dev = (same @ (onehot * dev[:, None])) / jnp.maximum(count, 1.0)
  rated = count > 0
  hi = jnp.max(jnp.where(rated, mean_dev, -jnp.inf), axis=-1)
  lo = jnp.min(jnp.where(rated, mean_dev, jnp.inf), axis=-1)
  both = rated.sum(-1) >= 2
  # Row i stands for 1/n_i of its item, so every shared item has total weight 1.
  w = jnp.where(both, 1.0 / same.sum(-1), 0.0)
  spread = jnp.where(both, hi - lo, 0.0)
  return jnp.sum(w * spread) / jnp.maximum(jnp.sum(w), 1e-12)


def uniform_batches(key: jax.Array, num_users: int, batch_size: int) -> jax.Array:
  """An epoch of the Origin sampler: shuffle the users, ``num_users // B`` batches.

  Returns: int32[steps, B] user indices.
  """
  steps = num_users // batch_size
  perm = jax.random.permutation(key, num_users)
  return perm[: steps * batch_size].reshape(steps, batch_size).astype(jnp.int32)


def group_pool_batches(key: jax.Array, group: jax.Array, p: jax.Array, num_groups: int,
                       batch_size: int) -> jax.Array:
  """An epoch of the FAST code's sampler (docs/methods.md §1.3).

  Each group's users are shuffled once per epoch into a pool read by a cyclic pointer.
  Every step draws the group of each of the B slots from ``p`` (so group g gets
  ``k_g ~ Multinomial(B, p)`` users) and takes the next ``k_g`` users of pool g, wrapping
  at its end; the minority can thus appear more than once per epoch.

  Args:
    group: int32[N] group of every training user.
  Returns:
    int32[steps, B] user indices, steps = N // B.
  """
  n = group.shape[0]
  steps = n // batch_size
  k_perm, k_draw = jax.random.split(key)
  # Pools: users sorted by (group, random key); pool g occupies rows start_g..start_g+n_g.
  order = jnp.lexsort((jax.random.uniform(k_perm, (n,)), group))
  n_g = jnp.bincount(group, length=num_groups)
  start = jnp.cumsum(n_g) - n_g
  probs = jnp.where(n_g > 0, p, 0.0)
  logp = jnp.log(probs / probs.sum())

  def step(pointer, key_t):
    slot_group = jnp.sort(jax.random.categorical(key_t, logp, shape=(batch_size,)))
    k = jnp.bincount(slot_group, length=num_groups)
    rank = jnp.arange(batch_size) - (jnp.cumsum(k) - k)[slot_group]
    pos = (pointer[slot_group] + rank) % jnp.maximum(n_g[slot_group], 1)
    return (pointer + k) % jnp.maximum(n_g, 1), order[start[slot_group] + pos]

  _, batches = jax.lax.scan(step, jnp.zeros(num_groups, jnp.int32),
                            jax.random.split(k_draw, steps))
  return batches.astype(jnp.int32)
