"""Pieces shared by every route: task lists, vocabularies, splitting, packing, meta.

Every route (clover, raw, custom, synthetic) reduces its input to

* an item feature table ``int32[num_items, F_item]`` and a user feature table
  ``int32[num_users, F_user]`` whose columns follow the route's fields, and
* per split, a :class:`Tasks` list: for each user its row in the user table, its group,
  and its interactions (rows of the item table and ratings) in the stored order.

:func:`pack` turns these into the padded :class:`fast_jax.dataset.TaskSplit` arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sys

import numpy as np
import tqdm

from fast_jax.dataset import MIN_LENGTH, QUERY_SIZE, SPLITS, DataError, TaskSplit, padding_row

SPLIT_RATIOS = (0.7, 0.1, 0.2)


@dataclasses.dataclass
class Tasks:
  """The users of one split and their interactions, ragged (CSR) form.

  user i owns interactions ``offsets[i]:offsets[i+1]`` of ``item_row`` / ``rating``.
  """
  user_id: np.ndarray   # int64[U] original ids
  user_row: np.ndarray  # int64[U] row in the user feature table
  group: np.ndarray     # int32[U]
  offsets: np.ndarray   # int64[U + 1]
  item_row: np.ndarray  # int64[N] row in the item feature table
  rating: np.ndarray    # float32[N]

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def subset(self, index) -> "Tasks":
    """The users at ``index`` (in that order) with their interactions."""
    index = np.asarray(index, np.int64)
    lengths = self.lengths[index]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    take = (np.repeat(self.offsets[index] - offsets[:-1], lengths)
            + np.arange(offsets[-1], dtype=np.int64))
    return Tasks(self.user_id[index], self.user_row[index], self.group[index], offsets,
                 self.item_row[take], self.rating[take])


def tasks_from_lists(user_ids, user_rows, groups, item_rows, ratings) -> Tasks:
  """Tasks from per-user lists of item rows and ratings."""
  lengths = np.array([len(r) for r in item_rows], np.int64)
  flat = (lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts
          else np.zeros(0, dtype))
  return Tasks(np.asarray(user_ids, np.int64), np.asarray(user_rows, np.int64),
               np.asarray(groups, np.int32), np.concatenate([[0], np.cumsum(lengths)]),
               flat(item_rows, np.int64), flat(ratings, np.float32))


def filter_lengths(tasks: Tasks, min_interactions: int, max_interactions: int,
                   source: str) -> Tasks:
  """Keep users with ``min..max`` interactions; a kept user below 11 is an error."""
  n = tasks.lengths
  keep = np.flatnonzero((n >= min_interactions) & (n <= max_interactions))
  short = keep[n[keep] < MIN_LENGTH]
  if short.size:
    i = short[0]
    raise DataError(f"{source}: user {tasks.user_id[i]} has {n[i]} interactions; every task "
                    f"needs at least {MIN_LENGTH} (1 support + {QUERY_SIZE} query). Use "
                    f"--min-interactions {MIN_LENGTH} or more")
  return tasks.subset(keep)


def check_interaction_bounds(min_interactions: int, max_interactions: int) -> None:
  if not (isinstance(min_interactions, int) and isinstance(max_interactions, int)):
    raise DataError("--min-interactions and --max-interactions must be integers")
  if min_interactions < 1 or max_interactions < min_interactions:
    raise DataError(f"--min-interactions {min_interactions} / --max-interactions "
                    f"{max_interactions} are invalid; expected 1 <= min <= max")


def stratified_split(groups: np.ndarray, seed: int,
                     ratios=SPLIT_RATIOS) -> dict[str, np.ndarray]:
  """Split user positions 7:1:2 within each group, at random by ``seed``.

  Each group's users are permuted; the first round(0.7 n) go to train, the next
  round(0.1 n) to valid, the rest to test. Each split lists positions in ascending order.
  """
  rng = np.random.default_rng(seed)
  parts = {s: [] for s in SPLITS}
  for g in np.unique(groups):
    members = rng.permutation(np.flatnonzero(groups == g))
    n_train = int(round(ratios[0] * members.size))
    n_valid = int(round(ratios[1] * members.size))
    parts["train"].append(members[:n_train])
    parts["valid"].append(members[n_train:n_train + n_valid])
    parts["test"].append(members[n_train + n_valid:])
  return {s: np.sort(np.concatenate(p)).astype(np.int64) for s, p in parts.items()}


def pack(tasks: Tasks, item_table: np.ndarray, user_table: np.ndarray, max_len: int,
         fields: list[dict]) -> TaskSplit:
  """Padded arrays of one split: x int32[U, L, F], y float32[U, L], ..."""
  num_item_cols = item_table.shape[1]
  num_columns = num_item_cols + user_table.shape[1]
  lengths = tasks.lengths
  num_users = lengths.size
  pad = padding_row(fields, num_columns)
  x = np.broadcast_to(pad, (num_users, max_len, num_columns)).copy()
  y = np.zeros((num_users, max_len), np.float32)
  owner = np.repeat(np.arange(num_users), lengths)
  pos = np.arange(owner.size) - tasks.offsets[owner]
  x[owner, pos, :num_item_cols] = item_table[tasks.item_row]
  x[owner, pos, num_item_cols:] = user_table[tasks.user_row[owner]]
  y[owner, pos] = tasks.rating
  return TaskSplit(x=x, y=y, length=lengths.astype(np.int32), group=tasks.group.astype(np.int32),
                   user_id=tasks.user_id.astype(np.int64))


def pack_all(tasks: dict[str, Tasks], item_table, user_table, fields) -> dict[str, TaskSplit]:
  max_len = max(int(t.lengths.max()) for t in tasks.values() if t.lengths.size)
  return {s: pack(tasks[s], item_table, user_table, max_len, fields) for s in SPLITS}


def check_splits_nonempty(tasks: dict[str, Tasks], source: str) -> None:
  for s in SPLITS:
    if tasks[s].lengths.size == 0:
      raise DataError(f"{source}: no users left in the {s} split after filtering; check "
                      "--min-interactions / --max-interactions")


# ----------------------------------------------------------------------------- duplicates

DUPLICATES = ("last", "mean")  # --duplicates: how a repeated (user, item) rating is resolved


def resolve_duplicates(user: np.ndarray, item: np.ndarray, rating: np.ndarray,
                       times: np.ndarray, lines: np.ndarray, path, policy: str | None,
                       user_ids=None, item_ids=None) -> tuple[np.ndarray, np.ndarray, int]:
  """One rating per (user, item) pair of a ratings file.

  A repeated pair would let a test user's query items reappear in its support set (the
  answers leak into the adaptation) and hides conflicting ratings, so it is an error
  unless ``policy`` resolves it: ``"last"`` keeps the pair's last rating (latest
  timestamp, ties: the later line), ``"mean"`` keeps that row with the mean of the
  pair's ratings.

  Args:
    user, item: int[N] keys of each line (any integers identifying users / items).
    rating: float[N]; times: float[N] (zeros without timestamps); lines: int[N] line numbers.
    user_ids, item_ids: the ids as written, for the message (default: the keys).
  Returns:
    (indices of the kept lines, ascending; their ratings; number of lines dropped).
  Raises:
    DataError: a repeated pair without ``policy``, naming the file and the first repeated
      line.
  """
  n = user.size
  if n == 0:
    return np.arange(0), rating, 0
  key = user.astype(np.int64) * (int(item.max()) + 1) + item.astype(np.int64)
  _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
  repeated = np.flatnonzero(first[inverse] != np.arange(n))
  if repeated.size == 0:
    return np.arange(n), rating, 0
  if policy is None:
    i = int(repeated[0])
    j = int(first[inverse[i]])
    uid = user_ids[i] if user_ids is not None else user[i]
    iid = item_ids[i] if item_ids is not None else item[i]
    raise DataError(f"{path}:{lines[i]}: user {uid} rated item {iid} again (first on line "
                    f"{lines[j]}); each (user, item) pair must appear once: remove the "
                    "repeats, or resolve them with --duplicates last or --duplicates mean")
  if policy not in DUPLICATES:
    raise DataError(f"--duplicates {policy!r}: expected one of {', '.join(DUPLICATES)}")
  rank = np.empty(n, np.int64)
  rank[np.lexsort((np.arange(n), times))] = np.arange(n)  # position in (time, line) order
  by_pair = np.lexsort((rank, inverse))
  last_of_pair = by_pair[np.r_[inverse[by_pair][1:] != inverse[by_pair][:-1], True]]
  kept = np.sort(last_of_pair)
  values = rating[kept].astype(np.float64)
  if policy == "mean":
    sums = np.bincount(inverse, weights=rating.astype(np.float64))
    values = sums[inverse[kept]] / np.bincount(inverse)[inverse[kept]]
  return kept, values.astype(rating.dtype), n - kept.size


# ----------------------------------------------------------------------------- fields


def layout(specs) -> list[dict]:
  """meta.json fields from ``(name, side, kind, width, vocab_size)`` in column order."""
  fields, start = [], 0
  for name, side, kind, width, vocab in specs:
    fields.append({"name": name, "side": side, "kind": kind, "start": start,
                   "stop": start + width, "vocab_size": int(vocab),
                   "pad_index": int(vocab) if kind == "multi" else None})
    start += width
  return fields


def column_of(fields: list[dict], name: str) -> int:
  (field,) = [f for f in fields if f["name"] == name]
  return field["start"]


def multi_slots(value_lists, pad: int, width: int | None = None) -> np.ndarray:
  """int32[n, width] from lists of indices, padded with ``pad`` after the values."""
  width = width or max((len(v) for v in value_lists), default=1) or 1
  out = np.full((len(value_lists), width), pad, np.int32)
  for i, values in enumerate(value_lists):
    out[i, :len(values)] = values
  return out


def sorted_vocab(values) -> dict:
  """value -> index over the distinct values, in sorted order (numbers numerically)."""
  distinct = set(values)
  try:
    ordered = sorted(distinct, key=float)
  except (TypeError, ValueError):
    ordered = sorted(distinct, key=str)
  return {v: i for i, v in enumerate(ordered)}


# ----------------------------------------------------------------------------- meta


def make_meta(*, dataset: str, protocol: str, seed, fields: list[dict], sensitive: dict,
              rating_min: float, rating_max: float, splits: dict[str, TaskSplit], order: str,
              sources: dict[str, str], notes: list[str]) -> dict:
  """meta.json content; counts, max_len and num_columns are added by save_prepared."""
  train = splits["train"]
  train_mean = float(train.y[train.mask].mean(dtype=np.float64))
  return {
      "format_version": 1, "dataset": dataset, "protocol": protocol, "seed": seed,
      "fields": fields, "sensitive": sensitive,
      "rating": {"min": _number(rating_min), "max": _number(rating_max),
                 "train_mean": round(train_mean, 6)},
      "order": order, "sources": sources, "notes": notes,
  }


def _number(v):
  v = float(v)
  return int(v) if v.is_integer() else v


def md5_file(path) -> str:
  h = hashlib.md5()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


# ----------------------------------------------------------------------------- progress


class Progress:
  """A tqdm bar over the named stages of one preparation (to stderr)."""

  def __init__(self, stages: int, desc: str, enabled: bool):
    self._bar = tqdm.tqdm(total=stages, desc=desc, disable=not enabled, file=sys.stderr,
                          unit="step", leave=False, dynamic_ncols=True)

  def __call__(self, stage: str) -> None:
    self._bar.set_postfix_str(stage, refresh=False)
    self._bar.update(1)

  def close(self) -> None:
    self._bar.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ----------------------------------------------------------------------------- parsing


def read_text(path: pathlib.Path, encoding: str = "utf-8") -> str:
  try:
    with open(path, encoding=encoding, newline="") as f:
      return f.read()
  except FileNotFoundError:
    raise DataError(f"input file not found: {path}") from None
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: cannot decode as {encoding} at byte {e.start}") from None
  except OSError as e:
    raise DataError(f"cannot read {path}: {e.strerror}") from None


def read_table(path: pathlib.Path, sep: str, num_fields: int, names: tuple[str, ...],
               encoding: str = "utf-8") -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Columns (str arrays) of a headerless delimited file, and each row's line number.

  Blank lines are skipped; any other line must have exactly ``num_fields`` fields.
  """
  lines = read_text(path, encoding).split("\n")
  numbers = [i + 1 for i, line in enumerate(lines) if line.strip()]
  rows = [lines[i - 1].rstrip("\r").split(sep) for i in numbers]
  for n, row in zip(numbers, rows):
    if len(row) != num_fields:
      raise DataError(f"{path}:{n}: malformed line: expected {num_fields} fields "
                      f"({', '.join(names)}) separated by {sep!r}, found {len(row)}: "
                      f"{lines[n - 1][:80]!r}")
  columns = list(zip(*rows)) if rows else [()] * num_fields
  return ({name: np.array(col, dtype=object) for name, col in zip(names, columns)},
          np.array(numbers, np.int64))


def to_numbers(values: np.ndarray, dtype, path, column: str, line_numbers=None) -> np.ndarray:
  """Parse a str column as ``dtype``; the first bad value raises a DataError with its line."""
  is_int = np.issubdtype(np.dtype(dtype), np.integer)
  stripped = [v.strip() for v in values]
  if is_int:
    try:
      return np.array(stripped, dtype=np.int64).astype(dtype)
    except (ValueError, OverflowError):
      pass
  try:
    parsed = np.array(stripped, dtype=np.float64)
    bad = ~np.isfinite(parsed) | (is_int & (parsed != np.round(parsed)))
  except ValueError:
    parsed = None
    bad = np.array([not _is_float(v) for v in stripped], bool)
  if not bad.any():
    return parsed.astype(dtype)
  i = int(np.flatnonzero(bad)[0])
  where = f"{path}:{line_numbers[i]}" if line_numbers is not None else str(path)
  kind = "an integer" if is_int else "a finite number"
  raise DataError(f"{where}: non-numeric {column} {values[i]!r}; expected {kind}")


def _is_float(v: str) -> bool:
  try:
    float(v)
    return True
  except ValueError:
    return False
