"""Run configuration and the defaults per (backbone, dataset).

Every setting of a run lives in one frozen :class:`Config`; ``experiments/run.py`` only
parses flags into it. Unset values (``None``) are filled by :func:`resolve`: gamma and
tau from :data:`PAPER_GAMMA_TAU` (paper Table 3), the meta-learners' learning rates,
inner steps and output bias from the run's ``preset``:

* ``"validated"`` (the default): :data:`VALIDATED`, the inner loop chosen on validation
  users by ``fast-jax tune`` (docs/methods.md §3);
* ``"code"``: the FAST code's run.sh, :data:`LEARNING_RATES` with one inner step, where
  the inner step barely moves a prediction (EXPERIMENTS.md).
"""

from __future__ import annotations

import dataclasses


class UsageError(ValueError):
  """A bad setting or input, reported to the user as one line (exit code 2)."""

# Paper Table 3: (gamma, tau) per backbone and dataset.
PAPER_GAMMA_TAU = {
    ("melu", "ml1m"): (0.3, 0.8), ("melu", "bookcrossing"): (0.5, 0.1),
    ("melu", "ml100k"): (2.0, 0.2),
    ("metacs", "ml1m"): (2.0, 0.2), ("metacs", "bookcrossing"): (0.3, 0.8),
    ("metacs", "ml100k"): (2.0, 0.2),
}
# run.sh of the FAST code (BookCrossing); the paper gives no learning rates.
LEARNING_RATES = {"melu": (1e-4, 1e-4), "metacs": (1e-5, 1e-4)}  # (outer lr, inner lr)

# The validated protocol: per (backbone, dataset), the Origin setting with the lowest
# validation MAE (mean of 3 seeds, 50 epochs) over the grid of ``fast-jax tune`` (inner lr
# 1e-4 .. 3e-2, output bias init / mean, 1 or 3 inner steps, MetaCS outer lr 1e-5 .. 1e-3):
#
#     fast-jax tune --datasets ml100k --backbones melu --seeds 3
#     # MetaCS in two stages: all points with 1 seed, then the best 3 with 3 seeds
#     fast-jax tune --datasets ml100k --backbones metacs --seeds 1 \
#         --out results/tune_ml100k_metacs_screen
#     fast-jax tune --datasets ml100k --backbones metacs --seeds 3 \
#         --screen results/tune_ml100k_metacs_screen.csv --top 3 --out results/tune_ml100k_metacs
#
# Its points are in results/tune_*.csv (the MetaCS screen leaves out the outer lr 1e-5
# with the initialiser's bias and 3 steps: at that lr every such point with 1 step is
# at MAE 1.8-2.9 on test, the bias never reaching the rating level).
#
# MetaCS on Book-Crossing, where ML-100K's outer lr 1e-3 overfits (validation MAE rising
# from 1.32 at epoch 5 to 1.41 at epoch 50), has its own reduced sweep (output bias mean
# and 1 step, the ML-100K winners' for both backbones; every inner and outer lr):
#
#     fast-jax tune --datasets bookcrossing --backbones metacs --out-biases mean \
#         --inner-steps 1 --seeds 1 --out results/tune_bookcrossing_metacs_screen
#     fast-jax tune --datasets bookcrossing --backbones metacs --out-biases mean \
#         --inner-steps 1 --seeds 3 --screen results/tune_bookcrossing_metacs_screen.csv \
#         --top 3 --out results/tune_bookcrossing_metacs
#
# MeLU on Book-Crossing, over the full grid (all points with 1 seed, the best 3 with 3):
#
#     fast-jax tune --datasets bookcrossing --backbones melu --seeds 1 \
#         --out results/tune_bookcrossing_melu_screen
#     fast-jax tune --datasets bookcrossing --backbones melu --seeds 3 \
#         --screen results/tune_bookcrossing_melu_screen.csv --top 3 \
#         --out results/tune_bookcrossing_melu
#
# MetaCS on ML-1M, over a reduced grid (output bias mean, 1 step; every inner lr and
# every outer lr, 1e-5 .. 1e-3), where ML-100K's outer lr 1e-3 is about 0.008 worse on
# validation:
#
#     fast-jax tune --datasets ml1m --backbones metacs --out-biases mean --inner-steps 1 \
#         --seeds 1 --out results/tune_ml1m_metacs_screen
#     fast-jax tune --datasets ml1m --backbones metacs --out-biases mean --inner-steps 1 \
#         --seeds 3 --screen results/tune_ml1m_metacs_screen.csv --top 3 \
#         --out results/tune_ml1m_metacs
#
# MeLU on ML-1M, over the full grid (all points with 1 seed, the best 3 with 3):
#
#     fast-jax tune --datasets ml1m --backbones melu --seeds 1 \
#         --out results/tune_ml1m_melu_screen
#     fast-jax tune --datasets ml1m --backbones melu --seeds 3 \
#         --screen results/tune_ml1m_melu_screen.csv --top 3 --out results/tune_ml1m_melu
#
# A (backbone, dataset) not listed (custom data, the synthetic set) takes the backbone's
# ML-100K setting; VALIDATED_SOURCE names each entry's sweep.
VALIDATED = {
    ("melu", "ml100k"): dict(lr=1e-4, inner_lr=3e-2, out_bias="mean", inner_steps=3),
    ("metacs", "ml100k"): dict(lr=1e-3, inner_lr=3e-3, out_bias="mean", inner_steps=1),
    ("metacs", "bookcrossing"): dict(lr=1e-4, inner_lr=3e-2, out_bias="mean", inner_steps=1),
    ("melu", "bookcrossing"): dict(lr=1e-4, inner_lr=3e-3, out_bias="init", inner_steps=1),
    ("metacs", "ml1m"): dict(lr=1e-4, inner_lr=1e-3, out_bias="mean", inner_steps=1),
    ("melu", "ml1m"): dict(lr=1e-4, inner_lr=3e-3, out_bias="mean", inner_steps=3),
}
VALIDATED_SOURCE = {
    ("melu", "ml100k"): "results/tune_ml100k_melu.csv",
    ("metacs", "ml100k"): "results/tune_ml100k_metacs.csv",
    ("metacs", "bookcrossing"): "results/tune_bookcrossing_metacs.csv",
    ("melu", "bookcrossing"): "results/tune_bookcrossing_melu.csv",
    ("metacs", "ml1m"): "results/tune_ml1m_metacs.csv",
    ("melu", "ml1m"): "results/tune_ml1m_melu.csv",
}
# CLOVER trains cross-entropy over the rating classes, whose gradient is bounded, so
# Origin's setting can leave its inner loop inert (MeLU on Book-Crossing: inner lr 3e-3,
# 1 step, moves a CLOVER prediction by 0.004). Its own sweep (``fast-jax tune --method
# clover``, inner lr 3e-3 .. 3e-2, the rates below Origin's winner being smaller still)
# then sets CLOVER's inner loop; elsewhere CLOVER takes Origin's setting:
#
#     fast-jax tune --method clover --datasets bookcrossing --backbones melu \
#         --inner-lrs 0.003 0.01 0.03 --seeds 1 --out results/tune_bookcrossing_melu_clover_screen
#     fast-jax tune --method clover --datasets bookcrossing --backbones melu \
#         --inner-lrs 0.003 0.01 0.03 --seeds 3 --top 3 \
#         --screen results/tune_bookcrossing_melu_clover_screen.csv \
#         --out results/tune_bookcrossing_melu_clover
VALIDATED_CLOVER: dict[tuple[str, str], dict] = {
    ("melu", "bookcrossing"): dict(lr=1e-4, inner_lr=3e-2, out_bias="mean", inner_steps=3),
}
VALIDATED_CLOVER_SOURCE = {
    ("melu", "bookcrossing"): "results/tune_bookcrossing_melu_clover.csv",
}
PRESETS = ("validated", "code")
LEGACY_PRESET = "code"  # what runs recorded before presets existed used


def meta_defaults(backbone: str, dataset: str, preset: str, method: str = "origin") -> dict:
  """The meta-learners' lr, inner_lr, out_bias and inner_steps of a preset (module
  docstring); ``out_bias`` of the code preset is None (:func:`resolve` decides). CLOVER
  takes :data:`VALIDATED_CLOVER` where it has an entry."""
  if preset == "code":
    lr, inner_lr = LEARNING_RATES[backbone]
    return dict(lr=lr, inner_lr=inner_lr, out_bias=None, inner_steps=1)
  if method == "clover" and (backbone, dataset) in VALIDATED_CLOVER:
    return dict(VALIDATED_CLOVER[(backbone, dataset)])
  return dict(VALIDATED.get((backbone, dataset), VALIDATED[(backbone, "ml100k")]))


def preset_of(record: dict) -> str:
  """The preset of a recorded run's settings (``config.json``, ``results.json["config"]``);
  :data:`LEGACY_PRESET` for a run recorded before presets existed."""
  return record.get("preset", LEGACY_PRESET)


# The FAST code's five seeds; further seeds continue deterministically.
PAPER_SEEDS = (1024, 3145, 123, 321, 1513)

BACKBONES = ("melu", "metacs")
META_METHODS = ("origin", "static", "fast", "reg", "ipw", "clover")
# Reference predictors (fast_jax.methods.reference): nothing learned, one row each.
REFERENCE = ("global-mean", "support-mean", "constant-mode")
BASELINES = ("widedeep", "dropoutnet", "nlba") + REFERENCE
METHODS = META_METHODS + BASELINES
DATASETS = ("ml100k", "ml1m", "bookcrossing", "synthetic")


def seed_list(n: int) -> list[int]:
  return list(PAPER_SEEDS[:n]) + [10_000 + i for i in range(max(0, n - len(PAPER_SEEDS)))]


@dataclasses.dataclass(frozen=True)
class Config:
  """All settings of one run (one configuration, N seeds)."""
  dataset: str = "ml100k"
  backbone: str = "melu"
  method: str = "fast"
  # FAST.
  gamma: float | None = None
  tau: float | None = None
  p_update: str = "step"        # "step": paper Alg. 1; "epoch": the authors' code
  gap_loss: str | None = None   # loss of the group gap: "mse" | "mae"; None -> mse (step), mae (epoch)
  resample: str = "sample"      # B' as sampled counts ("sample") or its expectation ("expected")
  p_average: bool = False       # cap tau / (1 + t/T): a p that converges (fairness.update_p_decaying)
  gap_users: str = "train"      # whose group gap drives p: "train" (paper) or "valid" users
  # Meta-learning.
  preset: str = "validated"     # unset lr, inner_lr, inner_steps, out_bias: "validated"
                                # (VALIDATED, chosen on validation users) or "code" (run.sh)
  epochs: int = 50
  seeds: int = 5
  lr: float | None = None
  inner_lr: float | None = None
  inner_steps: int | None = None
  first_order: bool = False
  batch_size: int = 32
  length_parts: int | None = None  # run each batch as this many length-sorted parts (1:
                                # whole batches); None: 2 on runs of >= 500 steps, else 1
  train_query: str = "random"   # "random" (FAST code) or "last" (paper text)
  select: str = "last"          # "last" (FAST code) or "best-valid" (lowest valid MAE)
  alpha_mode: str = "scalar"    # MetaCS learned inner lr: "scalar" (FAST code) or "per-param"
  # Network.
  local_output: bool = False    # adapt the output layer too (MeLU) -- the FAST code does not
  drop_sensitive: bool = False  # remove the sensitive attribute from the inputs
  init: str = "torch"           # "torch" (authors' code) or "flax" defaults
  out_bias: str | None = None   # "init" (from `init`) or "mean" (training mean rating);
                                # None -> from the preset (see resolve)
  # Reg.
  reg_weight: float = 0.1
  reg_kind: str = "loss"        # "loss" (group query-loss gap) or "value" (Yao & Huang)
  # Data.
  protocol: str | None = None
  data_dir: str | None = None
  eval_chunk: int | None = None  # users per evaluation call; None: 64 on a CPU, else 512
  checkpoint_every: int = 5     # epochs between checkpoints (with an output folder)
  data_parallel: bool = True    # split each batch's users across all devices (if > 1)
  vmap_seeds: bool = False      # train all seeds as one vmapped program (no mid-run checkpoints)
  attack: bool = True           # attacker AUC on the adapted user representations after training
  # CLOVER. None = from the preset (fast_jax.methods.clover, docs/methods.md §6).
  clover_preset: str | None = None      # "a1" | "a1-ext" | "full" (README runs); None -> full
  adv: float | None = None              # lambda_1: weight of -L_adv in the recommender objective
  adv2: float | None = None             # lambda_2: weight of A2 (adversary sees lambda_2/lambda_1)
  out1: int | None = None               # A1 input type (CLOVER's --out): 0 1 2 4 5 7
  out2: int | None = None               # A2 input type: -1 (no A2) 0 1 2 4
  item_adv: bool | None = None          # item-projection branch in adversaries of type 1/2/4
  normalize: bool | None = None         # softmax the rating logits fed to adversaries (ce)
  disable_inner_max: bool | None = None  # no -lambda_1 L_adv in the inner recommender step
  disable_inner_adv: bool | None = None  # no adversary adaptation in the inner loop
  loss: str | None = None               # rating loss: "mse" or "ce" (classes, argmax + min)
  decode: str | None = None             # ce prediction: "argmax" (+ min) or "expected" rating
  # Baselines (fast_jax.methods.widedeep, dropoutnet, nlba; docs/methods.md §7); `epochs`,
  # `batch_size`, `init`, `drop_sensitive`, `local_output`, `eval_chunk` apply to them too.
  baseline_lr: float = 1e-3             # Adam rate of widedeep, dropoutnet, nlba
  baseline_select: str = "best-valid"   # test the epoch with the lowest valid MAE, or "last"
  baseline_patience: int = 10           # stop after this many epochs without a lower valid MAE
  interaction_batch: int = 1024         # widedeep: training rows per step
  wide_cross: int = 0                   # widedeep: hash buckets of user x item crosses (0: none)
  finetune_steps: int = 0               # widedeep: SGD steps on a test user's support set
  finetune_lr: float = 1e-3             # widedeep: rate of those steps
  mf_dim: int = 32                      # dropoutnet: rank of the pretrained biased MF
  mf_steps: int = 100                   # dropoutnet: full-batch Adam steps of the MF
  mf_l2: float = 0.5                    # dropoutnet: MF weight decay (valid MAE: 0.5 < 0.05)
  dropout: float = 0.5                  # dropoutnet: input dropout of the preference vectors
  nlba_threshold: float | None = None   # nlba: rating >= it is class 1 (None: 4 on 1-5, 8 on 1-10)

  def replace(self, **kw) -> "Config":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def resolve(cfg: Config, dataset_name: str | None = None) -> Config:
  """Fill unset values with the defaults for the backbone and dataset: gamma and tau of
  the paper's Table 3, the rest from ``cfg.preset`` (:func:`meta_defaults`)."""
  name = dataset_name or cfg.dataset
  gamma, tau = PAPER_GAMMA_TAU.get((cfg.backbone, name), (1.0, 0.1))
  meta = meta_defaults(cfg.backbone, name, cfg.preset, cfg.method) if cfg.preset in PRESETS \
      else meta_defaults(cfg.backbone, name, "code")  # an unknown preset is reported by the checks
  cfg = cfg.replace(
      gamma=gamma if cfg.gamma is None else cfg.gamma,
      tau=tau if cfg.tau is None else cfg.tau,
      lr=meta["lr"] if cfg.lr is None else cfg.lr,
      inner_lr=meta["inner_lr"] if cfg.inner_lr is None else cfg.inner_lr,
      inner_steps=meta["inner_steps"] if cfg.inner_steps is None else cfg.inner_steps,
      gap_loss=cfg.gap_loss or ("mae" if cfg.p_update == "epoch" else "mse"),
  )
  if cfg.method == "clover":
    cfg = resolve_clover(cfg)
  if cfg.out_bias is not None:
    return cfg
  if meta["out_bias"] is not None:  # validated; for CLOVER's class logits (--loss ce)
    return cfg.replace(out_bias=meta["out_bias"])  # "mean" is the log class frequencies
  if cfg.method == "clover" and cfg.loss == "ce":  # code: the classes' bias from the init
    return cfg.replace(out_bias="init")
  # Code preset: MetaCS's outer lr (1e-5) cannot lift a zero-initialised output to the
  # rating level in 50 epochs on the small datasets (MAE 3.0 on ML-100K), so its output
  # bias starts at the training mean rating; MeLU keeps the initialiser's, as the code.
  return cfg.replace(out_bias="mean" if cfg.backbone == "metacs" else "init")


# CLOVER's README configurations (docs/methods.md §6.4), all with --loss 1 (ce). Only
# the CLOVER flags; the backbone and meta-learning settings stay those of the framework.
CLOVER_PRESETS = {
    "a1": dict(adv=1.0, out1=0, disable_inner_max=True),       # A1, no external info
    "a1-ext": dict(adv=2.0, out1=5, disable_inner_max=True),   # A1 with the ratings
    "full": dict(adv=2.0, adv2=1.0, out1=5, out2=2, disable_inner_max=True, normalize=True,
                 item_adv=True),                                # A1 + A2
}
CLOVER_FIELDS = ("adv", "adv2", "out1", "out2", "item_adv", "normalize", "disable_inner_max",
                 "disable_inner_adv", "loss", "decode")
_CLOVER_DEFAULTS = dict(adv2=0.0, out2=-1, item_adv=False, normalize=False,
                        disable_inner_max=False, disable_inner_adv=False, loss="ce",
                        decode="argmax")


def resolve_clover(cfg: Config) -> Config:
  """Fill unset CLOVER fields from the preset (default "full"), then CLOVER's defaults;
  flags given explicitly win over the preset."""
  preset = cfg.clover_preset or "full"
  if preset not in CLOVER_PRESETS:
    return cfg  # reported by fast_jax.methods.clover.check_config
  # The validated protocol reads the classes as their expected rating: the argmax of the
  # authors' code is the mode for every row on ML-100K (docs/methods.md 6.5).
  filled = {**_CLOVER_DEFAULTS, **CLOVER_PRESETS[preset]}
  if cfg.preset == "validated" and (cfg.loss or filled["loss"]) == "ce":
    filled["decode"] = "expected"
  return cfg.replace(clover_preset=preset, **{
      k: filled[k] if getattr(cfg, k) is None else getattr(cfg, k) for k in CLOVER_FIELDS})


# ----------------------------------------------------------------------------- checks

# Numeric settings and the values they accept: (low, high, low included, high included);
# None is "no bound". Every value must be finite; unset (None) values are not checked.
NUMERIC_RANGES = {
    "gamma": (0.0, None, True, None), "tau": (0.0, 1.0, True, True),
    "lr": (0.0, None, False, None), "inner_lr": (0.0, None, True, None),
    "reg_weight": (0.0, None, True, None),
    "adv": (0.0, None, True, None), "adv2": (0.0, None, True, None),
    "baseline_lr": (0.0, None, False, None), "finetune_lr": (0.0, None, False, None),
    "mf_l2": (0.0, None, True, None), "dropout": (0.0, 1.0, True, False),
    "nlba_threshold": (None, None, None, None),
    "epochs": (1, None, True, None), "seeds": (1, None, True, None),
    "batch_size": (1, None, True, None), "inner_steps": (1, None, True, None),
    "length_parts": (1, None, True, None), "checkpoint_every": (1, None, True, None),
    "eval_chunk": (1, None, True, None), "baseline_patience": (0, None, True, None),
    "interaction_batch": (1, None, True, None), "wide_cross": (0, None, True, None),
    "finetune_steps": (0, None, True, None), "mf_dim": (1, None, True, None),
    "mf_steps": (0, None, True, None),
}


def check_numbers(cfg: Config) -> None:
  """Every numeric setting is finite and in :data:`NUMERIC_RANGES`.

  Raises:
    UsageError: naming the flag, the value and the range expected.
  """
  import math
  for name, (lo, hi, lo_in, hi_in) in NUMERIC_RANGES.items():
    value = getattr(cfg, name, None)
    if value is None:
      continue
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise UsageError(f"{flag} must be a finite number, got {value!r}")
    low_ok = lo is None or (value >= lo if lo_in else value > lo)
    high_ok = hi is None or (value <= hi if hi_in else value < hi)
    if not (low_ok and high_ok):
      raise UsageError(f"{flag} must be {_interval(lo, hi, lo_in, hi_in)}, got {value}")


def _interval(lo, hi, lo_in, hi_in) -> str:
  if hi is None:
    return f"{'>=' if lo_in else '>'} {lo:g}"
  left = "-inf" if lo is None else f"{lo:g}"
  return f"in {'[' if lo_in else '('}{left}, {hi:g}{']' if hi_in else ')'}"


# Keys of config.json that are records of the run, not settings (fast_jax.runfolder).
RECORD_KEYS = ("data", "seed_list", "versions", "git_commit", "earlier_commits")


def from_record(record: dict, *, source: str = "config.json") -> Config:
  """The :class:`Config` of a run's ``config.json`` (its record keys dropped).

  Raises:
    UsageError: a key that is neither a setting nor a record key (naming ``source``).
  """
  if not isinstance(record, dict):
    raise UsageError(f"{source}: expected a JSON object of settings")
  fields = {f.name for f in dataclasses.fields(Config)}
  unknown = [k for k in record if k not in fields and k not in RECORD_KEYS]
  if unknown:
    raise UsageError(f"{source}: unknown setting {unknown[0]!r} (from another fast-jax "
                     "version?)")
  return Config(**{**{k: v for k, v in record.items() if k in fields},
                   "preset": preset_of(record)})
