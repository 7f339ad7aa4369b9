"""The attacker AUC: rank AUC with ties, planted leaks, real representations, nulls."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fast_jax import attack, meta
from fast_jax.config import Config, resolve
from fast_jax.experiment import aggregate
from fast_jax.methods import learner as learn
from fast_jax.models import make_backbone
from fast_jax.runner import Runner, map_chunks


def _pairwise_auc(scores, labels):
  pos, neg = scores[labels], scores[~labels]
  pairs = list(itertools.product(pos, neg))
  return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def test_rank_auc_equals_the_pairwise_definition_with_ties():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 4, 60).astype(float)  # many ties
  labels = rng.random(60) < 0.4
  np.testing.assert_allclose(attack.roc_auc(scores, labels), _pairwise_auc(scores, labels))
  assert attack.roc_auc(np.ones(10), np.arange(10) < 3) == 0.5
  assert attack.roc_auc(np.arange(10.0), np.arange(10) >= 5) == 1.0


def _planted(n, rng, leak=True):
  group = (rng.random(n) < 0.35).astype(np.int32)
  h = rng.normal(size=(n, 8))
  if leak:
    h[:, 3] += 3.0 * group  # one coordinate carries the group
  return h, group


def test_attacker_finds_a_planted_leak_and_nothing_in_shuffled_labels():
  rng = np.random.default_rng(0)
  h_train, g_train = _planted(600, rng)
  h_test, g_test = _planted(300, rng)
  leak = attack.attack_auc(h_train, g_train, h_test, g_test, num_groups=2)
  assert leak["auc_attack"] > 0.95
  shuffled = attack.attack_auc(h_train, rng.permutation(g_train), h_test, rng.permutation(g_test),
                               num_groups=2)
  assert abs(shuffled["auc_attack"] - 0.5) < 0.1
  assert shuffled["auc_attack_max"] >= shuffled["auc_attack"]


def test_attacker_report_on_adapted_representations_of_real_users(prepared):
  data = prepared("ml100k")
  cfg = resolve(Config(dataset="ml100k", method="origin"), "ml100k")
  runner = Runner(cfg, data)
  state = runner.method.init(jax.random.key(0))
  reps = {s: runner.representations(state, s) for s in ("train", "test")}
  chex.assert_shape(reps["test"], (data.test.num_users, 32))
  assert np.all(reps["test"] >= 0)  # ReLU outputs of user_fc
  report = attack.report(reps["train"], data.train.group, reps["test"], data.test.group,
                         epochs=10)
  assert 0.0 <= report["auc_attack"] <= 1.0


def test_a_backbone_without_user_fields_reports_a_null_auc_with_a_note():
  items_only = {"fields": [{"name": "item", "side": "item", "kind": "categorical", "start": 0,
                            "stop": 1, "vocab_size": 5}],
                "sensitive": {"column": None, "groups": ["a", "b"]}}
  backbone = make_backbone(items_only)
  x = jnp.zeros((3, 12, 1), jnp.int32)
  params = backbone.init(jax.random.key(0), x[0])
  learner = learn.maml(backbone, backbone.labels(params), steps=1, first_order=False)
  y, length, group = jnp.ones((3, 12)), jnp.full((3,), 12), jnp.array([0, 1, 0])
  support, _ = meta.last_query_split(length, 12)
  represent = jax.jit(lambda *a: learn.represent(learner, params, 0.01, *a))
  reps = map_chunks(represent, (x, y, support, support, group), chunk=2)
  report = attack.report(reps, np.asarray(group), reps, np.asarray(group))
  assert reps is None
  assert report["auc_attack"] is None and "no user" in report["auc_attack_note"]


def test_aggregate_skips_null_attacker_aucs():
  base = {"mae": 1.0, "mse": 1.0, "ndcg3": 0.5, "gf_mae": 0.1, "gf_mse": 0.1, "gf_ndcg3": 0.0,
          "group": {}}
  seeds = [{**base, "auc_attack": 0.6}, {**base, "auc_attack": None}, {**base, "auc_attack": 0.8}]
  out = aggregate(seeds)
  np.testing.assert_allclose(out["mean"]["auc_attack"], 0.7)
  none = aggregate([{**base, **attack.unavailable("no representation")}])
  assert "auc_attack" not in none["mean"]
