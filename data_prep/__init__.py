"""Checkout alias of :mod:`fast_jax.data_prep`, so that ``python -m data_prep`` and
``import data_prep`` keep working from a clone. A wheel ships only ``fast_jax``; use
``fast-jax prep`` or ``python -m fast_jax.data_prep`` there.
"""

import importlib
import sys

from fast_jax.data_prep import *  # noqa: F401,F403
from fast_jax.data_prep import __all__  # noqa: F401

# `import data_prep.sources` and the package's own modules are one module object, so a
# patch through either name is seen by both.
for _name in ("api", "cli", "clover", "common", "custom", "raw", "sources", "synthetic"):
  sys.modules[f"{__name__}.{_name}"] = importlib.import_module(f"fast_jax.data_prep.{_name}")
