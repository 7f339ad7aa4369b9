"""Train and evaluate one configuration for N seeds.

    python experiments/run.py --backbone melu --dataset ml100k --gamma 2 --tau 0.2

Flags only; the work is fast_jax.experiment.train_and_evaluate. Unset hyperparameters
take the paper's value for the backbone and dataset (Table 3 for gamma/tau, the FAST
code's run.sh for learning rates). Bad settings are reported in one line, exit code 2.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from fast_jax import config as config_lib  # noqa: E402
from fast_jax.config import Config  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
  d = Config()
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  a = p.add_argument
  a("--backbone", default=d.backbone, help=f"one of {', '.join(config_lib.BACKBONES)}")
  a("--method", default=d.method, help=f"one of {', '.join(config_lib.METHODS)}")
  a("--dataset", default=d.dataset,
    help=f"one of {', '.join(config_lib.DATASETS)}, or a prepared dataset folder")
  a("--protocol", default=None, help="data protocol for a named dataset: clover (default) or raw")
  a("--data-dir", default=None, help="where raw data lives (default: a user cache dir, downloading when missing)")
  a("--out", default=None, help="folder for config.json, metrics.jsonl, results.json")
  g = p.add_argument_group("FAST")
  g.add_argument("--gamma", type=float, default=None, help="rate of the p update (paper Table 3 by default)")
  g.add_argument("--tau", type=float, default=None, help="cap of one p update (the FAST code's --beta)")
  g.add_argument("--p-update", choices=("step", "epoch"), default=d.p_update,
                 help="step: paper Algorithm 1 (batch gap every step); epoch: the authors' code")
  g.add_argument("--gap-loss", choices=("mse", "mae"), default=None,
                 help="loss of the group gap (default mse for step, mae for epoch)")
  g.add_argument("--resample", choices=("sample", "expected"), default=d.resample,
                 help="resampled batch B' as drawn counts or their expectation (step mode)")
  m = p.add_argument_group("meta-learning")
  m.add_argument("--epochs", type=int, default=d.epochs)
  m.add_argument("--seeds", type=int, default=d.seeds, help="number of seeds (the FAST code's five first)")
  m.add_argument("--lr", type=float, default=None, help="outer Adam learning rate")
  m.add_argument("--inner-lr", type=float, default=None, help="inner SGD rate (MetaCS: its initial value)")
  m.add_argument("--inner-steps", type=int, default=d.inner_steps)
  m.add_argument("--first-order", action="store_true", help="first-order meta-gradient (FOMAML)")
  m.add_argument("--batch-size", type=int, default=d.batch_size)
  m.add_argument("--train-query", choices=("random", "last"), default=d.train_query,
                 help="training query: fresh random 10 per use (FAST code) or the last 10")
  m.add_argument("--select", choices=("last", "best-valid"), default=d.select,
                 help="test the final model (FAST code) or the epoch with the lowest valid MAE")
  m.add_argument("--alpha-mode", choices=("scalar", "per-param"), default=d.alpha_mode,
                 help="MetaCS learned inner rate: one scalar (FAST code) or one per parameter")
  n = p.add_argument_group("network")
  n.add_argument("--local-output", action="store_true", help="adapt the output layer too (MeLU)")
  n.add_argument("--drop-sensitive", action="store_true", help="remove the sensitive attribute from the inputs")
  n.add_argument("--init", choices=("torch", "flax"), default=d.init)
  n.add_argument("--out-bias", choices=("init", "mean"), default=d.out_bias,
                 help="output bias from the initialiser or at the training mean rating")
  r = p.add_argument_group("Reg")
  r.add_argument("--reg-weight", type=float, default=d.reg_weight)
  r.add_argument("--reg-kind", choices=("loss", "value"), default=d.reg_kind)
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  return p


def config_from_args(args: argparse.Namespace) -> Config:
  fields = set(Config.__dataclass_fields__)
  return Config(**{k: v for k, v in vars(args).items() if k in fields})


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from fast_jax.experiment import UsageError, train_and_evaluate
  from fast_jax.dataset import DataError
  try:
    train_and_evaluate(config_from_args(args), args.out, progress=not args.quiet)
  except (UsageError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except FloatingPointError as e:
    print(f"error: training diverged: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
