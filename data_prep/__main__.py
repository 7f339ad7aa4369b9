import sys

from fast_jax.data_prep.cli import main

sys.exit(main())
