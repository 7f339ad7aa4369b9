"""The ``fast-jax`` command (also ``python -m fast_jax``): one subcommand per driver.

    fast-jax run --backbone melu --dataset ml100k --gamma 2 --tau 0.2
    fast-jax prep --dataset bookcrossing --out prepared/bx
    fast-jax table2 --datasets ml100k --jobs 2

Each subcommand is the ``main(argv)`` of one module of this package; the scripts in a
checkout's ``experiments/`` call the same functions.
"""

from __future__ import annotations

import functools
import importlib
import pathlib
import sys

# subcommand -> (module, one line of help)
COMMANDS = {
    "run": ("fast_jax.cli.run", "train and evaluate one configuration for N seeds"),
    "prep": ("fast_jax.data_prep.cli", "prepare a dataset (named, custom CSVs or synthetic)"),
    "table2": ("fast_jax.cli.table2", "the FAST paper's Table 2 (runs, then tables)"),
    "figure3": ("fast_jax.cli.figure3", "the FAST paper's Figure 3 (Origin, Static, FAST; p)"),
    "figure4": ("fast_jax.cli.figure4", "the FAST paper's Figure 4 (gamma / tau sweep)"),
    "tune": ("fast_jax.cli.tune", "choose the inner loop on validation users (Origin grid)"),
    "collect": ("fast_jax.cli.collect", "tabulate finished run folders"),
    "bench": ("fast_jax.cli.bench", "time training on this machine"),
    "plot": ("fast_jax.cli.plots", "plots of tables and run folders"),
}


def program() -> str:
  """The running command's name for its error lines: ``fast-jax run`` under the
  ``fast-jax`` command (which sets ``sys.argv[0]``), ``run.py`` run as a script, and the
  package's name (``data_prep``) run as ``python -m data_prep``."""
  path = pathlib.Path(sys.argv[0])
  return path.parent.name if path.name == "__main__.py" else path.name


def error_line(message: str) -> str:
  """``<command>: error: <message>``, argparse's form, for every command's bad input."""
  return f"{program()}: error: {message}"


def one_line_errors(main):
  """A driver's ``main(argv)`` that reports bad input (a :class:`~fast_jax.config.UsageError`
  or :class:`~fast_jax.dataset.DataError`: a flag, a missing or broken file, an output
  that cannot be written) as one line ``<command>: error: ...`` and exit code 2, as
  ``fast-jax run`` does, rather than as a traceback."""
  @functools.wraps(main)
  def wrapped(argv=None):
    from fast_jax.config import UsageError
    from fast_jax.dataset import DataError
    try:
      return main(argv)
    except (UsageError, DataError) as e:
      message = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
      print(error_line(message), file=sys.stderr)
      raise SystemExit(2) from None
  return wrapped


def usage() -> str:
  width = max(map(len, COMMANDS))
  lines = ["usage: fast-jax COMMAND [flags]   (fast-jax COMMAND --help for its flags)", "",
           "commands:"]
  lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage())
    return 0
  if argv[0] in ("-V", "--version"):
    from fast_jax import __version__
    print(f"fast-jax {__version__}")
    return 0
  if argv[0] not in COMMANDS:
    print(f"fast-jax: error: unknown command {argv[0]!r}; expected one of "
          f"{', '.join(COMMANDS)} (see fast-jax --help)", file=sys.stderr)
    return 2
  module = importlib.import_module(COMMANDS[argv[0]][0])
  sys.argv[0] = f"fast-jax {argv[0]}"
  return module.main(argv[1:]) or 0
