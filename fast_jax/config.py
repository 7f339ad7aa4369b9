"""Run configuration and the paper's defaults per (backbone, dataset).

Every setting of a run lives in one frozen :class:`Config`; ``experiments/run.py`` only
parses flags into it. Unset values (``None``) are filled by :func:`resolve` from
:data:`PAPER_GAMMA_TAU` (paper Table 3) and :data:`LEARNING_RATES` (the FAST code's
run.sh, research/fast.md §1.6).
"""

from __future__ import annotations

import dataclasses

# Paper Table 3: (gamma, tau) per backbone and dataset.
PAPER_GAMMA_TAU = {
    ("melu", "ml1m"): (0.3, 0.8), ("melu", "bookcrossing"): (0.5, 0.1),
    ("melu", "ml100k"): (2.0, 0.2),
    ("metacs", "ml1m"): (2.0, 0.2), ("metacs", "bookcrossing"): (0.3, 0.8),
    ("metacs", "ml100k"): (2.0, 0.2),
}
# run.sh of the FAST code (BookCrossing); the paper gives no learning rates.
LEARNING_RATES = {"melu": (1e-4, 1e-4), "metacs": (1e-5, 1e-4)}  # (outer lr, inner lr)
# The FAST code's five seeds; further seeds continue deterministically.
PAPER_SEEDS = (1024, 3145, 123, 321, 1513)

BACKBONES = ("melu", "metacs")
META_METHODS = ("origin", "static", "fast", "reg", "ipw", "clover")
BASELINES = ("widedeep", "dropoutnet", "nlba", "global-mean", "support-mean")
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
  # Meta-learning.
  epochs: int = 50
  seeds: int = 5
  lr: float | None = None
  inner_lr: float | None = None
  inner_steps: int = 1
  first_order: bool = False
  batch_size: int = 32
  train_query: str = "random"   # "random" (FAST code) or "last" (paper text)
  select: str = "last"          # "last" (FAST code) or "best-valid" (lowest valid MAE)
  alpha_mode: str = "scalar"    # MetaCS learned inner lr: "scalar" (FAST code) or "per-param"
  # Network.
  local_output: bool = False    # adapt the output layer too (MeLU) -- the FAST code does not
  drop_sensitive: bool = False  # remove the sensitive attribute from the inputs
  init: str = "torch"           # "torch" (authors' code) or "flax" defaults
  out_bias: str = "init"        # "init" (from `init`) or "mean" (training mean rating)
  # Reg.
  reg_weight: float = 0.1
  reg_kind: str = "loss"        # "loss" (group query-loss gap) or "value" (Yao & Huang)
  # Data.
  protocol: str | None = None
  data_dir: str | None = None
  eval_chunk: int = 512

  def replace(self, **kw) -> "Config":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def resolve(cfg: Config, dataset_name: str | None = None) -> Config:
  """Fill unset values with the paper's defaults for the backbone and dataset."""
  name = dataset_name or cfg.dataset
  gamma, tau = PAPER_GAMMA_TAU.get((cfg.backbone, name), (1.0, 0.1))
  lr, inner_lr = LEARNING_RATES[cfg.backbone]
  return cfg.replace(
      gamma=gamma if cfg.gamma is None else cfg.gamma,
      tau=tau if cfg.tau is None else cfg.tau,
      lr=lr if cfg.lr is None else cfg.lr,
      inner_lr=inner_lr if cfg.inner_lr is None else cfg.inner_lr,
      gap_loss=cfg.gap_loss or ("mae" if cfg.p_update == "epoch" else "mse"),
  )
