"""Train and evaluate one configuration for N seeds.

    python experiments/run.py --backbone melu --dataset ml100k --gamma 2 --tau 0.2

Flags only; the work is fast_jax.experiment.train_and_evaluate. Unset hyperparameters
take their default for the backbone and dataset: gamma/tau from the paper's Table 3, the
learning rates, inner steps and output bias from --preset (validated: chosen on
validation users by `fast-jax tune`; code: the FAST code's run.sh). Bad settings are
reported in one line, exit code 2.
The files go to --out, by default runs/DATASET-BACKBONE-METHOD-YYYYmmdd-HHMMSS/ (printed
at the end); a folder that holds a run needs --resume or --overwrite. Ctrl-C prints what
was saved and the command that resumes, and exits with 130.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import pathlib
import shlex
import signal
import sys
import time

from fast_jax import config as config_lib
from fast_jax.cli import error_line
from fast_jax.config import Config, UsageError


class _Parser(argparse.ArgumentParser):
  """A bad flag is one line on stderr and exit code 2, like every other usage error."""

  def error(self, message):
    self.exit(2, error_line(f"{message} (see --help)") + "\n")


def build_parser() -> argparse.ArgumentParser:
  d = Config()
  p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  a = p.add_argument
  a("--backbone", default=d.backbone,
    help=f"one of {', '.join(config_lib.BACKBONES)}; ignored by the baselines (widedeep, "
         "dropoutnet, nlba, global-mean, support-mean), which use the dataset's MeLU network")
  a("--method", default=d.method, help=f"one of {', '.join(config_lib.METHODS)}")
  a("--dataset", default=d.dataset,
    help=f"one of {', '.join(config_lib.DATASETS)}, or a prepared dataset folder")
  a("--protocol", default=None, help="data protocol for a named dataset: clover (default) or raw")
  a("--data-dir", default=os.environ.get("FAST_JAX_DATA_DIR") or None,
    help="where raw data lives (default: $FAST_JAX_DATA_DIR, else a user cache dir, "
         "downloading when missing)")
  a("--out", default=None,
    help="folder for config.json, metrics.jsonl, results.json (default: "
         "runs/DATASET-BACKBONE-METHOD-YYYYmmdd-HHMMSS, printed at the end)")
  a("--config", default=None, metavar="DIR/config.json",
    help="re-run a recorded run: its settings, with the flags given beside it overriding")
  a("--resume", action="store_true",
    help="continue the interrupted run in --out, or add seeds to it (a larger --seeds)")
  a("--overwrite", action="store_true",
    help="replace the run in --out (its result files are removed first); without it or "
         "--resume, a folder that holds a run is refused")
  a("--attack", action=argparse.BooleanOptionalAction, default=d.attack,
    help="train CLOVER's attacker on the adapted user representations after each seed")
  a("--vmap-seeds", action="store_true",
    help="train the seeds as one vectorised program (faster on GPU/TPU; no mid-run checkpoints)")
  a("--data-parallel", action=argparse.BooleanOptionalAction, default=d.data_parallel,
    help="split each batch's users across all devices when there are several")
  a("--checkpoint-every", type=int, default=d.checkpoint_every,
    help="epochs between checkpoints of each seed (in --out/checkpoints)")
  g = p.add_argument_group("FAST")
  g.add_argument("--gamma", type=float, default=None, help="rate of the p update (paper Table 3 by default)")
  g.add_argument("--tau", type=float, default=None, help="cap of one p update (the FAST code's --beta)")
  g.add_argument("--p-update", choices=("step", "epoch"), default=d.p_update,
                 help="step: paper Algorithm 1 (batch gap every step); epoch: the authors' code")
  g.add_argument("--gap-loss", choices=("mse", "mae"), default=None,
                 help="loss of the group gap (default mse for step, mae for epoch)")
  g.add_argument("--resample", choices=("sample", "expected"), default=d.resample,
                 help="resampled batch B' as drawn counts or their expectation (step mode)")
  g.add_argument("--p-average", action="store_true",
                 help="a p that converges: Eq. 9 with the cap tau / (1 + t/T) after t outer "
                      "steps of T per epoch (docs/methods.md 1.5); default: the paper's Eq. 9")
  g.add_argument("--gap-users", choices=("train", "valid"), default=d.gap_users,
                 help="whose group gap drives p: the training users (the paper) or the "
                      "validation users' adapted query losses (docs/methods.md 1.6)")
  m = p.add_argument_group("meta-learning")
  m.add_argument("--preset", choices=config_lib.PRESETS, default=d.preset,
                 help="defaults of --lr, --inner-lr, --inner-steps, --out-bias: validated "
                      "(chosen on validation users, fast_jax.config.VALIDATED) or code (the "
                      "FAST code's run.sh: inner lr 1e-4, one inner step)")
  m.add_argument("--epochs", type=int, default=d.epochs)
  m.add_argument("--seeds", type=int, default=d.seeds, help="number of seeds (the FAST code's five first)")
  m.add_argument("--lr", type=float, default=None, help="outer Adam learning rate")
  m.add_argument("--inner-lr", type=float, default=None, help="inner SGD rate (MetaCS: its initial value)")
  m.add_argument("--inner-steps", type=int, default=d.inner_steps,
                 help="inner SGD steps (default: from --preset)")
  m.add_argument("--first-order", action="store_true", help="first-order meta-gradient (FOMAML)")
  m.add_argument("--batch-size", type=int, default=d.batch_size)
  m.add_argument("--length-parts", type=int, default=d.length_parts,
                 help="run each batch as this many length-sorted parts, each on only the "
                      "rows its users need (speed only; 1: whole batches; default: 2 on "
                      "runs of at least 500 steps, else 1)")
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
                 help="output bias from the initialiser or at the training mean rating "
                      "(default: from --preset)")
  r = p.add_argument_group("Reg")
  r.add_argument("--reg-weight", type=float, default=d.reg_weight)
  r.add_argument("--reg-kind", choices=("loss", "value"), default=d.reg_kind)
  c = p.add_argument_group("CLOVER", "unset flags come from --clover-preset (docs/methods.md §6.4)")
  c.add_argument("--clover-preset", choices=tuple(config_lib.CLOVER_PRESETS), default=None,
                 help="the README's runs: a1 (A1 on h_u), a1-ext (A1 on [h_u, rating]), "
                      "full (A1 + A2, default)")
  c.add_argument("--adv", type=float, default=None, help="lambda_1: weight of the adversarial loss")
  c.add_argument("--adv2", type=float, default=None, help="lambda_2: weight of the second adversary")
  c.add_argument("--out1", type=int, default=None,
                 help="A1 input (CLOVER's --out): 0 h_u, 1 y_hat, 2 [y_hat, y], 4 y - y_hat, "
                      "5 [h_u, y], 7 [h_u, h_i, y]")
  c.add_argument("--out2", type=int, default=None, help="A2 input: -1 none, 0, 1, 2, 4 (as --out1)")
  c.add_argument("--item-adv", action=argparse.BooleanOptionalAction, default=None,
                 help="item branch in adversaries of type 1/2/4")
  c.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                 help="softmax the rating logits the adversaries see (--loss ce)")
  c.add_argument("--disable-inner-max", action=argparse.BooleanOptionalAction, default=None,
                 help="no fooling term in the inner recommender step")
  c.add_argument("--disable-inner-adv", action=argparse.BooleanOptionalAction, default=None,
                 help="no adversary adaptation in the inner loop")
  c.add_argument("--loss", choices=("mse", "ce"), default=None,
                 help="rating loss: mse, or ce over rating classes (prediction argmax + min)")
  c.add_argument("--decode", choices=("argmax", "expected"), default=None,
                 help="--loss ce prediction: the most probable rating (argmax, the authors' "
                      "code, default) or the expected rating under the class probabilities")
  b = p.add_argument_group("baselines", "widedeep, dropoutnet, nlba (docs/methods.md §7); "
                           "--epochs, --batch-size (users per step of dropoutnet and nlba), "
                           "--init and --drop-sensitive apply to them too")
  b.add_argument("--baseline-lr", type=float, default=d.baseline_lr, help="Adam learning rate")
  b.add_argument("--baseline-select", choices=("best-valid", "last"), default=d.baseline_select,
                 help="test the epoch with the lowest valid MAE, or the last one")
  b.add_argument("--baseline-patience", type=int, default=d.baseline_patience,
                 help="stop after this many epochs without a lower valid MAE (0: never)")
  b.add_argument("--interaction-batch", type=int, default=d.interaction_batch,
                 help="widedeep: training rows per step")
  b.add_argument("--wide-cross", type=int, default=d.wide_cross,
                 help="widedeep: hash buckets of user x item cross features (0: none)")
  b.add_argument("--finetune-steps", type=int, default=d.finetune_steps,
                 help="widedeep: SGD steps on each test user's support set (0: none)")
  b.add_argument("--finetune-lr", type=float, default=d.finetune_lr, help="widedeep: their rate")
  b.add_argument("--mf-dim", type=int, default=d.mf_dim, help="dropoutnet: biased-MF rank")
  b.add_argument("--mf-steps", type=int, default=d.mf_steps,
                 help="dropoutnet: full-batch Adam steps of the MF pretraining")
  b.add_argument("--mf-l2", type=float, default=d.mf_l2, help="dropoutnet: MF weight decay")
  b.add_argument("--dropout", type=float, default=d.dropout,
                 help="dropoutnet: probability of zeroing a row's user / item preference")
  b.add_argument("--nlba-threshold", type=float, default=d.nlba_threshold,
                 help="nlba: ratings >= this are class 1 (default 4 on 1-5, 8 on 1-10)")
  h = p.add_argument_group("several processes or hosts", "start the same command on every "
                           "process, each with its --process-id; process 0 writes the files")
  h.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="address of process 0, which coordinates the job")
  h.add_argument("--num-processes", type=int, default=None)
  h.add_argument("--process-id", type=int, default=None)
  h.add_argument("--distributed", action="store_true",
                 help="join a multi-process job described by the Slurm, Open MPI or TPU-pod "
                      "environment (no --coordinator needed)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  return p


def init_processes(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
  """Join the multi-process job the flags describe (jax.distributed), if any."""
  given = [args.coordinator, args.num_processes, args.process_id]
  if not args.distributed and all(v is None for v in given):
    return
  if not args.distributed and any(v is None for v in given):
    parser.error("--coordinator, --num-processes and --process-id go together (or use "
                 "--distributed on a Slurm / Open MPI / TPU-pod job)")
  if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
    parser.error(f"--process-id must be in 0..{args.num_processes - 1}, got {args.process_id}")
  from fast_jax import sharding
  try:
    sharding.init_distributed(args.coordinator, args.num_processes, args.process_id)
  except (ValueError, RuntimeError) as e:
    where = (f"--coordinator {args.coordinator}" if args.coordinator else
             "--distributed (no Slurm, Open MPI or TPU-pod environment found?)")
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    parser.exit(2, error_line(f"{where}: could not join the multi-process job: {reason}") + "\n")


def config_from_args(args: argparse.Namespace, given: set[str] | None = None) -> Config:
  """The run's Config: the flags, or with ``--config`` the recorded run's settings with
  the flags in ``given`` (those on the command line) overriding them. Where the raw data
  lives is this machine's, not the record's: ``--data-dir`` or $FAST_JAX_DATA_DIR, else
  the cache (a recorded relative path meant the folder the run started in)."""
  fields = set(Config.__dataclass_fields__)
  if getattr(args, "config", None) is None:
    return Config(**{k: v for k, v in vars(args).items() if k in fields})
  base = load_config_file(args.config).replace(data_dir=getattr(args, "data_dir", None))
  given = set(vars(args)) if given is None else given
  return base.replace(**{k: getattr(args, k) for k in given if k in fields})


def load_config_file(path: str) -> Config:
  """The Config recorded in a run's ``config.json`` (a run folder is accepted too)."""
  file = pathlib.Path(path).expanduser()
  if file.is_dir():
    file = file / "config.json"
  try:
    record = json.loads(file.read_text())
  except OSError as e:
    raise UsageError(f"--config {path}: cannot read it ({e.strerror or e})") from None
  except ValueError as e:
    raise UsageError(f"--config {path}: not a valid config.json ({e})") from None
  return config_lib.from_record(record, source=f"--config {path}")


def given_flags(argv: list[str]) -> set[str]:
  """The destinations of the flags written on the command line (not their defaults)."""
  parser = build_parser()
  for action in parser._actions:
    action.default = argparse.SUPPRESS
  return set(vars(parser.parse_args(argv)))


# Flags that act only for some methods (flag destination -> those methods); given with
# another method they do nothing, which a one-line warning says.
_TRAINED_BASELINES = ("widedeep", "dropoutnet", "nlba")
_META_ONLY = ("backbone", "lr", "inner_lr", "inner_steps", "first_order", "train_query",
              "select", "length_parts", "alpha_mode", "vmap_seeds", "out_bias", "preset")
ONLY_FOR = {
    "gamma": ("fast",), "tau": ("fast",), "gap_loss": ("fast",),
    "p_update": ("fast",), "resample": ("fast",),  # Static: pools, p fixed (methods/static.py)
    "p_average": ("fast",), "gap_users": ("fast",),
    "reg_weight": ("reg",), "reg_kind": ("reg",),
    **{k: _TRAINED_BASELINES for k in ("baseline_lr", "baseline_select", "baseline_patience")},
    **{k: ("widedeep",) for k in ("interaction_batch", "wide_cross", "finetune_steps",
                                  "finetune_lr")},
    **{k: ("dropoutnet",) for k in ("mf_dim", "mf_steps", "mf_l2", "dropout")},
    "nlba_threshold": ("nlba",),
    **{k: config_lib.META_METHODS for k in _META_ONLY},
}


def ineffective_flags(cfg: Config, given: set[str]) -> list[str]:
  """One warning line for each flag in ``given`` that does nothing for ``cfg``."""
  lines = []
  for name in sorted(given & set(ONLY_FOR), key=list(ONLY_FOR).index):
    if cfg.method not in ONLY_FOR[name]:
      methods = ONLY_FOR[name]
      where = ("the meta-learning methods" if methods == config_lib.META_METHODS
               else ", ".join(methods))
      lines.append(f"warning: --{name.replace('_', '-')} has no effect with --method "
                   f"{cfg.method} (it acts on {where})")
    elif name == "gap_users" and cfg.gap_users == "valid" and cfg.select == "best-valid":
      lines.append("warning: --gap-users valid feeds the validation users into training, so "
                   "--select best-valid no longer selects on held-out users (docs/methods.md 1.6)")
    elif name == "alpha_mode" and cfg.backbone != "metacs":
      lines.append(f"warning: --alpha-mode has no effect with --backbone {cfg.backbone} "
                   "(it acts on metacs)")
  if cfg.dataset not in config_lib.DATASETS:  # a prepared folder: its data is made already
    for name in sorted(given & {"protocol", "data_dir"}):
      lines.append(f"warning: --{name.replace('_', '-')} has no effect with a prepared "
                   f"folder as --dataset (it acts on the named datasets, "
                   f"{', '.join(config_lib.DATASETS)})")
  return lines


def default_out(cfg: Config) -> pathlib.Path:
  """``runs/<dataset>-<backbone>-<method>-<YYYYmmdd-HHMMSS>`` (a prepared folder's name
  for its dataset), with ``-2``, ``-3``, ... when that folder exists already."""
  dataset = pathlib.Path(cfg.dataset).name if cfg.dataset not in config_lib.DATASETS \
      else cfg.dataset
  stem = f"{dataset}-{cfg.backbone}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
  out, n = pathlib.Path("runs") / stem, 1
  while out.exists():
    n += 1
    out = pathlib.Path("runs") / f"{stem}-{n}"
  return out


def interrupted(out: pathlib.Path, argv: list[str], out_given: bool) -> str:
  """The line printed on Ctrl-C: what was saved, and the command that continues."""
  from fast_jax.runfolder import saved_state
  if not (out / "config.json").exists():
    return "interrupted before training started: nothing was saved"
  saved = saved_state(out) or "no checkpoint yet (a resume starts the seeds again)"
  prog = sys.argv[0] if sys.argv and sys.argv[0] else "fast-jax run"
  prog = f"python {prog}" if prog.endswith(".py") else prog
  args = [a for a in argv if a not in ("--resume", "--overwrite")]
  args += ([] if out_given else ["--out", str(out)]) + ["--resume"]
  return f"interrupted: {saved} in {out}; continue with: {prog} {shlex.join(args)}"


def _exit_now(code: int) -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = build_parser()
  args = parser.parse_args(argv)
  init_processes(args, parser)
  from fast_jax.dataset import DataError
  out = None
  try:
    from fast_jax.experiment import train_and_evaluate
    given = given_flags(argv)
    cfg = config_from_args(args, given)
    out = pathlib.Path(args.out) if args.out is not None else (
        None if args.resume else default_out(cfg))
    for line in ineffective_flags(cfg, given):
      print(line, file=sys.stderr)
    train_and_evaluate(cfg, out, progress=not args.quiet, resume=args.resume,
                       overwrite=args.overwrite)
  except (UsageError, DataError) as e:
    from fast_jax.files import WriteError
    hint = ("; free space, then continue with --resume" if isinstance(e, WriteError) and
            out is not None and (out / "config.json").exists() else "")
    print(error_line(f"{e}{hint}"), file=sys.stderr)
    return 2
  except FloatingPointError as e:
    print(error_line(f"training diverged: {e}"), file=sys.stderr)
    return 1
  except OSError as e:
    print(error_line(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")),
          file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
    from fast_jax import sharding
    if sharding.is_writer():
      print(interrupted(out, argv, args.out is not None) if out is not None else
            "interrupted before training started: nothing was saved", file=sys.stderr)
    # An interrupt can land inside JAX's C++ (tracing, compiling); the interpreter's
    # normal teardown then segfaults. The files are complete (atomic writes), so end the
    # process without that teardown, first of all exit handlers.
    atexit.register(_exit_now, 130)
    return 130
  from fast_jax import sharding
  if out is not None and sharding.is_writer():
    print(f"run folder: {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
