"""``python experiments/figure3.py`` from a checkout: the same as ``fast-jax figure3``
(:mod:`fast_jax.cli.figure3`)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from fast_jax.cli.figure3 import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
