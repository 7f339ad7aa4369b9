"""The ``raw`` protocol: MovieLens from the GroupLens files, split 7:1:2 by seed.

Users with ``min..max`` interactions (13..100) are kept; each user's ratings are in time
order where the files have timestamps (ties keep file order), else in file order; users
are split 7:1:2 at random by ``seed``, stratified by gender. Vocabularies are built over
the kept users and the items they rated, values in sorted order.

* ML-100K (``u.data``, ``u.item``, ``u.user``; every line is data, no header): item year
  (from the release date; "unknown" when missing), genre (19 flags -> multi field); user
  age>=40, gender (sensitive), occupation, zip (full string).
* ML-1M (``users.dat``, ``movies.dat``, ``ratings.dat`` or, without timestamps,
  ``ratings_without_timestamps.dat``): item genre (movies.dat, multi field); with
  ``movies_extrainfos=PATH`` (MeLU's IMDb table) item rate, genre, director, actor
  instead; user gender (sensitive), age (7 buckets), occupation, zip (first 5 characters).
"""

from __future__ import annotations

import pathlib

import numpy as np

from fast_jax.dataset import SPLITS, DataError

from fast_jax.data_prep import sources
from fast_jax.data_prep.clover import read_movies_extrainfos
from fast_jax.data_prep.common import (Progress, Tasks, check_splits_nonempty, column_of, filter_lengths,
                              layout, make_meta, md5_file, multi_slots, pack_all, read_table,
                              sorted_vocab, stratified_split, to_numbers)

ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")
GENDERS = ("M", "F")
IMDB_SLOTS = {"genre": 7, "director": 12, "actor": 4}


def prepare_ml100k(folder: pathlib.Path, *, seed: int, min_interactions: int,
                   max_interactions: int, progress: bool):
  with Progress(5, "ml100k (raw)", progress) as step:
    step("u.data")
    path = folder / "u.data"
    cols, lines = read_table(path, "\t", 4, ("user", "item", "rating", "timestamp"), "latin-1")
    users = to_numbers(cols["user"], np.int64, path, "user id", lines)
    items = to_numbers(cols["item"], np.int64, path, "item id", lines)
    ratings = to_numbers(cols["rating"], np.float32, path, "rating", lines)
    times = to_numbers(cols["timestamp"], np.int64, path, "timestamp", lines)
    _check_ratings(ratings, path, lines, 1, 5)
    step("u.item, u.user")
    movie_names = ("item", "title", "release_date", "video_release_date", "url",
                   *(f"genre:{g}" for g in ML100K_GENRES))
    path = folder / "u.item"
    mcols, mlines = read_table(path, "|", len(movie_names), movie_names, "latin-1")
    movie_ids = to_numbers(mcols["item"], np.int64, path, "item id", mlines)
    flags = np.stack([to_numbers(mcols[f"genre:{g}"], np.int64, path, f"genre flag {g}", mlines)
                      for g in ML100K_GENRES], axis=1)
    years = [d.strip()[-4:] if d.strip() else "unknown" for d in mcols["release_date"]]
    path = folder / "u.user"
    ucols, ulines = read_table(path, "|", 5, ("user", "age", "gender", "occupation", "zip"),
                               "latin-1")
    user_ids = to_numbers(ucols["user"], np.int64, path, "user id", ulines)
    ages = to_numbers(ucols["age"], np.int64, path, "age", ulines)
    genders = _genders(ucols["gender"], path, ulines)

    step("tasks")
    tasks = _user_tasks(users, items, ratings, times, lines, movie_ids, user_ids, genders,
                        folder / "u.data", folder / "u.item", folder / "u.user")
    tasks = filter_lengths(tasks, min_interactions, max_interactions, str(folder / "u.data"))
    kept_items = np.unique(tasks.item_row)
    kept_users = tasks.user_row
    year, year_spec = _encode("year", years, kept_items, "item")  # "unknown" sorts last
    genre_lists = [np.flatnonzero(f).tolist() or [0] for f in flags]  # none -> "unknown"
    slots = max(len(genre_lists[i]) for i in kept_items)
    item_table = np.concatenate([year, multi_slots(genre_lists, len(ML100K_GENRES), slots)], 1)
    occupation, occupation_spec = _encode("occupation", ucols["occupation"], kept_users, "user")
    zip_code, zip_spec = _encode("zip", ucols["zip"], kept_users, "user")
    user_table = np.concatenate([(ages >= 40).astype(np.int32)[:, None], genders[:, None],
                                 occupation, zip_code], axis=1)
    fields = layout([year_spec, ("genre", "item", "multi", slots, len(ML100K_GENRES)),
                     ("age", "user", "categorical", 1, 2), ("gender", "user", "categorical", 1, 2),
                     occupation_spec, zip_spec])
    step("split and pack")
    parts = stratified_split(tasks.group, seed)
    split_tasks = {s: tasks.subset(parts[s]) for s in SPLITS}
    check_splits_nonempty(split_tasks, str(folder))
    splits = pack_all(split_tasks, item_table, user_table, fields)
  read, notes = sources.checksums(folder, ("u.data", "u.item", "u.user"), "ml-100k")
  meta = make_meta(
      dataset="ml100k", protocol="raw", seed=seed, fields=fields,
      sensitive={"name": "gender", "column": column_of(fields, "gender"), "groups": list(GENDERS)},
      rating_min=1, rating_max=5, splits=splits,
      order="each user's ratings by u.data timestamp, ties in file order; the query is the "
            "last 10 valid rows (the 10 most recent ratings)",
      sources=read, notes=notes + [
          f"users with {min_interactions}..{max_interactions} ratings, split 7:1:2 by seed "
          f"{seed}, stratified by gender",
          "every line of u.data/u.item/u.user is read (CLOVER skipped the first line of each)",
          "year = release-date year ('unknown' for the one movie without a date); genre = the "
          "19 u.item flags as a multi field; age binarised at 40 (0: <40, 1: >=40); zip = full "
          "string",
          "vocabularies cover the kept users and the movies they rated, in sorted order"])
  return splits, meta


def prepare_ml1m(folder: pathlib.Path, *, seed: int, min_interactions: int,
                 max_interactions: int, progress: bool, movies_extrainfos=None):
  with Progress(5, "ml1m (raw)", progress) as step:
    timed = (folder / "ratings.dat").is_file()
    ratings_name = "ratings.dat" if timed else "ratings_without_timestamps.dat"
    step(ratings_name)
    path = folder / ratings_name
    names = ("user", "item", "rating", "timestamp")[:4 if timed else 3]
    cols, lines = read_table(path, "::", len(names), names, "latin-1")
    users = to_numbers(cols["user"], np.int64, path, "user id", lines)
    items = to_numbers(cols["item"], np.int64, path, "movie id", lines)
    ratings = to_numbers(cols["rating"], np.float32, path, "rating", lines)
    _check_ratings(ratings, path, lines, 1, 5)
    times = (to_numbers(cols["timestamp"], np.int64, path, "timestamp", lines) if timed
             else np.zeros_like(users))
    step("movies, users")
    path = folder / "users.dat"
    ucols, ulines = read_table(path, "::", 5, ("user", "gender", "age", "occupation", "zip"),
                               "latin-1")
    user_ids = to_numbers(ucols["user"], np.int64, path, "user id", ulines)
    genders = _genders(ucols["gender"], path, ulines)
    notes = []
    if movies_extrainfos is None:
      path = folder / "movies.dat"
      mcols, mlines = read_table(path, "::", 3, ("movie", "title", "genres"), "latin-1")
      movie_ids = to_numbers(mcols["movie"], np.int64, path, "movie id", mlines)
      item_values = {"genre": [g.split("|") for g in mcols["genres"]]}
      item_specs = (("genre", 0),)
      movie_source = folder / "movies.dat"
    else:
      movie_source = pathlib.Path(movies_extrainfos).expanduser()
      movie_ids, _, item_values = read_movies_extrainfos(movie_source)
      item_specs = (("rate", None), *IMDB_SLOTS.items())
      known = np.isin(items, movie_ids)
      if not known.all():
        notes.append(f"{int((~known).sum())} ratings of movies missing from "
                     f"{movie_source.name} were dropped")
        users, items, ratings, times, lines = (a[known] for a in (users, items, ratings, times,
                                                                  lines))

    step("tasks")
    tasks = _user_tasks(users, items, ratings, times, lines, movie_ids, user_ids, genders,
                        folder / ratings_name, movie_source, folder / "users.dat")
    tasks = filter_lengths(tasks, min_interactions, max_interactions,
                           str(folder / ratings_name))
    kept_items = np.unique(tasks.item_row)
    kept_users = tasks.user_row
    item_parts = [_encode(name, item_values[name], kept_items, "item", width, movie_source,
                          movie_ids) for name, width in item_specs]
    user_values = {"age": ucols["age"], "occupation": ucols["occupation"],
                   "zip": [v[:5] for v in ucols["zip"]]}
    user_parts = [_encode(name, values, kept_users, "user") for name, values in user_values.items()]
    item_table = np.concatenate([col for col, _ in item_parts], axis=1)
    user_table = np.concatenate([genders[:, None]] + [col for col, _ in user_parts], axis=1)
    fields = layout([spec for _, spec in item_parts] + [("gender", "user", "categorical", 1, 2)]
                    + [spec for _, spec in user_parts])
    step("split and pack")
    parts = stratified_split(tasks.group, seed)
    split_tasks = {s: tasks.subset(parts[s]) for s in SPLITS}
    check_splits_nonempty(split_tasks, str(folder))
    splits = pack_all(split_tasks, item_table, user_table, fields)
  read, check_notes = sources.checksums(folder, (ratings_name, "users.dat") + (
      ("movies.dat",) if movies_extrainfos is None else ()), "ml-1m")
  if movies_extrainfos is not None:
    read[f"ml-1m/{movie_source.name}"] = md5_file(movie_source)
  order = ("each user's ratings by ratings.dat timestamp, ties in file order" if timed else
           "each user's ratings in file order (no timestamps here: ML-1M's "
           "ratings_without_timestamps.dat keeps ratings.dat's line order)")
  notes = check_notes + notes + [
      f"users with {min_interactions}..{max_interactions} ratings, split 7:1:2 by seed {seed}, "
      "stratified by gender",
      ("item features from movies.dat (genre as a multi field)" if movies_extrainfos is None
       else f"item features rate, genre, director, actor from {movie_source.name}"),
      "age = the 7 MovieLens buckets; zip = first 5 characters; vocabularies cover the kept "
      "users and the movies they rated, in sorted order"]
  if not timed:
    notes.insert(0, "ML-1M raw ratings here have no timestamps: file order kept, so the last 10 "
                    "rows are the last 10 lines of the user in the ratings file, not the latest")
  meta = make_meta(
      dataset="ml1m", protocol="raw", seed=seed, fields=fields,
      sensitive={"name": "gender", "column": column_of(fields, "gender"), "groups": list(GENDERS)},
      rating_min=1, rating_max=5, splits=splits,
      order=order + "; the query is the last 10 valid rows", sources=read, notes=notes)
  return splits, meta


# ----------------------------------------------------------------------------- helpers


def _user_tasks(users, items, ratings, times, lines, movie_ids, user_ids, genders, ratings_path,
                movies_path, users_path):
  """All users' tasks (by user id), each in time order with ties in file order."""
  movie_row = _index(movie_ids, movies_path, "movie id")
  user_row = _index(user_ids, users_path, "user id")
  item_rows = _rows(items, movie_row, ratings_path, lines, "movie", movies_path.name)
  user_rows = _rows(users, user_row, ratings_path, lines, "user", users_path.name)
  order = np.lexsort((np.arange(users.size), times, users))
  users, item_rows, user_rows, ratings = (a[order] for a in (users, item_rows, user_rows, ratings))
  starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
  offsets = np.r_[starts, users.size]
  return Tasks(user_id=users[starts], user_row=user_rows[starts].astype(np.int64),
               group=genders[user_rows[starts]].astype(np.int32), offsets=offsets.astype(np.int64),
               item_row=item_rows.astype(np.int64), rating=ratings.astype(np.float32))


def _index(ids: np.ndarray, path, what: str) -> dict:
  uniq, counts = np.unique(ids, return_counts=True)
  if (counts > 1).any():
    raise DataError(f"{path}: {what} {uniq[counts > 1][0]} appears on more than one line")
  return {int(v): i for i, v in enumerate(ids.tolist())}


def _rows(ids: np.ndarray, row_of: dict, path, lines, what: str, other: str) -> np.ndarray:
  """Row of each id in its table; an id without a row is an error naming the line."""
  keys = np.array(sorted(row_of), np.int64)
  pos = np.searchsorted(keys, ids)
  found = (pos < keys.size) & (keys[np.minimum(pos, keys.size - 1)] == ids)
  if not found.all():
    i = int(np.flatnonzero(~found)[0])
    raise DataError(f"{path}:{lines[i]}: {what} {ids[i]} has no line in {other}")
  rows = np.array([row_of[int(k)] for k in keys], np.int64)
  return rows[pos]


def _genders(values, path, lines) -> np.ndarray:
  out = np.zeros(len(values), np.int32)
  for i, v in enumerate(values):
    if v.strip() not in GENDERS:
      raise DataError(f"{path}:{lines[i]}: gender {v!r}; expected M or F")
    out[i] = GENDERS.index(v.strip())
  return out


def _check_ratings(ratings, path, lines, lo, hi) -> None:
  bad = np.flatnonzero((ratings < lo) | (ratings > hi))
  if bad.size:
    raise DataError(f"{path}:{lines[bad[0]]}: rating {ratings[bad[0]]:g} outside {lo}..{hi}")


def _encode(name: str, values, kept, side: str, width: int | None = None, source=None,
            ids=None):
  """(int32 column(s) over all rows, field spec) of one field; vocabulary = kept rows' values.

  ``width`` None: a categorical field (one value per row). Otherwise a multi field (a list
  of values per row) with ``width`` slots, 0 meaning the most values of a kept row.
  """
  kept = kept.tolist()
  if width is None:
    vocab = sorted_vocab(values[i] for i in kept)
    col = np.zeros((len(values), 1), np.int32)
    col[kept, 0] = [vocab[values[i]] for i in kept]
    return col, (name, side, "categorical", 1, len(vocab))
  vocab = sorted_vocab(v for i in kept for v in values[i])
  width = width or max(len(values[i]) for i in kept)
  lists = [[] for _ in values]
  for i in kept:
    if len(values[i]) > width:
      raise DataError(f"{source}: movie {ids[i]} has {len(values[i])} {name} values; the layout "
                      f"has {width} slots")
    lists[i] = [vocab[v] for v in values[i]]
  return multi_slots(lists, len(vocab), width), (name, side, "multi", width, len(vocab))
