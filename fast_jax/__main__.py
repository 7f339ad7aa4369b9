import sys

from fast_jax.cli import main

sys.exit(main())
