"""Raw datasets -> padded per-user task arrays (``fast_jax.dataset`` schema).

    from fast_jax.data_prep import prepare, ensure_prepared
    prepare("bookcrossing", "out/bx", data_dir="../shared/data")      # one folder
    path = ensure_prepared("synthetic")                                 # cached, no files needed

Command line: ``python -m data_prep --help``. Details: ``docs/data.md``.
"""

from fast_jax.dataset import DataError

from fast_jax.data_prep.api import DATASETS, PROTOCOLS, build, ensure_prepared, prepare

__all__ = ["DATASETS", "PROTOCOLS", "DataError", "build", "ensure_prepared", "prepare"]
