"""``python experiments/tune.py`` from a checkout: the same as ``fast-jax tune``
(:mod:`fast_jax.cli.tune`)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from fast_jax.cli.tune import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
