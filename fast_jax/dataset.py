"""The prepared-data schema: padded per-user task arrays plus ``meta.json``.

A prepared dataset is a folder::

    OUT/train.npz  OUT/valid.npz  OUT/test.npz  OUT/meta.json

Each ``.npz`` holds one split of users (tasks), padded to ``L = meta["max_len"]`` rows:

    x        int32[U, L, F]  feature indices; item-field columns first, then user fields
    y        float32[U, L]   ratings
    length   int32[U]        valid rows per user; rows >= length are padding
    group    int32[U]        sensitive group 0..G-1
    user_id  int64[U]        original user id

Padding rows hold 0 in categorical columns, the field's pad index in multi-valued
columns, and y = 0. Every user has at least ``MIN_LENGTH`` = 11 rows (one support row
plus the ``QUERY_SIZE`` = 10 query rows, the last 10 valid rows). ``meta.json`` describes
the fields, the sensitive attribute, the rating range, the counts and the sources; see
``docs/data.md``.

:func:`save_prepared` writes a folder atomically; :func:`load_prepared` reads one and
checks everything the training code relies on, raising :class:`DataError` with a message
that names the file, the field and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import sys
import tempfile
import zipfile
import zlib

import numpy as np

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
QUERY_SIZE = 10
MIN_LENGTH = QUERY_SIZE + 1
ARRAYS = {"x": np.int32, "y": np.float32, "length": np.int32, "group": np.int32,
          "user_id": np.int64}
KINDS = ("categorical", "multi")
SIDES = ("item", "user")
_META_KEYS = ("dataset", "protocol", "max_len", "num_columns", "fields", "sensitive", "rating",
              "counts")


class DataError(ValueError):
  """A problem with user-supplied or prepared data; the message says what and where."""


@dataclasses.dataclass(frozen=True)
class Field:
  """One input field: columns ``[start, stop)`` of x.

  A ``categorical`` field is one column with values ``0..vocab_size-1``. A ``multi``
  field has ``stop - start`` slots with values ``0..vocab_size-1`` or the pad index
  ``vocab_size``; its embedding table has ``vocab_size + 1`` rows and its embedding is
  the mean over the non-pad slots.
  """
  name: str
  side: str
  kind: str
  start: int
  stop: int
  vocab_size: int
  pad_index: int | None = None

  @property
  def width(self) -> int:
    return self.stop - self.start

  @property
  def table_size(self) -> int:
    return self.vocab_size + (1 if self.kind == "multi" else 0)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Field":
    return cls(name=d["name"], side=d["side"], kind=d["kind"], start=d["start"], stop=d["stop"],
               vocab_size=d["vocab_size"], pad_index=d.get("pad_index"))


@dataclasses.dataclass(frozen=True, eq=False)
class TaskSplit:
  """One split of users: x int32[U, L, F], y float32[U, L], length/group int32[U], user_id int64[U]."""
  x: np.ndarray
  y: np.ndarray
  length: np.ndarray
  group: np.ndarray
  user_id: np.ndarray

  @property
  def num_users(self) -> int:
    return int(self.x.shape[0])

  @property
  def max_len(self) -> int:
    return int(self.x.shape[1])

  @property
  def num_columns(self) -> int:
    return int(self.x.shape[2])

  @property
  def num_ratings(self) -> int:
    return int(self.length.sum())

  @property
  def mask(self) -> np.ndarray:
    """bool[U, L]: True on valid (non-padding) rows."""
    return np.arange(self.max_len)[None, :] < self.length[:, None]

  def arrays(self) -> dict[str, np.ndarray]:
    return {name: getattr(self, name) for name in ARRAYS}


@dataclasses.dataclass(frozen=True, eq=False)
class TaskData:
  """The three splits of a prepared dataset plus its parsed ``meta.json``."""
  train: TaskSplit
  valid: TaskSplit
  test: TaskSplit
  meta: dict
  path: pathlib.Path | None = None

  def split(self, name: str) -> TaskSplit:
    if name not in SPLITS:
      raise KeyError(f"unknown split {name!r}; expected one of {SPLITS}")
    return getattr(self, name)

  @property
  def splits(self) -> dict[str, TaskSplit]:
    return {name: self.split(name) for name in SPLITS}

  @property
  def name(self) -> str:
    return self.meta["dataset"]

  @property
  def fields(self) -> tuple[Field, ...]:
    return tuple(Field.from_dict(f) for f in self.meta["fields"])

  @property
  def group_names(self) -> list[str]:
    return list(self.meta["sensitive"]["groups"])

  @property
  def num_groups(self) -> int:
    return len(self.meta["sensitive"]["groups"])

  @property
  def sensitive_column(self) -> int | None:
    """Column of x holding the sensitive attribute, or None when it is not an input."""
    return self.meta["sensitive"]["column"]

  @property
  def rating_range(self) -> tuple[float, float]:
    return float(self.meta["rating"]["min"]), float(self.meta["rating"]["max"])

  @property
  def train_mean(self) -> float:
    return float(self.meta["rating"]["train_mean"])

  @property
  def max_len(self) -> int:
    return int(self.meta["max_len"])

  @property
  def num_columns(self) -> int:
    return int(self.meta["num_columns"])


def padding_row(fields, num_columns: int) -> np.ndarray:
  """int32[F]: the x row of a padding position (0, or the pad index of multi fields)."""
  row = np.zeros(num_columns, np.int32)
  for f in fields:
    f = f if isinstance(f, Field) else Field.from_dict(f)
    if f.kind == "multi":
      row[f.start:f.stop] = f.pad_index
  return row


def split_counts(split: TaskSplit, num_groups: int) -> dict:
  """The ``counts`` entry of meta.json for one split."""
  return {"users": split.num_users, "ratings": split.num_ratings,
          "groups": np.bincount(split.group, minlength=num_groups).tolist()}


# ----------------------------------------------------------------------------- writing


def check_prepared_out(out) -> None:
  """Raise DataError when :func:`save_prepared` could not write a prepared folder at
  ``out``: it, or a folder above it, is a file; or it is a folder that holds other files
  and no meta.json (it is not a prepared folder, which would be replaced). Cheap, so a
  command checks it before building the data."""
  out = pathlib.Path(out).expanduser().absolute()
  if out.exists() and not out.is_dir():
    raise DataError(f"output path {out} exists and is not a folder")
  above = next((p for p in out.parents if p.exists()), None)
  if above is not None and not above.is_dir():
    raise DataError(f"cannot write {out}: {above} is a file, not a folder")
  if out.is_dir() and any(out.iterdir()) and not (out / "meta.json").is_file():
    raise DataError(f"refusing to replace {out}: it is not empty and not a prepared data "
                    "folder (no meta.json); choose another --out")


def save_prepared(out, splits: dict[str, TaskSplit], meta: dict) -> pathlib.Path:
  """Validate and write a prepared folder; return its path.

  ``format_version``, ``max_len``, ``num_columns`` and ``counts`` are filled in from the
  arrays. The files are written into a temporary folder beside ``out``. A new ``out`` is
  that folder renamed into place. An existing ``out`` (empty, or a prepared folder: it
  has a meta.json) gets only the four files replaced -- meta.json removed first and
  renamed in last, so a reader sees an incomplete folder, never a mix of two datasets --
  and keeps every other file it holds.
  """
  out = pathlib.Path(out).expanduser().absolute()
  missing = [s for s in SPLITS if s not in splits]
  if missing:
    raise DataError(f"save_prepared: missing split(s) {missing}; expected {list(SPLITS)}")
  meta = dict(meta)
  first = splits["train"]
  meta["format_version"] = FORMAT_VERSION
  meta["max_len"] = first.max_len
  meta["num_columns"] = first.num_columns
  num_groups = len(meta.get("sensitive", {}).get("groups", []))
  meta["counts"] = {s: split_counts(splits[s], num_groups) for s in SPLITS}
  _validate(splits, meta, where=f"data for {out}")

  check_prepared_out(out)
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  except OSError as e:
    raise DataError(f"cannot write the output folder {out} ({e.strerror or e})") from None
  files = [f"{s}.npz" for s in SPLITS] + ["meta.json"]
  try:
    for s in SPLITS:
      with open(tmp / f"{s}.npz", "wb") as f:
        np.savez_compressed(f, **splits[s].arrays())
        os.fsync(f.fileno())
    with open(tmp / "meta.json", "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2, ensure_ascii=False)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o755)
    if out.exists():
      (out / "meta.json").unlink(missing_ok=True)
      for name in files:
        os.replace(tmp / name, out / name)
      tmp.rmdir()
    else:
      os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


# ----------------------------------------------------------------------------- reading


def load_prepared(path) -> TaskData:
  """Read and validate a prepared folder (see the module docstring)."""
  path = pathlib.Path(path).expanduser()
  if not path.is_dir():
    raise DataError(f"prepared data folder not found: {path} (create it with "
                    f"`python -m data_prep --dataset NAME --out {path}`)")
  meta_path = path / "meta.json"
  if not meta_path.is_file():
    raise DataError(f"{meta_path} is missing; {path} is not a complete prepared folder")
  try:
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{meta_path} is not valid JSON: {e}") from None
  splits = {s: _read_split(path / f"{s}.npz") for s in SPLITS}
  _validate(splits, meta, where=str(path))
  _warn_empty_groups(splits, meta, path)
  return TaskData(**splits, meta=meta, path=path.absolute())


_WARNED: set = set()  # (folder, split, group) already warned about in this process


def _warn_empty_groups(splits: dict[str, TaskSplit], meta: dict, path: pathlib.Path) -> None:
  """Warn (on stderr, once per process) about a group without valid or test users: its
  metrics in that split are NaN."""
  groups = meta["sensitive"]["groups"]
  for s in ("valid", "test"):
    counts = np.bincount(splits[s].group, minlength=len(groups))
    for g in np.flatnonzero(counts == 0).tolist():
      key = (str(path.absolute()), s, g)
      if key not in _WARNED:
        _WARNED.add(key)
        print(f"warning: {path}: group {g} ({groups[g]}) has no {s} users; its {s} "
              "metrics are NaN", file=sys.stderr)


def _read_split(file: pathlib.Path) -> TaskSplit:
  if file.is_dir():
    raise DataError(f"split file {file} is a folder, not a file; prepare the dataset again")
  if not file.is_file():
    raise DataError(f"split file {file} is missing")
  try:
    with np.load(file, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as e:
    raise DataError(f"{file} is truncated or unreadable ({type(e).__name__}: {e}); "
                    "prepare the dataset again") from None
  for name, dtype in ARRAYS.items():
    if name not in arrays:
      raise DataError(f"{file}: array {name!r} is missing; expected arrays {list(ARRAYS)}")
    if arrays[name].dtype != dtype:
      raise DataError(f"{file}: array {name!r} has dtype {arrays[name].dtype}, "
                      f"expected {np.dtype(dtype)}")
  x = arrays["x"]
  if x.ndim != 3:
    raise DataError(f"{file}: x has shape {x.shape}, expected [users, max_len, columns]")
  u, l = x.shape[:2]
  for name, shape in (("y", (u, l)), ("length", (u,)), ("group", (u,)), ("user_id", (u,))):
    if arrays[name].shape != shape:
      raise DataError(f"{file}: {name} has shape {arrays[name].shape}, expected {shape} "
                      f"to match x {x.shape}")
  return TaskSplit(**{k: arrays[k] for k in ARRAYS})


# ----------------------------------------------------------------------------- checks


def _validate(splits: dict[str, TaskSplit], meta: dict, where: str) -> None:
  """Check arrays against meta; raise DataError naming ``where``, the split and the field."""
  if not isinstance(meta, dict):
    raise DataError(f"{where}: meta.json must hold a JSON object")
  if meta.get("format_version") != FORMAT_VERSION:
    raise DataError(f"{where}: meta.json format_version is {meta.get('format_version')!r}, "
                    f"expected {FORMAT_VERSION}")
  missing = [k for k in _META_KEYS if k not in meta]
  if missing:
    raise DataError(f"{where}: meta.json lacks {missing}")
  fields = _check_fields(meta, where)
  groups = _check_sensitive(meta, fields, where)
  num_columns, max_len = meta["num_columns"], meta["max_len"]
  pad = padding_row(fields, num_columns)
  rmin, rmax = meta["rating"].get("min"), meta["rating"].get("max")
  if not all(isinstance(v, (int, float)) for v in (rmin, rmax)) or rmin > rmax:
    raise DataError(f"{where}: meta.json rating min/max must be numbers with min <= max")
  seen: dict[int, str] = {}
  for s in SPLITS:
    sp, at = splits[s], f"{where} [{s}]"
    if sp.x.shape[2] != num_columns:
      raise DataError(f"{at}: x has {sp.x.shape[2]} columns but meta.json num_columns is "
                      f"{num_columns}")
    if sp.x.shape[1] != max_len:
      raise DataError(f"{at}: x has {sp.x.shape[1]} rows per user but meta.json max_len is "
                      f"{max_len}")
    _check_split(sp, at, fields, pad, len(groups), meta["sensitive"]["column"], rmin, rmax)
    counts = meta["counts"].get(s)
    actual = split_counts(sp, len(groups))
    if counts != actual:
      raise DataError(f"{at}: meta.json counts {counts} do not match the arrays {actual}")
    for uid in sp.user_id.tolist():
      if uid in seen:
        raise DataError(f"{at}: user {uid} also appears in split {seen[uid]!r}; "
                        "splits must have disjoint users")
      seen[uid] = s
  present = np.unique(splits["train"].group)
  if present.size < 2:
    raise DataError(f"{where} [train]: only group(s) {present.tolist()} present; fairness "
                    "training needs at least 2 groups among the training users")


def _check_fields(meta: dict, where: str) -> list[Field]:
  try:
    fields = [Field.from_dict(f) for f in meta["fields"]]
  except (KeyError, TypeError) as e:
    raise DataError(f"{where}: meta.json fields entry is malformed ({e})") from None
  column, seen_user = 0, False
  for f in fields:
    at = f"{where}: meta.json field {f.name!r}"
    if f.kind not in KINDS or f.side not in SIDES:
      raise DataError(f"{at}: kind {f.kind!r} / side {f.side!r}; expected kind in {KINDS} "
                      f"and side in {SIDES}")
    if f.start != column or f.stop <= f.start:
      raise DataError(f"{at}: columns [{f.start}, {f.stop}) do not continue at column {column}")
    if f.kind == "categorical" and (f.width != 1 or f.pad_index is not None):
      raise DataError(f"{at}: a categorical field has one column and pad_index null")
    if f.kind == "multi" and f.pad_index != f.vocab_size:
      raise DataError(f"{at}: a multi field's pad_index must equal vocab_size ({f.vocab_size})")
    if not isinstance(f.vocab_size, int) or f.vocab_size < 1:
      raise DataError(f"{at}: vocab_size must be a positive integer")
    if f.side == "item" and seen_user:
      raise DataError(f"{at}: item fields must come before user fields")
    seen_user |= f.side == "user"
    column = f.stop
  if column != meta["num_columns"]:
    raise DataError(f"{where}: meta.json fields cover {column} columns but num_columns is "
                    f"{meta['num_columns']}")
  return fields


def _check_sensitive(meta: dict, fields: list[Field], where: str) -> list:
  sens = meta["sensitive"]
  groups = sens.get("groups") if isinstance(sens, dict) else None
  if not isinstance(groups, list) or len(groups) < 2:
    raise DataError(f"{where}: meta.json sensitive.groups must list at least 2 group names")
  col = sens.get("column")
  if col is not None:
    owner = [f for f in fields if f.start <= col < f.stop]
    if not owner or owner[0].kind != "categorical" or owner[0].vocab_size != len(groups):
      raise DataError(f"{where}: meta.json sensitive.column {col} must be a categorical field "
                      f"with one value per group ({len(groups)})")
  return groups


def _check_split(sp: TaskSplit, at: str, fields: list[Field], pad: np.ndarray,
                 num_groups: int, sensitive_column: int | None, rmin: float,
                 rmax: float) -> None:
  if sp.num_users == 0:
    raise DataError(f"{at}: the split has no users")
  bad = np.flatnonzero((sp.length < MIN_LENGTH) | (sp.length > sp.max_len))
  if bad.size:
    i = bad[0]
    raise DataError(f"{at}: user {sp.user_id[i]} has length {sp.length[i]}; every user needs "
                    f"{MIN_LENGTH}..{sp.max_len} rows (>= 1 support + {QUERY_SIZE} query)")
  bad = np.flatnonzero((sp.group < 0) | (sp.group >= num_groups))
  if bad.size:
    i = bad[0]
    raise DataError(f"{at}: user {sp.user_id[i]} has group {sp.group[i]}, expected "
                    f"0..{num_groups - 1}")
  if np.unique(sp.user_id).size != sp.num_users:
    raise DataError(f"{at}: user ids are not unique")
  mask = sp.mask
  if np.any(sp.y[~mask] != 0) or np.any(sp.x[~mask] != pad):
    raise DataError(f"{at}: padding rows (rows >= length) must hold y = 0 and x = {pad.tolist()}")
  rows, ys = sp.x[mask], sp.y[mask]
  if not np.all(np.isfinite(ys)):
    raise DataError(f"{at}: y has non-finite ratings")
  if ys.min() < rmin - 1e-6 or ys.max() > rmax + 1e-6:
    raise DataError(f"{at}: ratings span {ys.min()}..{ys.max()}, outside meta.json rating "
                    f"range {rmin}..{rmax}")
  for f in fields:
    cols = rows[:, f.start:f.stop]
    upper = f.vocab_size + (1 if f.kind == "multi" else 0)
    if cols.size and (cols.min() < 0 or cols.max() >= upper):
      value = cols.min() if cols.min() < 0 else cols.max()
      raise DataError(f"{at}: field {f.name!r} has index {value} outside its vocabulary "
                      f"0..{f.vocab_size - 1}" + (f" (+ pad {f.pad_index})" if f.pad_index
                                                    is not None else ""))
    if f.kind == "multi" and np.any(cols[:, 0] == f.pad_index):
      raise DataError(f"{at}: multi field {f.name!r} has a valid row with no value (first slot "
                      "is the pad index); every row needs at least one value")
  if sensitive_column is not None:
    users = np.repeat(np.arange(sp.num_users), sp.length)
    if np.any(rows[:, sensitive_column] != sp.group[users]):
      raise DataError(f"{at}: column {sensitive_column} (the sensitive attribute) differs from "
                      "the group array")
