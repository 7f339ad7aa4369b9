"""Meta-training end to end: shapes, partition, no retracing, jit agreement, real runs."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax

from fast_jax import meta
from fast_jax.config import Config, resolve
from fast_jax.experiment import train_and_evaluate
from fast_jax.methods import fast, origin, static
from fast_jax.methods import learner as learn
from fast_jax.methods.base import TrainState, make_context, scan_epoch
from fast_jax.models import LOCAL, make_backbone
from fast_jax.runner import Runner


def test_melu_forward_shapes_and_local_partition(prepared):
  data = prepared("ml100k")
  bb = make_backbone(data.meta)
  x = jnp.asarray(data.train.x[:3])
  params = bb.init(jax.random.key(0), x)
  chex.assert_shape(bb.apply(params, x), x.shape[:2])
  labels = bb.labels(params)
  local = {k for k, v in labels.items() if set(jax.tree.leaves(v)) == {LOCAL}}
  assert local == {"item_fc", "user_fc", "fc1", "fc2"}  # the FAST code's local tensors
  assert set(jax.tree.leaves(make_backbone(data.meta, local_output=True).labels(params)["out"])) \
      == {LOCAL}
  # PyTorch-style init: dense weights and biases within +-1/sqrt(fan_in).
  fan_in = params["fc1"]["kernel"].shape[0]
  assert float(jnp.abs(params["fc1"]["bias"]).max()) <= 1 / np.sqrt(fan_in)
  # The stages compose to the full forward pass.
  e = bb.embed(params, x)
  chex.assert_trees_all_close(bb.head(params, e), bb.apply(params, x), rtol=1e-6)


def test_drop_sensitive_removes_the_attribute_from_the_inputs(prepared):
  data = prepared("ml100k")
  col = data.meta["sensitive"]["column"]
  bb = make_backbone(data.meta, drop_sensitive=True)
  x = jnp.asarray(data.train.x[:2])
  params = bb.init(jax.random.key(0), x)
  flipped = x.at[..., col].set(1 - x[..., col])
  chex.assert_trees_all_close(bb.apply(params, x), bb.apply(params, flipped))
  assert not any("gender" in k for k in params)


def _meta(cfg, data, *, run=meta.whole_batch, obj=None):
  """(context, learner, train step, initial state) of a meta-learning ``cfg``."""
  ctx = make_context(cfg, data)
  backbone, labels = learn.network(ctx)
  lrn = learn.maml(backbone, labels, steps=cfg.inner_steps, first_order=cfg.first_order)
  rate, tx = learn.inner_rate(cfg), optax.adam(cfg.lr)
  obj = obj or _objective(ctx)
  step = fast.make_train_step(lrn, obj, rate, tx, ctx=ctx, run=run)
  return ctx, lrn, step, fast.init_state(ctx, backbone, labels, rate, tx, jax.random.key(0))


def _objective(ctx):
  return {"fast": fast.objective, "origin": lambda ctx: origin.OBJECTIVE,
          "static": lambda ctx: static.OBJECTIVE}[ctx.cfg.method](ctx)


def _batch(ctx, n=8):
  return jax.tree.map(lambda a: a[:n], ctx.splits["train"])


class TrainStepTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_no_jit_meta_losses_agree(self):
    ctx, lrn, _, state = _meta(resolve(Config(dataset="synthetic", method="fast")), self._data)
    batch = _batch(ctx, 2)
    support, query = meta.last_query_split(batch["length"], ctx.max_len)

    def loss(params):
      pred = learn.predict(lrn, params, state.alpha, batch["x"], batch["y"], support, query,
                           batch["group"])
      return learn.query_errors(pred, meta.take_rows(batch["y"], query))[0].mean()
    value, grads = self.variant(jax.value_and_grad(loss))(state.params)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(loss))(state.params)
    chex.assert_trees_all_close((value, grads), (ref_value, ref_grads), rtol=1e-4, atol=1e-6)

  def test_metacs_train_step_learns_its_inner_rate(self):
    cfg = resolve(Config(dataset="synthetic", method="fast", backbone="metacs", lr=1e-3))
    ctx, _, step, state = _meta(cfg, self._data)
    new_state, out = jax.jit(step)(state, _batch(ctx, 4), jax.random.key(1))
    assert float(new_state.alpha) != float(state.alpha)
    assert np.isfinite(float(out["outer_loss"]))

  @pytest.fixture(autouse=True)
  def _load(self, prepared):
    self._data = prepared("synthetic")


def test_train_epoch_compiles_once(prepared):
  data = prepared("ml100k")
  cfg = resolve(Config(dataset="ml100k", method="fast", batch_size=64), "ml100k")
  ctx, _, step, state = _meta(cfg, data)
  step = chex.assert_max_traces(step, n=1)
  epoch = scan_epoch(step, fast.batches(fast.objective(ctx), ctx))
  for e in range(3):  # p changes every step; shapes never do
    state, _ = epoch(state, ctx.splits["train"], jax.random.key(e))
  assert int(state.step) == 3 * (data.train.x.shape[0] // 64)


def test_batches_run_by_length_train_as_whole_batches_do(prepared):
  """MetaCS+FAST (both predict passes, p moving): one epoch with each batch's users in two
  length-sorted parts, the shorter part on 32 of the 40 rows when it fits, matches the
  whole-batch epoch."""
  data = prepared("synthetic")
  cfg = resolve(Config(dataset="synthetic", backbone="metacs", method="fast", batch_size=16,
                       lr=1e-3))
  ctx, _, whole_step, state = _meta(cfg, data)
  # synthetic users are too even for the default to split them
  assert learn.batch_runner(ctx, by_length=True) is meta.whole_batch
  _, _, by_length_step, _ = _meta(cfg, data, run=meta.length_bucketing((32, 40)))
  batches = fast.batches(fast.objective(ctx), ctx)
  a, metrics_a = scan_epoch(by_length_step, batches)(state, ctx.splits["train"],
                                                     jax.random.key(1))
  b, metrics_b = scan_epoch(whole_step, batches)(state, ctx.splits["train"], jax.random.key(1))
  chex.assert_trees_all_close((a.params, a.alpha, a.p), (b.params, b.alpha, b.p), rtol=1e-4,
                              atol=1e-6)
  chex.assert_trees_all_close(metrics_a["loss"], metrics_b["loss"], rtol=1e-5)
  assert not np.allclose(a.p, state.p)
  halves = np.sort(np.random.default_rng(0).choice(data.train.length, (1000, 16)), axis=1)
  assert 0.05 < np.mean(halves[:, 7] <= 32) < 0.95


def test_static_trains_on_group_balanced_batches_with_p_fixed(prepared):
  """Static draws each batch from per-group pools with p = 1/2 whatever --p-update says:
  on data with three majority users per minority user, its batches hold both groups
  about equally, and p stays at 1/2."""
  data = prepared("synthetic", num_minority=40, num_majority=120)
  for p_update in ("step", "epoch"):
    cfg = resolve(Config(dataset="synthetic", method="static", p_update=p_update,
                         batch_size=16, lr=1e-3), data.name)
    runner = Runner(cfg, data)
    state = runner.method.init(jax.random.key(0))
    batches = fast.batches(static.OBJECTIVE, runner.ctx)(state, runner.ctx.splits["train"],
                                                         jax.random.key(1))
    minority = np.mean(np.asarray(data.train.group)[np.asarray(batches)] == 0)
    assert 0.4 < minority < 0.6 and np.mean(data.train.group == 0) < 0.3
    state, steps = runner.method.epoch(state, runner.ctx.splits["train"], jax.random.key(1))
    np.testing.assert_array_equal(state.p, [0.5, 0.5])
    assert np.all(np.isfinite(steps["loss"]))


def test_two_epoch_run_on_ml100k_training_loss_falls(prepared, tmp_path):
  data = prepared("ml100k")
  cfg = Config(dataset="ml100k", method="fast", p_update="epoch", epochs=2, seeds=1, lr=1e-3,
               attack=False)
  results = train_and_evaluate(cfg, tmp_path, data=data, progress=False, echo=lambda s: None)
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == [1, 2]
  assert records[1]["train_loss"] < records[0]["train_loss"]
  assert records[0]["p"] != [0.5, 0.5]  # epoch mode moved p from the full-train gap
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["per_seed"][0]["seed"] == 1024
  for key in ("mae", "mse", "ndcg3", "gf_mae", "gf_mse", "gf_ndcg3"):
    assert np.isfinite(saved["mean"][key]) and saved["std"][key] == 0.0
  assert saved["per_seed"][0]["group"]["1"]["n"] == int((data.test.group == 1).sum())
  cfg_json = json.loads((tmp_path / "config.json").read_text())
  assert cfg_json["gamma"] == 2.0 and cfg_json["tau"] == 0.2  # paper Table 3, ML-100K
  assert "jax" in cfg_json["versions"]
  assert results["mean"]["mae"] == saved["mean"]["mae"]


def test_fast_closes_at_least_half_of_origins_gap_on_theorem1_data(prepared):
  """Theorem 1: with imbalanced groups the meta-learned model serves the minority worse;
  FAST's adaptive sampling should remove most of that gap."""
  data = prepared("synthetic", num_minority=80, num_majority=320)
  n = data.meta["counts"]["train"]["groups"]
  assert n[0] < n[1]  # group 0 is the minority
  report = {}
  for method in ("origin", "fast"):
    # The code preset (inner lr 1e-4, one step): a nearly global model, Theorem 1's setting.
    cfg = Config(dataset="synthetic", method=method, epochs=10, seeds=1, lr=1e-3, gamma=1.0,
                 attack=False, tau=0.2, out_bias="mean", preset="code")
    res = train_and_evaluate(cfg, None, data=data, progress=False, echo=lambda s: None)
    report[method] = res["mean"]["group"]
  gap = {m: r["0"]["mae"] - r["1"]["mae"] for m, r in report.items()}
  assert gap["origin"] > 0.3  # origin favours the larger group
  assert abs(gap["fast"]) <= 0.5 * gap["origin"]


@pytest.mark.slow  # about 40-55 s on 2 shared cores: 6 runs of 30 epochs
def test_p_average_converges_and_closes_half_of_origins_gap_at_every_outer_lr(prepared):
  """--p-average (issue 16's acceptance) on Theorem-1 data, gamma 1, tau 0.1: for each
  outer lr, FAST's test GF(MAE) is at most half of Origin's and p0 stays within +-0.05
  over the last 10 of 30 epochs. The paper's rule fails the second check (p0 spans
  [0, 1] there on every lr)."""
  data = prepared("synthetic", num_minority=40, num_majority=160)
  for lr in (1e-3, 5e-3, 1e-2):
    gf = {}
    for method in ("origin", "fast"):
      cfg = resolve(Config(dataset="synthetic", method=method, epochs=30, lr=lr, gamma=1.0,
                           tau=0.1, batch_size=16, out_bias="mean", attack=False,
                           p_average=method == "fast", preset="code"), data.name)
      records = []
      _, report = Runner(cfg, data).run_seed(1024, log=records.append, progress=False)
      gf[method] = report["gf_mae"]
      p0 = np.array([r["p"][0] for r in records[-10:]])
    assert p0.max() - p0.min() <= 0.1, (lr, p0)
    assert gf["fast"] <= 0.5 * gf["origin"], (lr, gf)


@pytest.mark.parametrize("p_average, cap", [(False, 0.1), (True, 0.1 / 4)])
def test_epoch_mode_p_average_decays_the_cap_with_the_epochs_done(prepared, p_average, cap):
  """Epoch mode: after 3 epochs of T steps, --p-average caps the update at tau / (1 + 3)."""
  data = prepared("synthetic", num_minority=12, num_majority=36)
  cfg = resolve(Config(dataset="synthetic", method="fast", p_update="epoch", batch_size=8,
                       gamma=1.0, tau=0.1, p_average=p_average), data.name)
  ctx = make_context(cfg, data)
  group = np.asarray(data.train.group)
  state = TrainState(params=(), opt_state=(), step=jnp.int32(3 * fast.steps_per_epoch(ctx)),
                     p=jnp.array([0.5, 0.5]), hyper={"gamma": 1.0, "tau": 0.1})
  evaluate = lambda state, split: {"mae": np.where(group == 0, 2.0, 0.0)}  # group 0 worse
  state, _ = fast.epoch_p_update(ctx)(state, evaluate)
  np.testing.assert_allclose(state.p, [0.5 + cap, 0.5 - cap], atol=1e-6)


# Whose group gap drives FAST's p (--gap-users).
GAP_USERS = ["train", "valid"]


@pytest.mark.parametrize("gap_users", GAP_USERS)
def test_epoch_mode_p_moves_on_the_gap_of_the_chosen_users(prepared, gap_users):
  """Epoch mode: the end-of-epoch gap is read from the chosen split's users, with their
  own groups (here group 0 is worse only on that split, so p0 must rise)."""
  data = prepared("synthetic", num_minority=12, num_majority=36)
  cfg = resolve(Config(dataset="synthetic", method="fast", p_update="epoch", batch_size=8,
                       gamma=1.0, tau=0.1, gap_users=gap_users), data.name)
  ctx = make_context(cfg, data)
  asked = []

  def evaluate(state, split):
    asked.append(split)
    group = np.asarray(data.split(split).group)
    return {"mae": np.where(group == 0, 2.0, 0.0)}
  state = TrainState(params=(), opt_state=(), step=jnp.int32(0), p=jnp.array([0.5, 0.5]),
                     hyper={"gamma": 1.0, "tau": 0.1})
  state, _ = fast.epoch_p_update(ctx)(state, evaluate)
  assert asked == [gap_users]
  np.testing.assert_allclose(state.p, [0.6, 0.4], atol=1e-6)


def test_step_mode_valid_gap_is_the_validation_users_adapted_query_loss(prepared):
  """--gap-users valid, step mode: with a batch at least as large as the validation
  split every validation user is drawn, so the step's group losses equal the group means
  of the evaluator's per-user query MSE under the state before the step."""
  data = prepared("synthetic", num_minority=20, num_majority=60)
  n_valid = data.valid.x.shape[0]
  cfg = resolve(Config(dataset="synthetic", method="fast", gamma=1.0, tau=0.2, lr=1e-3,
                       batch_size=max(16, n_valid), gap_users="valid", epochs=1), data.name)
  runner = Runner(cfg, data)
  m = runner.method
  state = m.init(jax.random.key(0))
  per_user = runner.per_user(state, "valid")["mse"]
  group = np.asarray(data.valid.group)
  expected = [per_user[group == g].mean() for g in range(2)]
  steps = m.epoch(state, m.splits["fit"], jax.random.key(1))[1]
  np.testing.assert_allclose(np.asarray(steps["group_loss"])[0], expected, rtol=1e-4)
  train = Runner(cfg.replace(gap_users="train"), data)
  steps_train = train.method.epoch(state, train.method.splits["fit"], jax.random.key(1))[1]
  assert not np.allclose(np.asarray(steps_train["group_loss"])[0], expected, rtol=1e-3)


# (backend, training steps, default length parts): by length only on a CPU and long runs.
LENGTH_PARTS = [("cpu", 600, 2), ("cpu", 100, 1), ("gpu", 600, 1), ("tpu", 600, 1)]


@pytest.mark.parametrize("backend, steps, parts", LENGTH_PARTS)
def test_default_length_parts_depend_on_the_backend_and_the_run_length(prepared, backend,
                                                                        steps, parts):
  data = prepared("synthetic", num_minority=12, num_majority=36)
  per_epoch = data.train.x.shape[0] // 8
  cfg = resolve(Config(dataset="synthetic", batch_size=8, epochs=-(-steps // per_epoch)),
                data.name)
  ctx = make_context(cfg, data)
  assert learn.length_parts(ctx, backend=backend) == parts
  assert learn.length_parts(make_context(cfg.replace(length_parts=3), data),
                            backend=backend) == 3
