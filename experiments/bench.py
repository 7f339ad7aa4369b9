"""``python experiments/bench.py`` from a checkout: the same as ``fast-jax bench``
(:mod:`fast_jax.cli.bench`)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from fast_jax.cli.bench import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
