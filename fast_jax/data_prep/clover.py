"""The ``clover`` protocol: the MeLU/CLOVER state files behind the FAST paper's numbers.

train = the warm state, valid = ``user_cold_state_valid``, test = ``user_cold_state_test``,
each with its ``_y`` ratings; users with ``min..max`` interactions (13..100) are kept in
the state file's key order, and each user's rows keep the stored order, so the query
(the last 10 valid rows) is the last 10 entries of the state file.

Features (docs/data.md, the clover protocol):

* ML-100K: item year (70), genre (19 flags -> a multi field); user age>=40 (2),
  gender (2, sensitive), occupation (21), zip (522); from the shipped profile JSON.
* Book-Crossing: item author (28,678), publisher (5,897), year (1,170); user
  country (58), age>=40 (2, sensitive); from the shipped profile JSON.
* ML-1M: item rate (6), genre (7 slots of 25), director (12 slots of 2,186), actor
  (4 slots of 7,978) from ``movies_extrainfos.dat`` and the ``m_*.txt`` lists; user gender
  (sensitive), age (7), occupation (21), zip (first 5 characters, 3,402) from ``users.dat``.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np

from fast_jax.dataset import MIN_LENGTH, QUERY_SIZE, SPLITS, DataError

from fast_jax.data_prep import sources
from fast_jax.data_prep.common import (Progress, Tasks, check_splits_nonempty,
                              column_of, layout, make_meta, multi_slots, pack_all, read_table,
                              read_text, tasks_from_lists, to_numbers)

ORDER = ("state-file order (not chronological); the query is the last 10 valid rows, "
         "i.e. the last 10 entries of the user's list in the state file")

# CLOVER's vocabulary sizes (its --num_* flags).
ML100K_ITEM = (("year", 70),)
ML100K_GENRES = 19
ML100K_USER = (("age", 2), ("gender", 2), ("occupation", 21), ("zip", 522))
BX_ITEM = (("author", 28678), ("publisher", 5897), ("year", 1170))
BX_USER = (("country", 58), ("age", 2))
# MeLU/CLOVER's slot counts of the ML-1M multi-valued fields.
ML1M_SLOTS = {"genre": 7, "director": 12, "actor": 4}
# Values pandas reads as NaN; CLOVER then looks up str(NaN) == "nan" in the m_*.txt lists.
_PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
              "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def prepare_ml100k(folder: pathlib.Path, *, min_interactions: int, max_interactions: int,
                   progress: bool):
  with Progress(6, "ml100k (clover)", progress) as step:
    step("profiles")
    item_keys, items = _profile(folder / "book_profile.json", ML100K_ITEM[0:1] + tuple(
        (f"genre flag {g}", 2) for g in range(ML100K_GENRES)))
    genre_lists = [np.flatnonzero(flags).tolist() for flags in items[:, 1:]]
    if any(not g for g in genre_lists):
      k = item_keys[[not g for g in genre_lists].index(True)]
      raise DataError(f"{folder / 'book_profile.json'}: movie {k} has no genre flag set")
    slots = max(len(g) for g in genre_lists)
    item_table = np.concatenate(
        [items[:, :1], multi_slots(genre_lists, ML100K_GENRES, slots)], axis=1).astype(np.int32)
    user_keys, user_table = _profile(folder / "user_profile.json", ML100K_USER)
    fields = layout([("year", "item", "categorical", 1, 70),
                     ("genre", "item", "multi", slots, ML100K_GENRES)]
                    + [(n, "user", "categorical", 1, v) for n, v in ML100K_USER])
    tasks = _read_states(folder, "user_warm_state", item_keys, user_keys,
                         user_table[:, 1], (1, 5), min_interactions, max_interactions, step)
    step("packing")
    splits = pack_all(tasks, item_table, user_table.astype(np.int32), fields)
  read, notes = _source_notes(folder, "ml-100k-clover", "user_warm_state", (
      "book_profile.json", "user_profile.json"))
  meta = make_meta(
      dataset="ml100k", protocol="clover", seed=None, fields=fields,
      sensitive={"name": "gender", "column": column_of(fields, "gender"), "groups": ["M", "F"]},
      rating_min=1, rating_max=5, splits=splits, order=ORDER + " (u.data line order)",
      sources=read, notes=notes + [
          "CLOVER's ML-100K states (train = user_warm_state); its preprocessing skipped the "
          "first line of u.data/u.item/u.user, so they hold 583 users (the raw protocol has 582)",
          "genre: the 19 flags as a multi field (mean of the genre embeddings, i.e. CLOVER's "
          "bias-free linear map of the multi-hot vector divided by the genre count)",
          "age is binarised at 40 (0: <40, 1: >=40); user and item ids are CLOVER's re-indexed ids"])
  return splits, meta


def prepare_bookcrossing(folder: pathlib.Path, *, min_interactions: int, max_interactions: int,
                         progress: bool):
  with Progress(6, "bookcrossing (clover)", progress) as step:
    step("profiles")
    item_keys, item_table = _profile(folder / "book_profile.json", BX_ITEM)
    user_keys, user_table = _profile(folder / "user_profile.json", BX_USER)
    fields = layout([(n, "item", "categorical", 1, v) for n, v in BX_ITEM]
                    + [(n, "user", "categorical", 1, v) for n, v in BX_USER])
    tasks = _read_states(folder, "user_warm_state", item_keys, user_keys, user_table[:, 1],
                         (1, 10), min_interactions, max_interactions, step)
    step("packing")
    splits = pack_all(tasks, item_table.astype(np.int32), user_table.astype(np.int32), fields)
  read, notes = _source_notes(folder, "bookcrossing-clover", "user_warm_state", (
      "book_profile.json", "user_profile.json"))
  meta = make_meta(
      dataset="bookcrossing", protocol="clover", seed=None, fields=fields,
      sensitive={"name": "age", "column": column_of(fields, "age"),
                 "groups": ["age<40", "age>=40"]},
      rating_min=1, rating_max=10, splits=splits,
      order=ORDER + " (BX-Book-Ratings.csv row order; Book-Crossing has no timestamps)",
      sources=read, notes=notes + [
          "CLOVER's Book-Crossing states (train = user_warm_state), identical to the FAST "
          "code's pickles; 0-ratings were dropped, ratings are 1..10",
          "year has 1,170 labels because CLOVER split BX-Books.csv naively on ';' (shifted "
          "columns); treat it as an opaque id", "country = last token of the BX location"])
  return splits, meta


def prepare_ml1m(folder: pathlib.Path, *, min_interactions: int, max_interactions: int,
                 progress: bool):
  with Progress(7, "ml1m (clover)", progress) as step:
    step("vocabularies")
    vocab = {name: _load_list(folder / f"m_{name}.txt") for name in (
        "rate", "genre", "director", "actor", "gender", "age", "occupation", "zipcode")}
    step("movies_extrainfos.dat")
    item_keys, item_table = _ml1m_items(folder / "movies_extrainfos.dat", vocab)
    user_keys, user_table = _ml1m_users(folder / "users.dat", vocab)
    sizes = {k: len(v) for k, v in vocab.items()}
    fields = layout([
        ("rate", "item", "categorical", 1, sizes["rate"]),
        ("genre", "item", "multi", ML1M_SLOTS["genre"], sizes["genre"]),
        ("director", "item", "multi", ML1M_SLOTS["director"], sizes["director"]),
        ("actor", "item", "multi", ML1M_SLOTS["actor"], sizes["actor"]),
        ("gender", "user", "categorical", 1, sizes["gender"]),
        ("age", "user", "categorical", 1, sizes["age"]),
        ("occupation", "user", "categorical", 1, sizes["occupation"]),
        ("zip", "user", "categorical", 1, sizes["zipcode"])])
    tasks = _read_states(folder, "warm_state", item_keys, user_keys, user_table[:, 0], (1, 5),
                         min_interactions, max_interactions, step)
    step("packing")
    splits = pack_all(tasks, item_table, user_table, fields)
  read, notes = _source_notes(folder, "ml-1m-clover", "warm_state", (
      "movies_extrainfos.dat", "users.dat", *(f"m_{k}.txt" for k in vocab)))
  meta = make_meta(
      dataset="ml1m", protocol="clover", seed=None, fields=fields,
      sensitive={"name": "gender", "column": column_of(fields, "gender"),
                 "groups": list(vocab["gender"])},
      rating_min=1, rating_max=5, splits=splits,
      order=ORDER + " (MeLU's per-user lists in ratings.dat line order)",
      sources=read, notes=notes + [
          "train = warm_state.json (MeLU's warm users minus the 604 CLOVER moved to "
          "user_cold_state_valid), test = MeLU's user_cold_state; only movies up to 1997",
          "item features from movies_extrainfos.dat with the m_*.txt lists (index = line "
          "position; 'N/A' reads as 'nan'; director parentheticals removed); zip = first 5 "
          "characters",
          "genre is a true mean over its non-pad slots; CLOVER divides the slot mean by the "
          "genre count again (a quirk not copied)",
          f"actor vocabulary = m_actor.txt size ({sizes['actor']}); CLOVER allocates 8,030 rows",
          "age is the 7 MovieLens buckets (1, 18, 25, 35, 45, 50, 56), not binarised"])
  return splits, meta


# ----------------------------------------------------------------------------- states


def _read_states(folder: pathlib.Path, train_state: str, item_keys, user_keys, user_group,
                 rating_range, min_interactions: int, max_interactions: int,
                 step) -> dict[str, Tasks]:
  item_row = {k: i for i, k in enumerate(item_keys.tolist())}
  user_row = {k: i for i, k in enumerate(user_keys.tolist())}
  states = dict(zip(SPLITS, (train_state, "user_cold_state_valid", "user_cold_state_test")))
  tasks = {}
  for split, state in states.items():
    step(f"{state}.json")
    tasks[split] = _read_state(folder, state, item_row, user_row, user_group, rating_range,
                               min_interactions, max_interactions)
  check_splits_nonempty(tasks, str(folder))
  return tasks


def _read_state(folder, state, item_row, user_row, user_group, rating_range,
                min_interactions, max_interactions) -> Tasks:
  x_path, y_path = folder / f"{state}.json", folder / f"{state}_y.json"
  xs, ys = _load_json(x_path), _load_json(y_path)
  for path, obj in ((x_path, xs), (y_path, ys)):
    if not isinstance(obj, dict):
      raise DataError(f"{path}: expected a JSON object {{user id: [...]}}")
  if list(xs) != list(ys):
    extra = next((k for k in list(xs) + list(ys) if (k in xs) != (k in ys)), None)
    raise DataError(f"{y_path}: its user keys do not match {x_path.name} "
                    + (f"(user {extra} is in only one of them)" if extra else "(order differs)"))
  lo, hi = rating_range
  user_ids, rows, groups, item_rows, ratings = [], [], [], [], []
  for key, items in xs.items():
    labels = ys[key]
    if not isinstance(items, list) or not isinstance(labels, list) or len(items) != len(labels):
      raise DataError(f"{y_path}: user {key} has {_len(labels)} ratings but {x_path.name} lists "
                      f"{_len(items)} items")
    if not min_interactions <= len(items) <= max_interactions:
      continue
    if len(items) < MIN_LENGTH:
      raise DataError(f"{x_path}: user {key} has {len(items)} interactions; every task needs "
                      f"at least {MIN_LENGTH} (1 support + {QUERY_SIZE} query). Use "
                      f"--min-interactions {MIN_LENGTH} or more")
    uid = _int_key(key, x_path, "user id")
    if uid not in user_row:
      raise DataError(f"{x_path}: user {key} has no user profile")
    try:
      item_rows.append([item_row[_int_key(i, x_path, "item id")] for i in items])
    except KeyError as e:
      raise DataError(f"{x_path}: user {key}: item {e.args[0]} has no item profile") from None
    try:
      r = np.array(labels, dtype=np.float32)
      if r.ndim != 1 or any(isinstance(v, (bool, str)) for v in labels):
        raise ValueError
    except (ValueError, TypeError):
      bad = next(v for v in labels if isinstance(v, (bool, str, list, dict, type(None))))
      raise DataError(f"{y_path}: user {key}: non-numeric rating {bad!r}; expected a number "
                      f"in {lo}..{hi}") from None
    if r.size and (r.min() < lo or r.max() > hi or not np.all(np.isfinite(r))):
      bad = r[(r < lo) | (r > hi) | ~np.isfinite(r)][0]
      raise DataError(f"{y_path}: user {key}: rating {bad:g} outside the rating range {lo}..{hi}")
    user_ids.append(uid)
    rows.append(user_row[uid])
    groups.append(int(user_group[user_row[uid]]))
    ratings.append(r)
  return tasks_from_lists(user_ids, rows, groups, item_rows, ratings)


def _len(v) -> int | str:
  return len(v) if isinstance(v, list) else "no list of"


def _int_key(value, path, what: str) -> int:
  try:
    if isinstance(value, bool):
      raise ValueError
    return int(value)
  except (ValueError, TypeError):
    raise DataError(f"{path}: {what} {value!r} is not an integer") from None


def _load_json(path: pathlib.Path):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise DataError(f"input file not found: {path}") from None
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: cannot decode as UTF-8 at byte {e.start}") from None


def _profile(path: pathlib.Path, columns) -> tuple[np.ndarray, np.ndarray]:
  """(int64 keys[n], int64 table[n, k]) of a ``{id: [label, ...]}`` profile file.

  ``columns`` names each label and its vocabulary size; a label outside it is an error.
  """
  obj = _load_json(path)
  if not isinstance(obj, dict):
    raise DataError(f"{path}: expected a JSON object {{id: [labels]}}")
  names = [n for n, _ in columns]
  table = np.zeros((len(obj), len(columns)), np.int64)
  for i, (key, labels) in enumerate(obj.items()):
    if (not isinstance(labels, list) or len(labels) != len(columns)
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels)):
      raise DataError(f"{path}: entry {key}: expected {len(columns)} integer labels "
                      f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}), got "
                      f"{str(labels)[:80]}")
    table[i] = labels
  keys = np.array([_int_key(k, path, "id") for k in obj], np.int64)
  for j, (name, size) in enumerate(columns):
    bad = np.flatnonzero((table[:, j] < 0) | (table[:, j] >= size))
    if bad.size:
      raise DataError(f"{path}: entry {keys[bad[0]]}: {name} {table[bad[0], j]} is outside the "
                      f"vocabulary 0..{size - 1}")
  return keys, table


# ----------------------------------------------------------------------------- ML-1M features


def _load_list(path: pathlib.Path) -> dict[str, int]:
  """value -> line position of an m_*.txt list (the first occurrence wins)."""
  lines = read_text(path).split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  index: dict[str, int] = {}
  for i, line in enumerate(lines):
    index.setdefault(line.strip(), i)
  if not lines:
    raise DataError(f"{path}: the vocabulary list is empty")
  return index


def _lookup(value: str, vocab: dict, path, line: int, field: str, list_name: str) -> int:
  try:
    return vocab[value]
  except KeyError:
    raise DataError(f"{path}:{line}: {field} {value!r} is not in the vocabulary {list_name} "
                    f"({len(vocab)} entries)") from None


def read_movies_extrainfos(path: pathlib.Path):
  """MeLU's movies_extrainfos.dat: (movie ids int64[n], line numbers, values).

  ``values`` maps rate -> str per movie and genre/director/actor -> list of str per
  movie, read as CLOVER reads them: pandas' NaN markers (e.g. 'N/A') become 'nan', lists
  are split on ', ', and director parentheticals such as '(co-director)' are removed.
  """
  names = ("movie_id", "title", "year", "rate", "released", "genre", "director", "writer",
           "actors", "plot", "poster")
  cols, lines = read_table(path, "::", len(names), names)
  na = lambda v: "nan" if v in _PANDAS_NA else v
  values = {
      "rate": [na(v) for v in cols["rate"]],
      "genre": [na(v).split(", ") for v in cols["genre"]],
      "director": [[re.sub(r"\([^()]*\)", "", d).strip() for d in na(v).split(", ")]
                   for v in cols["director"]],
      "actor": [na(v).split(", ") for v in cols["actors"]],
  }
  return to_numbers(cols["movie_id"], np.int64, path, "movie id", lines), lines, values


def _ml1m_items(path: pathlib.Path, vocab) -> tuple[np.ndarray, np.ndarray]:
  keys, lines, values = read_movies_extrainfos(path)
  table = np.zeros((len(lines), 1 + sum(ML1M_SLOTS.values())), np.int32)
  for i, line in enumerate(lines.tolist()):
    table[i, 0] = _lookup(values["rate"][i], vocab["rate"], path, line, "rate", "m_rate.txt")
    start = 1
    for field, width in ML1M_SLOTS.items():
      ids = [_lookup(v, vocab[field], path, line, field, f"m_{field}.txt")
             for v in values[field][i]]
      if len(ids) > width:
        raise DataError(f"{path}:{line}: {len(ids)} {field} values; MeLU/CLOVER's layout has "
                        f"{width} slots")
      table[i, start:start + width] = ids + [len(vocab[field])] * (width - len(ids))
      start += width
  return keys, table


def _ml1m_users(path: pathlib.Path, vocab) -> tuple[np.ndarray, np.ndarray]:
  names = ("user_id", "gender", "age", "occupation", "zip")
  cols, lines = read_table(path, "::", len(names), names)
  keys = to_numbers(cols["user_id"], np.int64, path, "user id", lines)
  table = np.zeros((len(lines), 4), np.int32)
  for i, line in enumerate(lines.tolist()):
    table[i] = [
        _lookup(cols["gender"][i], vocab["gender"], path, line, "gender", "m_gender.txt"),
        _lookup(cols["age"][i], vocab["age"], path, line, "age", "m_age.txt"),
        _lookup(cols["occupation"][i], vocab["occupation"], path, line, "occupation",
                "m_occupation.txt"),
        _lookup(cols["zip"][i][:5], vocab["zipcode"], path, line, "zip", "m_zipcode.txt")]
  return keys, table


def _source_notes(folder: pathlib.Path, folder_name: str, train_state: str, extra):
  names = [f"{s}{y}.json" for s in (train_state, "user_cold_state_valid", "user_cold_state_test")
           for y in ("", "_y")] + list(extra)
  return sources.checksums(folder, names, folder_name)
