"""Attacker AUC: how much of the sensitive attribute the adapted user representations leak.

CLOVER's individual-fairness probe (docs/methods.md §6.3), run after training for every
meta-learning method and backbone:

1. adapt every training and every test user on its support set (the fixed split: the
   last 10 valid rows are the query), with the method's own inner loop;
2. take the user's *adapted* representation: the mean over its valid rows of the user
   tower's output ``relu(user_fc(e_user))`` (the same on every row of a user);
3. train a small attacker, Linear(D -> 32) -> ReLU -> Linear(32 -> G), with cross-entropy
   on the training users' representations to predict the sensitive group (Adam 1e-3,
   batches of 128 in a fixed order, 100 epochs, fixed initialisation seed);
4. report the ROC-AUC of the attacker's P(group 1) on the test users after the last epoch
   (``auc_attack``; 0.5 = nothing leaks) and, as the sensitivity check docs/methods.md §6.3
   recommends because the authors' code does not say which epoch the paper reports, the
   best AUC over the epochs (``auc_attack_max``).

With more than two groups the AUC is the macro mean of the one-vs-rest AUCs.

A method without a user representation reports :func:`unavailable` instead:
``{"auc_attack": None, "auc_attack_note": "<why>"}``; ``experiment.aggregate`` skips nulls.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


EPOCHS = 100
BATCH_SIZE = 128
LEARNING_RATE = 1e-3
HIDDEN = 32
SEED = 0


def unavailable(reason: str) -> dict:
  """The report entry of a method that has no user representation to attack."""
  return {"auc_attack": None, "auc_attack_note": reason}


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Rank-based (Mann-Whitney) ROC-AUC of ``scores`` for binary ``labels`` (1 = positive).

  Tied scores share their average rank, so a constant score gives exactly 0.5.
  NaN if one of the classes is empty.
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels).astype(bool)
  n_pos, n_neg = int(labels.sum()), int((~labels).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = scores[order]
  ranks = np.empty(len(scores), np.float64)
  # Average 1-based rank over each run of equal scores.
  starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
  ends = np.r_[starts[1:], len(scores)]
  for s, e in zip(starts, ends):
    ranks[order[s:e]] = (s + 1 + e) / 2.0
  return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def multiclass_auc(probs: np.ndarray, labels: np.ndarray) -> float:
  """AUC of P(class 1) for two classes; macro one-vs-rest AUC over the classes present
  otherwise. probs: float[N, G]; labels: int[N]."""
  g = probs.shape[-1]
  if g == 2:
    return roc_auc(probs[:, 1], labels == 1)
  aucs = [roc_auc(probs[:, c], labels == c) for c in range(g)]
  aucs = [a for a in aucs if not np.isnan(a)]
  return float(np.mean(aucs)) if aucs else float("nan")


class AttackerMLP(nn.Module):
  """Linear(D -> hidden) -> ReLU -> Linear(hidden -> classes)."""
  classes: int = 2
  hidden: int = HIDDEN

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    return nn.Dense(self.classes)(nn.relu(nn.Dense(self.hidden)(h)))


def train_attacker(features: np.ndarray, labels: np.ndarray, eval_features: np.ndarray, *,
                   num_classes: int, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE,
                   lr: float = LEARNING_RATE, hidden: int = HIDDEN,
                   seed: int = SEED) -> np.ndarray:
  """Train the attacker and return its class probabilities on ``eval_features`` after
  every epoch.

  Args:
    features: float[N, D] training representations; labels: int[N] groups.
    eval_features: float[M, D].
  Returns:
    float[epochs, M, num_classes].
  """
  n, d = features.shape
  steps = -(-n // batch_size)
  pad = steps * batch_size - n
  # Fixed batch order (the authors' attacker does not shuffle); the last batch is padded
  # and its padding rows are masked out of the loss.
  xb = jnp.asarray(np.concatenate([features, np.zeros((pad, d))]), jnp.float32)
  yb = jnp.asarray(np.concatenate([labels, np.zeros(pad, labels.dtype)]), jnp.int32)
  mb = jnp.asarray(np.r_[np.ones(n), np.zeros(pad)], jnp.float32)
  xb, yb, mb = (a.reshape((steps, batch_size) + a.shape[1:]) for a in (xb, yb, mb))
  x_eval = jnp.asarray(eval_features, jnp.float32)

  params = _init(xb[0], num_classes, hidden, seed)
  return np.asarray(_fit(params, xb, yb, mb, x_eval, classes=num_classes, hidden=hidden, lr=lr,
                         epochs=epochs))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init(x, classes: int, hidden: int, seed: int):
  return AttackerMLP(classes=classes, hidden=hidden).init(jax.random.key(seed), x)["params"]


# Jitted once per process on its static settings, so the attacker of every seed and every
# run of a process (and, through the persistent cache, of a machine) reuses one program.
@functools.partial(jax.jit, static_argnames=("classes", "hidden", "lr", "epochs"))
def _fit(params, xb, yb, mb, x_eval, *, classes: int, hidden: int, lr: float, epochs: int):
  model, tx = AttackerMLP(classes=classes, hidden=hidden), optax.adam(lr)

  def step(carry, batch):
    params, opt_state = carry
    x, y, m = batch

    def loss_fn(p):
      ce = optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y)
      return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  def epoch(carry, _):
    carry, _ = jax.lax.scan(step, carry, (xb, yb, mb))
    return carry, jax.nn.softmax(model.apply({"params": carry[0]}, x_eval))

  _, probs = jax.lax.scan(epoch, (params, tx.init(params)), None, length=epochs)
  return probs


def attack_auc(train_repr: np.ndarray, train_group: np.ndarray, test_repr: np.ndarray,
               test_group: np.ndarray, *, num_groups: int, **kwargs) -> dict:
  """``{"auc_attack": final-epoch AUC, "auc_attack_max": best AUC over epochs}`` of an
  attacker trained on (train_repr, train_group) and scored on the test users."""
  if len(np.unique(train_group)) < 2 or len(np.unique(test_group)) < 2:
    return unavailable("the attacker needs both groups among the training and test users")
  probs = train_attacker(train_repr, train_group, test_repr, num_classes=num_groups, **kwargs)
  aucs = np.array([multiclass_auc(p, test_group) for p in probs])
  return {"auc_attack": float(aucs[-1]), "auc_attack_max": float(np.nanmax(aucs))}


def report(train_repr: np.ndarray | None, train_group: np.ndarray, test_repr: np.ndarray,
           test_group: np.ndarray, **kwargs) -> dict:
  """The attacker entries of a per-seed report (see the module docstring), from the
  adapted representations float[N, D] of the training and test users (None: the
  learner has no user representation)."""
  if train_repr is None:
    return unavailable("the backbone has no user fields, so no user representation")
  num_groups = int(max(train_group.max(), test_group.max())) + 1
  return attack_auc(train_repr, train_group, test_repr, test_group,
                    num_groups=max(num_groups, 2), **kwargs)
