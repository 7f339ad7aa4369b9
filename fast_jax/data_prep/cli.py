"""Command line of data_prep: prepare one dataset into a folder (see docs/data.md).

    python -m data_prep --dataset bookcrossing --data-dir ../shared/data --out prepared/bx
    python -m data_prep --dataset ml100k --protocol raw --data-dir ../shared/data --out prepared/m
    python -m data_prep --dataset custom --ratings R.csv --users U.csv --sensitive gender --out o
    python -m data_prep --dataset synthetic --num-minority 100 --eta 1.5 --out prepared/syn

Without ``--out`` the dataset is prepared into the cache and its folder printed. Errors
print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from fast_jax.cli import error_line
from fast_jax.dataset import DataError, load_prepared

from fast_jax.data_prep import api, synthetic
from fast_jax.data_prep.common import DUPLICATES

_SYNTHETIC_TYPES = {k: (type(v) if not isinstance(v, bool) else None)
                    for k, v in synthetic.DEFAULTS.items()}


class _Parser(argparse.ArgumentParser):
  """A bad flag is one line on stderr and exit code 2, like every other error here."""

  def error(self, message):
    self.exit(2, error_line(f"{message} (see --help)") + "\n")


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog="fast-jax prep" if "fast-jax" in sys.argv[0] else "python -m data_prep", description=__doc__.split("\n\n")[0],
              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", required=True, choices=api.DATASETS)
  p.add_argument("--protocol", choices=("clover", "raw"),
                 help="clover (default): the MeLU/CLOVER splits; raw: GroupLens files, "
                      "7:1:2 split by --seed")
  p.add_argument("--data-dir", default=os.environ.get("FAST_JAX_DATA_DIR") or None,
                 help="folder holding ml-100k/, ml-1m/, *-clover/ (default: "
                      "$FAST_JAX_DATA_DIR; missing files are downloaded into the cache)")
  p.add_argument("--out", help="output folder (default: the cache, printed)")
  p.add_argument("--cache-dir", help="cache folder (default $FAST_JAX_CACHE or ~/.cache/fast_jax)")
  p.add_argument("--seed", type=int, default=api.DEFAULT_SEED, help="split / generation seed")
  p.add_argument("--min-interactions", type=int, default=13)
  p.add_argument("--max-interactions", type=int, default=100)
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  g = p.add_argument_group("ml1m --protocol raw")
  g.add_argument("--movies-extrainfos", metavar="FILE",
                 help="MeLU's movies_extrainfos.dat: use its rate/genre/director/actor fields")
  g = p.add_argument_group("--dataset custom")
  g.add_argument("--ratings", metavar="R.csv", help="columns user,item,rating[,timestamp]")
  g.add_argument("--users", metavar="U.csv", help="columns user,<features...>")
  g.add_argument("--items", metavar="I.csv", help="columns item,<features...> (optional)")
  g.add_argument("--sensitive", metavar="COLUMN", help="users.csv column naming the group")
  g.add_argument("--sensitive-as-feature", action="store_true",
                 help="also feed the sensitive column to the model")
  g.add_argument("--duplicates", choices=DUPLICATES,
                 help="resolve a (user, item) pair rated on several lines: keep the last "
                      "rating (latest timestamp, then the later line) or their mean; "
                      "without it such a pair is an error")
  g = p.add_argument_group("--dataset synthetic (FAST Theorem 1)")
  for key, kind in _SYNTHETIC_TYPES.items():
    flag = "--" + key.replace("_", "-")
    if kind is None:
      g.add_argument(flag, action="store_true", default=None,
                     help=f"(default {synthetic.DEFAULTS[key]})")
    else:
      g.add_argument(flag, type=kind, help=f"(default {synthetic.DEFAULTS[key]})")
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  try:
    options = _options(args)
    progress = not args.no_progress and sys.stderr.isatty()
    common = dict(protocol=args.protocol, data_dir=args.data_dir, seed=args.seed,
                  progress=progress, **options)
    if args.out:
      out = api.prepare(args.dataset, args.out, min_interactions=args.min_interactions,
                        max_interactions=args.max_interactions, **common)
    else:
      # Only non-default bounds go into the cache key.
      bounds = {k: getattr(args, k) for k in ("min_interactions", "max_interactions")
                if getattr(args, k) != parser().get_default(k)}
      out = api.ensure_prepared(args.dataset, cache_dir=args.cache_dir, **common, **bounds)
    data = load_prepared(out)
  except DataError as e:
    print(error_line(str(e)), file=sys.stderr)
    return 2
  except OSError as e:
    print(error_line(f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")), file=sys.stderr)
    return 2
  counts = data.meta["counts"]
  summary = "; ".join(f"{s} {c['users']} users / {c['ratings']} ratings (groups {c['groups']})"
                      for s, c in counts.items())
  print(f"{out}: {data.meta['dataset']} ({data.meta['protocol']}): {summary}")
  return 0


def _options(args) -> dict:
  """Route-specific options that were given; giving one to the wrong dataset is an error."""
  given = {}
  custom_keys = ("ratings", "users", "items", "sensitive", "duplicates")
  for key in custom_keys:
    if getattr(args, key) is not None:
      given[key] = getattr(args, key)
  if args.sensitive_as_feature:
    given["sensitive_as_feature"] = True
  if args.movies_extrainfos is not None:
    given["movies_extrainfos"] = args.movies_extrainfos
  for key in _SYNTHETIC_TYPES:
    if getattr(args, key) is not None:
      given[key] = getattr(args, key)
  if args.cache_dir is not None and args.out is not None:
    raise DataError("--cache-dir applies only without --out")
  protocol = api.resolve_protocol(args.dataset, args.protocol)
  allowed = api.OPTIONS.get((args.dataset, protocol), ())
  wrong = [k for k in given if k not in allowed]
  if wrong:
    flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
    raise DataError(f"{flags} do(es) not apply to --dataset {args.dataset} "
                    f"(protocol {protocol})")
  return given
