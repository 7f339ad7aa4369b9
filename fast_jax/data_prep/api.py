"""``prepare`` (one dataset into a folder) and ``ensure_prepared`` (the cached version)."""

from __future__ import annotations

import hashlib
import json
import pathlib

from fast_jax import config
from fast_jax.dataset import DataError, check_prepared_out, load_prepared, save_prepared

from fast_jax.data_prep import clover, custom, raw, sources, synthetic
from fast_jax.data_prep.common import check_interaction_bounds, md5_file

# The named datasets (fast_jax.config.DATASETS) and your own CSV files.
DATASETS = config.DATASETS[:3] + ("custom",) + config.DATASETS[3:]
PROTOCOLS = {"ml100k": ("clover", "raw"), "ml1m": ("clover", "raw"), "bookcrossing": ("clover",),
             "custom": ("custom",), "synthetic": ("synthetic",)}
# Keyword options each route accepts beyond the common arguments.
OPTIONS = {
    ("ml1m", "raw"): ("movies_extrainfos",),
    ("custom", "custom"): ("ratings", "users", "items", "sensitive", "sensitive_as_feature",
                           "duplicates"),
    ("synthetic", "synthetic"): tuple(synthetic.DEFAULTS),
}
DEFAULT_SEED = 12345


def prepare(dataset: str, out, *, protocol: str | None = None, data_dir=None,
            seed: int = DEFAULT_SEED, min_interactions: int = 13, max_interactions: int = 100,
            progress: bool = True, **options) -> pathlib.Path:
  """Prepare ``dataset`` into the folder ``out`` (train/valid/test .npz + meta.json).

  Raw inputs are looked up under ``data_dir`` (folder names as in the shared data:
  ml-100k, ml-1m, ml-100k-clover, ml-1m-clover, bookcrossing-clover) and downloaded into
  the cache when missing (see :mod:`data_prep.sources`). Raises DataError on bad input,
  an ``out`` it cannot write included, before reading any data.
  """
  check_prepared_out(out)
  splits, meta = build(dataset, protocol=protocol, data_dir=data_dir, seed=seed,
                       min_interactions=min_interactions, max_interactions=max_interactions,
                       progress=progress, **options)
  return save_prepared(out, splits, meta)


def ensure_prepared(dataset: str, *, data_dir=None, protocol: str | None = None,
                    seed: int = DEFAULT_SEED, cache_dir=None, progress: bool = True,
                    **options) -> pathlib.Path:
  """A prepared folder for ``dataset``, prepared into the cache on first use.

  The folder is ``<cache>/prepared/<dataset>-<protocol>-<seed>[-<hash of options>]``
  with ``<cache>`` = ``cache_dir``, $FAST_JAX_CACHE or ~/.cache/fast_jax. A cached folder
  that no longer loads is prepared again.
  """
  protocol = resolve_protocol(dataset, protocol)
  if (dataset, protocol) in sources.NEEDS:  # a cached folder must not hide a wrong data_dir
    sources.check_data_dir(data_dir, cache_dir)
  root = sources.cache_root(cache_dir)
  out = root / "prepared" / _cache_name(dataset, protocol, seed, options)
  if (out / "meta.json").is_file():
    try:
      load_prepared(out)
      return out
    except DataError:
      pass
  splits, meta = build(dataset, protocol=protocol, data_dir=data_dir, seed=seed,
                       cache_dir=root, progress=progress, **options)
  return save_prepared(out, splits, meta)


def build(dataset: str, *, protocol: str | None = None, data_dir=None, cache_dir=None,
          seed: int = DEFAULT_SEED, min_interactions: int = 13, max_interactions: int = 100,
          progress: bool = True, **options):
  """(splits, meta) of ``dataset`` in memory; :func:`prepare` writes them."""
  protocol = resolve_protocol(dataset, protocol)
  allowed = OPTIONS.get((dataset, protocol), ())
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise DataError(f"option(s) {', '.join(unknown)} do not apply to {dataset} ({protocol}); "
                    f"it accepts {', '.join(allowed) or 'no extra options'}")
  check_interaction_bounds(min_interactions, max_interactions)
  if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
    raise DataError(f"--seed must be a non-negative integer, got {seed!r}")
  common = dict(min_interactions=min_interactions, max_interactions=max_interactions,
                progress=progress)
  if dataset == "synthetic":
    return synthetic.prepare_synthetic(seed=seed, **common, **options)
  if dataset == "custom":
    missing = [k for k in ("ratings", "users", "sensitive") if not options.get(k)]
    if missing:
      raise DataError(f"--dataset custom needs {' and '.join('--' + k for k in missing)} "
                      "(--ratings and --users: CSV files; --sensitive: the users.csv column "
                      "naming each user's group; see docs/data.md)")
    return custom.prepare_custom(seed=seed, **common, **options)
  sources.check_data_dir(data_dir, cache_dir)
  folder = sources.resolve(dataset, protocol, data_dir=data_dir, cache_dir=cache_dir,
                           progress=progress)
  if protocol == "clover":
    route = {"ml100k": clover.prepare_ml100k, "ml1m": clover.prepare_ml1m,
             "bookcrossing": clover.prepare_bookcrossing}[dataset]
    return route(folder, **common)
  route = {"ml100k": raw.prepare_ml100k, "ml1m": raw.prepare_ml1m}[dataset]
  return route(folder, seed=seed, **common, **options)


def resolve_protocol(dataset: str, protocol: str | None) -> str:
  if dataset not in DATASETS:
    raise DataError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
  allowed = PROTOCOLS[dataset]
  protocol = protocol or allowed[0]
  if protocol not in allowed:
    if dataset == "bookcrossing" and protocol == "raw":
      raise DataError("Book-Crossing has only the clover protocol: its raw BX-CSV dump is not "
                      "available here; use --protocol clover")
    raise DataError(f"protocol {protocol!r} does not apply to {dataset}; expected "
                    f"{' or '.join(allowed)}")
  return protocol


def _cache_name(dataset: str, protocol: str, seed: int, options: dict) -> str:
  name = f"{dataset}-{protocol}-{seed}"
  if not options:
    return name
  key = dict(options)
  for k in ("ratings", "users", "items", "movies_extrainfos"):
    if key.get(k):  # the files' contents, not only their names, pick the cache entry
      path = pathlib.Path(key[k]).expanduser()
      key[k] = [str(path.absolute()), md5_file(path) if path.is_file() else None]
  digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
  return f"{name}-{digest[:10]}"
