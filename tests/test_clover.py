"""CLOVER: presets, the min-max game, the inner-loop switches, rating classes, flag errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import traverse_util

from fast_jax import meta
from fast_jax.config import CLOVER_PRESETS, Config, resolve
from fast_jax.experiment import UsageError, check_config
from fast_jax.methods import clover
from fast_jax.methods import learner as learn
from fast_jax.methods.base import make_context
from fast_jax.models import split_params

PRESETS = tuple(CLOVER_PRESETS)
# Each test program runs once or twice: skipping XLA's backend optimisations halves the
# compile time and leaves the results unchanged.
quick_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _cfg(**kw):
  """CLOVER on ML-100K; the code preset (argmax decode, output bias from the init) unless
  ``preset`` is given."""
  return resolve(Config(dataset="ml100k", method="clover", **{"preset": "code", **kw}),
                 "ml100k")


@pytest.fixture(scope="module")
def preset_runs(prepared):
  """preset -> (players, jitted step, initial state, 16-user batch); built once each."""
  data = prepared("ml100k")
  memo = {}

  def get(preset):
    if preset not in memo:
      ctx = make_context(_cfg(clover_preset=preset), data)
      players, step, init = clover.game(ctx)
      batch = jax.tree.map(lambda a: a[:16], ctx.splits["train"])
      memo[preset] = (players, quick_jit(step), quick_jit(init)(jax.random.key(0)), batch)
    return memo[preset]
  return get


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_runs_a_step_on_real_data_with_finite_losses(preset_runs, preset):
  players, step, state, batch = preset_runs(preset)
  new_state, out = step(state, batch, jax.random.key(1))
  for key in ("loss", "adv_loss", "outer_loss"):
    assert np.isfinite(out[key]), key
  np.testing.assert_allclose(out["outer_loss"], out["loss"] - players.spec.lam1 * out["adv_loss"],
                             rtol=1e-5)
  # CE over the 5 rating classes; the adversaries the README configuration names.
  chex.assert_shape(new_state.params["out"]["kernel"], (64, 5))
  assert set(new_state.extra["adv"]) == ({"a1", "a2"} if preset == "full" else {"a1"})
  if preset == "full":  # A2's item branch (out of place, docs/methods.md §6.5)
    assert "fc_item" in new_state.extra["adv"]["a2"]
  assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), state.params,
                                       new_state.params))


def test_recommender_update_raises_and_adversary_update_lowers_the_adversary_loss(preset_runs):
  _, step, state, batch = preset_runs("full")
  key = jax.random.key(1)
  after, out = step(state, batch, key)
  # Same step counter and key, so the same support/query split: only the players differ.
  _, rec_moved = step(state.replace(params=after.params), batch, key)
  _, adv_moved = step(state.replace(extra=after.extra), batch, key)
  assert rec_moved["adv_loss"] > out["adv_loss"]
  assert adv_moved["adv_loss"] < out["adv_loss"]
  assert rec_moved["loss"] < out["loss"]  # and it still learns to rate


@pytest.mark.parametrize("inner_max", [False, True])
def test_one_backward_pass_gives_the_adversary_the_two_pass_gradient(prepared, inner_max):
  """Without the fooling term (the full preset) the recommender's query loss does not
  see the adversary, so the backward pass of L_rec - lambda_1 L_adv also gives -lambda_1
  G_A (the default); with it and a second-order meta-gradient, G_A needs its own pass
  (and the default takes it)."""
  ctx = make_context(_cfg(clover_preset="full", disable_inner_max=not inner_max),
                     prepared("ml100k"))
  players, _, init = clover.game(ctx, run=meta.whole_batch)
  assert players.spec.inner_max == inner_max
  state = quick_jit(init)(jax.random.key(0))
  batch = jax.tree.map(lambda a: a[:16], ctx.splits["train"])
  support, query = meta.query_split(jax.random.key(1), batch["length"], ctx.max_len, "random")

  def objectives(rec, adv):
    l_rec, l_adv = players.batch_losses(rec, adv, state.alpha, batch, support, query)
    return (jnp.mean(l_rec), jnp.mean(l_adv)), l_rec

  @quick_jit
  def both(rec, adv):
    return [clover.player_grads(objectives, rec, adv, players.spec.lam1, one_pass=p)[2:]
            for p in (True, False)]
  (rec1, adv1), (rec2, adv2) = both(state.params, state.extra["adv"])
  chex.assert_trees_all_close(rec1, rec2)
  if inner_max:
    assert not np.allclose(adv1["a1"]["fc"]["kernel"], adv2["a1"]["fc"]["kernel"],
                           rtol=1e-3, atol=1e-6)
  else:
    chex.assert_trees_all_close(adv1, adv2, rtol=1e-5, atol=1e-8)
    assert np.abs(adv2["a1"]["fc"]["kernel"]).max() > 1e-4  # a real gradient


def test_clover_step_by_length_matches_the_whole_batch_step(prepared):
  """MetaCS + an adversary + the inner max (every pass through batch_losses): a step
  with the batch's shorter half on only the rows it needs equals the whole-batch step.
  First order keeps the compilation short; the second-order meta-gradient through
  by_rows is checked in test_meta."""
  ctx = make_context(_cfg(backbone="metacs", clover_preset="a1", disable_inner_max=False,
                          first_order=True), prepared("ml100k"))
  batch = jax.tree.map(lambda a: a[:16], ctx.splits["train"])
  lengths = np.sort(np.asarray(batch["length"]))
  budget = int(-(-lengths[7] // 8) * 8)  # the shorter half fits whatever the query split
  assert budget < ctx.max_len
  _, by_length, init = clover.game(ctx, run=meta.length_bucketing((budget, ctx.max_len)))
  _, whole, _ = clover.game(ctx, run=meta.whole_batch)
  state = quick_jit(init)(jax.random.key(0))
  a, out_a = quick_jit(by_length)(state, batch, jax.random.key(1))
  b, out_b = quick_jit(whole)(state, batch, jax.random.key(1))
  chex.assert_trees_all_close((a.params, a.alpha, a.extra), (b.params, b.alpha, b.extra),
                              rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close({k: out_a[k] for k in ("loss", "adv_loss", "group_loss")},
                              {k: out_b[k] for k in ("loss", "adv_loss", "group_loss")},
                              rtol=1e-5)
  assert not np.allclose(a.alpha, state.alpha)  # the inner-rate pass ran


# (dataset, the row budgets of a CLOVER step at the 50-epoch defaults): the same as the
# other meta-learners' (ML-1M's shorter half needs 56 of 100 rows).
CLOVER_BUDGETS = [("ml100k", (48, 100)), ("ml1m", (56, 100))]


@pytest.mark.parametrize("dataset, budgets", CLOVER_BUDGETS)
def test_clover_runs_by_length_on_the_budgets_of_the_other_meta_learners(prepared, monkeypatch,
                                                                         dataset, budgets):
  """With the parts chosen outside the gradients (meta.switch_parts), CLOVER's step gains
  from the parts where FAST's does; it used to need a shorter part (at most half the rows,
  so not on ML-1M)."""
  runners = []
  batch_runner = learn.batch_runner

  def spy(ctx, **kw):
    runners.append(batch_runner(ctx, **kw))
    return runners[-1]
  monkeypatch.setattr(learn, "batch_runner", spy)
  cfg = resolve(Config(dataset=dataset, method="clover"), dataset)
  ctx = make_context(cfg, prepared(dataset))
  clover.game(ctx)
  assert [r.budgets for r in runners] == [budgets]
  assert learn.row_budgets(make_context(cfg.replace(method="fast"), ctx.data)) == budgets


@pytest.fixture(scope="module")
def one_user(prepared):
  """CLOVER's players with the inner max on, their initial state and one ML-100K user."""
  ctx = make_context(_cfg(disable_inner_max=False, inner_lr=0.05), prepared("ml100k"))
  players, _, init = clover.game(ctx)
  state = quick_jit(init)(jax.random.key(0))
  data = ctx.splits["train"]
  support, _ = meta.last_query_split(data["length"][0], ctx.max_len)
  e = players.backbone.embed(state.params, data["x"][0])
  return players, state, (e, data["y"][0], support, data["group"][0])


# (inner max, inner adv): the fooling term and the adversary's inner step, each on or off.
INNER_SWITCHES = [(False, True), (True, True), (True, False)]


class OneUserTest(chex.TestCase):

  @pytest.fixture(autouse=True)
  def _user(self, one_user):
    self.players, self.state, self.user = one_user

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_no_jit_agree_on_both_players_losses(self):
    learner = self.players
    e, y, support, g = self.user
    losses = self.variant(lambda r, a: learner.losses(r, a, e, y, support, g))(
        self.state.params, self.state.extra["adv"])
    ref = jax.jit(lambda r, a: learner.losses(r, a, e, y, support, g))(
        self.state.params, self.state.extra["adv"])
    chex.assert_trees_all_close(losses, ref, rtol=1e-5)
    assert all(np.isfinite(v) for v in losses)

  def test_disable_flags_switch_off_players(self):
    learner, rec, adv = self.players, self.state.params, self.state.extra["adv"]
    e, y, support, g = self.user

    @quick_jit
    def variants(rec, adv):
      adapt = lambda **kw: learner.adapt(rec, adv, 0.05, e, y, support, g, **kw)
      return (adapt(inner_max=False, inner_adv=False), adapt(inner_max=False, inner_adv=True),
              adapt(inner_max=True, inner_adv=False))
    (plain, _), (no_max, moved_adv), (fooled, kept_adv) = variants(rec, adv)
    # Without the inner max the recommender's adaptation ignores the adversary.
    chex.assert_trees_all_close(plain, no_max, rtol=1e-5, atol=1e-7)
    # The fooling term changes it; without inner adv the adversary keeps its weights.
    assert not np.allclose(plain["fc1"]["kernel"], fooled["fc1"]["kernel"])
    chex.assert_trees_all_close(kept_adv, adv)
    assert not np.allclose(moved_adv["a1"]["fc"]["kernel"], adv["a1"]["fc"]["kernel"])

  @parameterized.parameters(*INNER_SWITCHES)
  def test_one_inner_step_moves_each_player_down_its_own_loss(self, inner_max, inner_adv):
    """phi_L <- phi_L - alpha grad_L [L_rec - [inner max] lambda_1 L_adv] and
    phi_A <- phi_A - alpha grad_A L_adv (docs/methods.md §6.2), against the gradients of
    the two losses taken separately, on a float64 NumPy update."""
    players, rec, adv = self.players, self.state.params, self.state.extra["adv"]
    e, y, support, g = self.user
    lam1, alpha = players.spec.lam1, 0.05
    one_step = clover.Players(players.backbone, players.labels, players.spec, inner_steps=1,
                              first_order=False, adv_inner_lr=alpha)

    @quick_jit
    def step_and_grads(rec, adv):
      theta, adv1 = one_step.adapt(rec, adv, alpha, e, y, support, g, inner_max=inner_max,
                                   inner_adv=inner_adv)
      grads = [jax.grad(lambda r, a: one_step.losses(r, a, e, y, support, g)[i],
                        argnums=(0, 1))(rec, adv) for i in (0, 1)]
      return theta, adv1, grads
    theta, adv1, ((g_rec_r, _), (g_adv_r, g_adv_a)) = step_and_grads(rec, adv)
    local = set(split_params(rec, players.labels)[0])
    flat = lambda t: traverse_util.flatten_dict(jax.tree.map(np.float64, t), sep="/")
    rec_f, theta_f, g_rec_f, g_fool_f = flat(rec), flat(theta), flat(g_rec_r), flat(g_adv_r)
    for k, v in rec_f.items():
      want = v - alpha * (g_rec_f[k] - (lam1 if inner_max else 0.0) * g_fool_f[k]) \
          if tuple(k.split("/")) in local else v
      np.testing.assert_allclose(theta_f[k], want, rtol=1e-4, atol=1e-6, err_msg=k)
    adv_f, adv1_f, g_a = flat(adv), flat(adv1), flat(g_adv_a)
    for k, v in adv_f.items():
      want = v - alpha * g_a[k] if inner_adv else v
      np.testing.assert_allclose(adv1_f[k], want, rtol=1e-4, atol=1e-6, err_msg=k)

  def test_classification_predicts_argmax_plus_the_lowest_rating(self):
    learner = self.players
    assert learner.spec.num_classes == 5  # ratings 1..5
    logits = jnp.eye(5)[jnp.array([0, 2, 4])] * 3.0
    np.testing.assert_array_equal(learner.to_rating(logits), [1.0, 3.0, 5.0])
    np.testing.assert_allclose(learner.rating_loss(logits, jnp.array([1.0, 3.0, 5.0])),
                               jax.nn.logsumexp(logits, -1) - 3.0, rtol=1e-6)


@pytest.mark.parametrize("how", clover.DECODES)
def test_decode_gives_the_numpy_argmax_or_expected_rating(how):
  logits = np.array([[0.0, 0.1, 0.2, 0.3, 0.25],     # nearly flat: argmax 4, mean near 3
                     [5.0, 0.0, 0.0, 0.0, 0.0],
                     [0.0, 0.0, 1.0, 1.0, -2.0]], np.float32)
  ratings = 1.0 + np.arange(5)
  prob = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  want = {"argmax": ratings[logits.argmax(-1)], "expected": prob @ ratings}[how]
  for fn in (clover.decode, jax.jit(clover.decode, static_argnums=(1, 2))):
    np.testing.assert_allclose(fn(jnp.asarray(logits), 1.0, how), want, rtol=1e-6)


def test_expected_decode_predicts_more_than_two_ratings_after_a_short_run(preset_runs,
                                                                         prepared):
  """The full preset after 3 steps on 16 ML-100K users: the argmax decode predicts at most
  two distinct ratings on their last-10 queries, the expected decode many, inside [1, 5]."""
  players, step, state, batch = preset_runs("full")
  for i in range(3):
    state, _ = step(state, batch, jax.random.key(i))
  ctx = make_context(_cfg(decode="expected"), prepared("ml100k"))
  expected, _, _ = clover.game(ctx)
  support, query = meta.last_query_split(batch["length"], ctx.max_len)
  params = {"rec": state.params, "adv": state.extra["adv"]}

  @quick_jit
  def predict(params, alpha):
    return [learn.predict(p.learner(), params, alpha, batch["x"], batch["y"], support, query,
                          batch["group"]) for p in (players, expected)]
  by_argmax, by_expectation = map(np.asarray, predict(params, state.alpha))
  assert np.unique(by_argmax).size <= 2
  assert np.unique(by_expectation.round(3)).size > 2
  assert by_expectation.min() >= 1.0 and by_expectation.max() <= 5.0


# What each preset fills in for CLOVER's rating classes: (decode, output bias).
CLASS_DEFAULTS = [("code", "argmax", "init"), ("validated", "expected", "mean")]


@pytest.mark.parametrize("preset, decode, out_bias", CLASS_DEFAULTS)
def test_presets_fill_the_decode_and_the_class_bias(preset, decode, out_bias):
  cfg = _cfg(preset=preset)
  assert (cfg.loss, cfg.decode, cfg.out_bias) == ("ce", decode, out_bias)
  assert _cfg(preset=preset, clover_preset="a1-ext", loss="mse").decode == "argmax"  # unused


def test_class_bias_starts_the_logits_at_the_training_rating_distribution(prepared):
  """--out-bias mean with --loss ce: the output bias is the log training class
  frequencies (NumPy reference), so the softmax of the bias is that distribution."""
  data = prepared("ml100k")
  ctx = make_context(_cfg(preset="validated"), data)
  backbone, _ = learn.network(ctx, out_dim=5)
  params = backbone.init(jax.random.key(0), ctx.splits["train"]["x"][0])
  ys = data.train.y[data.train.mask]
  freq = np.bincount(ys.astype(int) - 1, minlength=5) / ys.size
  np.testing.assert_allclose(np.exp(np.asarray(params["out"]["bias"])), freq, rtol=1e-5)
  assert np.argmax(freq) == 3  # the mode, "4"


def test_explicit_flags_win_over_the_preset():
  cfg = _cfg(clover_preset="full", adv=0.5, item_adv=False)
  assert (cfg.adv, cfg.adv2, cfg.out1, cfg.out2, cfg.item_adv, cfg.loss) == (0.5, 1.0, 5, 2,
                                                                            False, "ce")
  assert _cfg().clover_preset == "full"


@pytest.mark.parametrize("overrides, flag", [
    (dict(out1=3), "--out1 3"),
    (dict(out1=6), "--out1 6"),
    (dict(adv=0.0), "--adv"),
    (dict(clover_preset="a1", adv2=1.0), "--out2"),
    (dict(clover_preset="a1", out2=2), "--adv2"),
    (dict(loss="mse"), "--normalize"),
    (dict(clover_preset="a1", normalize=True), "--normalize"),
    (dict(clover_preset="a1", item_adv=True), "--item-adv"),
    (dict(clover_preset="a1", out1=4), "--loss mse"),
    (dict(decode="mode"), "--decode"),
    (dict(clover_preset="a1-ext", loss="mse", decode="expected"), "--decode expected"),
])
def test_bad_flag_combinations_are_rejected_naming_the_flag(overrides, flag):
  with pytest.raises(UsageError, match=flag):
    clover.check_config(_cfg(**overrides), None)


def test_clover_flags_need_method_clover():
  with pytest.raises(UsageError, match="--out1"):
    check_config(Config(method="reg", out1=5))
