"""``--dataset custom``: a user's own CSV files.

* ratings CSV: header ``user,item,rating[,timestamp]``; one interaction per line. With a
  timestamp (a number, or an ISO 8601 date/time) each user's ratings are put in time
  order (ties keep file order), otherwise they keep file order. A (user, item) pair on
  two lines is an error unless ``duplicates`` ("last" or "mean") resolves it
  (:func:`fast_jax.data_prep.common.resolve_duplicates`).
* users CSV: header ``user,<feature>...``; one line per user. The ``sensitive`` column
  names each user's group (two or more distinct values; groups are its values in sorted
  order). It is an input feature only with ``sensitive_as_feature``.
* items CSV (optional): header ``item,<feature>...``; without it the item id is the only
  item feature.

Every other column is a categorical feature; a cell may hold several values separated
by ``|``, which makes the column a multi-valued field. Vocabularies are the values of
the kept users and the items they rated, in sorted order; an empty cell is its own value.
"""

from __future__ import annotations

import csv
import datetime
import pathlib

import numpy as np

from fast_jax.dataset import SPLITS, DataError

from fast_jax.data_prep.common import (Progress, Tasks, check_splits_nonempty, filter_lengths,
                                      layout, make_meta, md5_file, multi_slots, pack_all,
                                      resolve_duplicates, sorted_vocab, stratified_split)

MULTI_SEP = "|"


def prepare_custom(*, ratings, users, items=None, sensitive: str | None = None,
                   sensitive_as_feature: bool = False, duplicates: str | None = None,
                   seed: int, min_interactions: int, max_interactions: int, progress: bool):
  if not sensitive:
    raise DataError("--sensitive COLUMN is required for --dataset custom: the users.csv "
                    "column that names each user's group")
  ratings_path = pathlib.Path(ratings).expanduser()
  users_path = pathlib.Path(users).expanduser()
  items_path = pathlib.Path(items).expanduser() if items else None
  with Progress(5, "custom", progress) as step:
    step(ratings_path.name)
    r_header, r_rows, r_lines = _read_csv(ratings_path, required=("user", "item", "rating"),
                                          allowed=("user", "item", "rating", "timestamp"))
    col = {name: r_header.index(name) for name in r_header}
    rating = _floats([row[col["rating"]] for row in r_rows], ratings_path, r_lines, "rating")
    if "timestamp" in col:
      times = _timestamps([row[col["timestamp"]] for row in r_rows], ratings_path, r_lines)
    else:
      times = np.zeros(len(r_rows))

    step(users_path.name)
    u_header, u_rows, u_lines = _read_csv(users_path, required=("user",))
    if sensitive not in u_header:
      raise DataError(f"{users_path}: unknown sensitive column {sensitive!r}; its columns are "
                      f"{', '.join(u_header)}")
    if sensitive == "user":
      raise DataError(f"{users_path}: the sensitive column cannot be the user id")
    user_row = _id_index(u_rows, u_header.index("user"), users_path, u_lines, "user")
    s_col = u_header.index(sensitive)
    distinct = {row[s_col] for row in u_rows}
    if len(distinct) < 2:
      raise DataError(f"{users_path}: sensitive column {sensitive!r} has a single value "
                      f"{next(iter(distinct), '')!r}; it needs at least 2 groups")
    for row, line in zip(u_rows, u_lines):
      if row[s_col] == "":
        raise DataError(f"{users_path}:{line}: user {row[0]!r} has an empty {sensitive!r}; "
                        "every user needs a group")
    if items_path is not None:
      step(items_path.name)
      i_header, i_rows, i_lines = _read_csv(items_path, required=("item",))
      item_row = _id_index(i_rows, i_header.index("item"), items_path, i_lines, "item")
    else:
      step("item ids")
      i_header, i_rows = ["item"], []
      item_row = {}
      for row in r_rows:
        if row[col["item"]] not in item_row:
          item_row[row[col["item"]]] = len(i_rows)
          i_rows.append([row[col["item"]]])

    step("tasks")
    r_user = np.empty(len(r_rows), np.int64)
    r_item = np.empty(len(r_rows), np.int64)
    for k, (row, line) in enumerate(zip(r_rows, r_lines)):
      uid, iid = row[col["user"]], row[col["item"]]
      if uid not in user_row:
        raise DataError(f"{ratings_path}:{line}: user {uid!r} has no line in {users_path.name}")
      if iid not in item_row:
        raise DataError(f"{ratings_path}:{line}: item {iid!r} has no line in {items_path.name}")
      r_user[k], r_item[k] = user_row[uid], item_row[iid]
    kept_lines, rating, dropped = resolve_duplicates(
        r_user, r_item, rating, times, np.asarray(r_lines), ratings_path, duplicates,
        user_ids=[repr(row[col["user"]]) for row in r_rows],
        item_ids=[repr(row[col["item"]]) for row in r_rows])
    r_user, r_item, times = r_user[kept_lines], r_item[kept_lines], times[kept_lines]
    order = np.lexsort((np.arange(r_user.size), times, r_user))
    owners = r_user[order]
    starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]]) if owners.size else owners
    ids, ids_are_ints = _user_ids(u_rows, u_header.index("user"))
    tasks = Tasks(user_id=ids[owners[starts]], user_row=owners[starts],
                  group=np.zeros(starts.size, np.int32),
                  offsets=np.r_[starts, owners.size].astype(np.int64),
                  item_row=r_item[order], rating=rating[order].astype(np.float32))
    tasks = filter_lengths(tasks, min_interactions, max_interactions, str(ratings_path))
    if tasks.lengths.size == 0:
      raise DataError(f"{ratings_path}: no user has {min_interactions}..{max_interactions} "
                      "ratings")
    kept_users, kept_items = tasks.user_row, np.unique(tasks.item_row)
    group_vocab = sorted_vocab(u_rows[u][s_col] for u in kept_users)
    if len(group_vocab) < 2:
      raise DataError(f"{users_path}: after keeping users with {min_interactions}.."
                      f"{max_interactions} ratings, sensitive column {sensitive!r} has the single "
                      f"value {next(iter(group_vocab))!r}; it needs at least 2 groups")
    user_group = np.zeros(len(u_rows), np.int32)
    user_group[kept_users] = [group_vocab[u_rows[u][s_col]] for u in kept_users]
    tasks.group = user_group[tasks.user_row]

    item_cols = [c for c in i_header if c != "item"] or ["item"]
    item_table, item_specs = _features(i_header, i_rows, item_cols, kept_items, "item")
    user_cols = [c for c in u_header if c != "user" and (c != sensitive or sensitive_as_feature)]
    user_table, user_specs = _features(u_header, u_rows, user_cols, kept_users, "user",
                                       fixed={sensitive: group_vocab})
    fields = layout(item_specs + user_specs)
    step("split and pack")
    parts = stratified_split(tasks.group, seed)
    split_tasks = {s: tasks.subset(parts[s]) for s in SPLITS}
    check_splits_nonempty(split_tasks, str(ratings_path))
    splits = pack_all(split_tasks, item_table, user_table, fields)

  column = next((f["start"] for f in fields if f["side"] == "user" and f["name"] == sensitive),
                None)
  kept_ratings = tasks.rating
  read = {p.name: md5_file(p) for p in (ratings_path, users_path, items_path) if p is not None}
  notes = [f"users with {min_interactions}..{max_interactions} ratings, split 7:1:2 by seed "
           f"{seed}, stratified by {sensitive!r}",
           f"groups are the values of {sensitive!r} in sorted order"
           + ("; it is an input feature" if sensitive_as_feature else
              "; it is not an input feature (use --sensitive-as-feature to add it)")]
  if dropped:
    notes.append(f"{dropped} repeated (user, item) rating(s) resolved by --duplicates "
                 f"{duplicates}: " + ("the last one kept" if duplicates == "last" else
                                      "their mean kept at the last one's place"))
  if not ids_are_ints:
    notes.append(f"user ids are not all integers: user_id is the 0-based line of the user in "
                 f"{users_path.name} (after the header)")
  meta = make_meta(
      dataset="custom", protocol="custom", seed=seed, fields=fields,
      sensitive={"name": sensitive, "column": column, "groups": list(group_vocab)},
      rating_min=float(kept_ratings.min()), rating_max=float(kept_ratings.max()), splits=splits,
      order=("each user's ratings by timestamp, ties in file order" if "timestamp" in col else
             "each user's ratings in file order") + "; the query is the last 10 valid rows",
      sources=read, notes=notes)
  return splits, meta


def _read_csv(path: pathlib.Path, required=(), allowed=None):
  """(header, rows, line numbers) of a CSV file with a header line; cells are stripped."""
  try:
    with open(path, encoding="utf-8-sig", newline="") as f:
      reader = csv.reader(f)
      header = next(reader, None)
      if header is None:
        raise DataError(f"{path}: the file is empty; expected a header line "
                        f"({', '.join(required)}, ...)")
      header = [h.strip() for h in header]
      rows, lines = [], []
      for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()):
          continue
        if len(row) != len(header):
          raise DataError(f"{path}:{reader.line_num}: malformed line: expected {len(header)} "
                          f"fields ({', '.join(header)}), found {len(row)}")
        rows.append([c.strip() for c in row])
        lines.append(reader.line_num)
  except FileNotFoundError:
    raise DataError(f"input file not found: {path}") from None
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: cannot decode as UTF-8 at byte {e.start}") from None
  except csv.Error as e:
    raise DataError(f"{path}: malformed CSV ({e})") from None
  missing = [c for c in required if c not in header]
  if missing:
    raise DataError(f"{path}: missing column(s) {', '.join(missing)} in the header "
                    f"{','.join(header)}")
  if allowed is not None and any(c not in allowed for c in header):
    extra = [c for c in header if c not in allowed]
    raise DataError(f"{path}: unexpected column(s) {', '.join(extra)}; expected "
                    f"{','.join(allowed)}")
  dupes = {c for c in header if header.count(c) > 1}
  if dupes:
    raise DataError(f"{path}: duplicate column(s) {', '.join(sorted(dupes))} in the header")
  return header, rows, lines


def _floats(values, path, lines, column: str) -> np.ndarray:
  out = np.empty(len(values), np.float64)
  for k, v in enumerate(values):
    try:
      out[k] = float(v)
    except ValueError:
      out[k] = np.nan
    if not np.isfinite(out[k]):
      raise DataError(f"{path}:{lines[k]}: non-numeric {column} {v!r}; expected a number")
  return out


def _timestamps(values, path, lines) -> np.ndarray:
  out = np.empty(len(values), np.float64)
  for k, v in enumerate(values):
    try:
      out[k] = float(v)
    except ValueError:
      try:
        out[k] = datetime.datetime.fromisoformat(v).timestamp()
      except ValueError:
        raise DataError(f"{path}:{lines[k]}: timestamp {v!r} is neither a number nor an ISO "
                        "8601 date/time") from None
  return out


def _id_index(rows, column: int, path, lines, what: str) -> dict[str, int]:
  index: dict[str, int] = {}
  for k, (row, line) in enumerate(zip(rows, lines)):
    if row[column] == "":
      raise DataError(f"{path}:{line}: empty {what} id")
    if row[column] in index:
      raise DataError(f"{path}:{line}: {what} {row[column]!r} appears twice (first on line "
                      f"{lines[index[row[column]]]}); one line per {what}")
    index[row[column]] = k
  return index


def _user_ids(rows, column: int) -> tuple[np.ndarray, bool]:
  """int64 ids: the ids themselves if all are integers, else each user's row index."""
  try:
    return np.array([int(row[column]) for row in rows], np.int64), True
  except (ValueError, OverflowError):
    return np.arange(len(rows), dtype=np.int64), False


def _features(header, rows, columns, kept, side: str, fixed=None):
  """(int32 table[n, width], field specs) of the feature ``columns`` for entities ``kept``."""
  fixed = fixed or {}
  kept = kept.tolist()
  parts, specs = [], []
  for name in columns:
    j = header.index(name)
    if name in fixed:
      vocab = fixed[name]
      col = np.zeros((len(rows), 1), np.int32)
      col[kept, 0] = [vocab[rows[i][j]] for i in kept]
      parts.append(col)
      specs.append((name, side, "categorical", 1, len(vocab)))
      continue
    cells = {i: _split_cell(rows[i][j]) for i in kept}
    vocab = sorted_vocab(v for values in cells.values() for v in values)
    width = max(len(values) for values in cells.values())
    lists = [[vocab[v] for v in cells[i]] if i in cells else [] for i in range(len(rows))]
    is_multi = any(MULTI_SEP in rows[i][j] for i in kept)
    if is_multi:
      parts.append(multi_slots(lists, len(vocab), width))
      specs.append((name, side, "multi", width, len(vocab)))
    else:
      col = np.zeros((len(rows), 1), np.int32)
      col[kept, 0] = [lists[i][0] for i in kept]
      parts.append(col)
      specs.append((name, side, "categorical", 1, len(vocab)))
  table = np.concatenate(parts, axis=1) if parts else np.zeros((len(rows), 0), np.int32)
  return table, specs


def _split_cell(cell: str) -> list[str]:
  values = [v.strip() for v in cell.split(MULTI_SEP) if v.strip()]
  return values or [""]
