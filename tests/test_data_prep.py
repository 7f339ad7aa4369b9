"""data_prep on the real data: counts, row order, vocabularies, splits, bad input, CLI."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_prep import build, clover, ensure_prepared, prepare
from fast_jax.dataset import QUERY_SIZE, SPLITS, DataError, load_prepared, padding_row

from conftest import PROJECT_ROOT

# (users, ratings, users per group) per split, as in docs/data.md (clover protocol).
CLOVER_COUNTS = {
    "bookcrossing": {"train": (2441, 77319, [1734, 707]), "valid": (349, 10897, [250, 99]),
                     "test": (698, 21271, [463, 235])},
    "ml100k": {"train": (408, 18219, [286, 122]), "valid": (58, 2293, [40, 18]),
               "test": (117, 5174, [79, 38])},
    "ml1m": {"train": (2322, 106779, [1615, 707]), "valid": (331, 15032, [214, 117]),
             "test": (668, 30478, [473, 195])},
}
CLOVER_FOLDERS = {"bookcrossing": ("bookcrossing-clover", "user_warm_state"),
                  "ml100k": ("ml-100k-clover", "user_warm_state"),
                  "ml1m": ("ml-1m-clover", "warm_state")}
STATES = {"valid": "user_cold_state_valid", "test": "user_cold_state_test"}
REAL = [("bookcrossing", None), ("ml100k", None), ("ml1m", None), ("ml100k", "raw")]


def _counts(data):
  return {s: (c["users"], c["ratings"], c["groups"]) for s, c in data.meta["counts"].items()}


@pytest.mark.parametrize("name", sorted(CLOVER_COUNTS))
def test_clover_protocol_reproduces_the_published_counts(prepared, name):
  data = prepared(name)
  assert data.meta["protocol"] == "clover"
  assert _counts(data) == {s: tuple(v) for s, v in CLOVER_COUNTS[name].items()}
  for s in SPLITS:
    sp = data.split(name=s)
    assert sp.num_users == CLOVER_COUNTS[name][s][0]
    assert np.bincount(sp.group).tolist() == CLOVER_COUNTS[name][s][2]
    assert sp.length.min() >= 13 and sp.length.max() <= 100


@pytest.mark.parametrize("name", sorted(CLOVER_COUNTS))
def test_clover_rows_keep_the_state_file_order(prepared, shared_data_dir, name):
  """Users in key order, each user's ratings as stored: the query is the stored last 10."""
  data = prepared(name)
  folder, train_state = CLOVER_FOLDERS[name]
  for s, state in {"train": train_state, **STATES}.items():
    ys = json.loads((shared_data_dir / folder / f"{state}_y.json").read_text())
    kept = [k for k, v in ys.items() if 13 <= len(v) <= 100]
    sp = data.split(s)
    assert sp.user_id.tolist() == [int(k) for k in kept]
    for u, key in enumerate(kept):
      n = sp.length[u]
      np.testing.assert_array_equal(sp.y[u, :n], ys[key])
      np.testing.assert_array_equal(sp.y[u, n - QUERY_SIZE:n], ys[key][-QUERY_SIZE:])


def test_bookcrossing_rows_are_book_profile_then_user_profile(prepared, shared_data_dir):
  data = prepared("bookcrossing")
  folder = shared_data_dir / "bookcrossing-clover"
  books = json.loads((folder / "book_profile.json").read_text())
  users = json.loads((folder / "user_profile.json").read_text())
  items = json.loads((folder / "user_cold_state_test.json").read_text())
  sp = data.test
  for u in range(0, sp.num_users, 37):
    key = str(sp.user_id[u])
    want = [books[str(i)] + users[key] for i in items[key]]
    np.testing.assert_array_equal(sp.x[u, :sp.length[u]], want)
    assert sp.group[u] == users[key][1]
  assert data.sensitive_column == 4 and data.group_names == ["age<40", "age>=40"]


def test_ml1m_movie_features_follow_the_melu_lists(shared_data_dir):
  folder = shared_data_dir / "ml-1m-clover"
  lists = {k: (folder / f"m_{k}.txt").read_text(encoding="utf-8").splitlines()
           for k in ("rate", "genre", "director", "actor")}
  vocab = {k: {v.strip(): i for i, v in reversed(list(enumerate(lst)))} for k, lst in lists.items()}
  keys, table = clover._ml1m_items(folder / "movies_extrainfos.dat", vocab)
  toy_story = table[keys.tolist().index(1)]
  genre = [lists["genre"].index(g) for g in ("Animation", "Adventure", "Comedy")]
  assert toy_story[0] == lists["rate"].index("G")
  assert toy_story[1:8].tolist() == genre + [25] * 4
  assert toy_story[8:20].tolist() == [lists["director"].index("John Lasseter")] + [2186] * 11
  assert toy_story[20:24].tolist() == [lists["actor"].index(a) for a in (
      "Tom Hanks", "Tim Allen", "Don Rickles", "Jim Varney")]


def test_ml1m_clover_layout(prepared):
  data = prepared("ml1m")
  layout = [(f.name, f.kind, f.width, f.vocab_size) for f in data.fields]
  assert layout == [("rate", "categorical", 1, 6), ("genre", "multi", 7, 25),
                    ("director", "multi", 12, 2186), ("actor", "multi", 4, 7978),
                    ("gender", "categorical", 1, 2), ("age", "categorical", 1, 7),
                    ("occupation", "categorical", 1, 21), ("zip", "categorical", 1, 3402)]
  assert data.sensitive_column == 24 and data.group_names == ["M", "F"]


def test_ml100k_clover_layout(prepared):
  data = prepared("ml100k")
  layout = [(f.name, f.kind, f.width, f.vocab_size) for f in data.fields]
  assert layout == [("year", "categorical", 1, 70), ("genre", "multi", 6, 19),
                    ("age", "categorical", 1, 2), ("gender", "categorical", 1, 2),
                    ("occupation", "categorical", 1, 21), ("zip", "categorical", 1, 522)]
  assert data.sensitive_column == 8


@pytest.mark.parametrize("name,protocol", REAL)
def test_users_are_disjoint_across_splits(prepared, name, protocol):
  data = prepared(name, protocol)
  ids = [set(data.split(s).user_id.tolist()) for s in SPLITS]
  assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])


@pytest.mark.parametrize("name,protocol", REAL + [("synthetic", None)])
def test_padding_rows_are_masked(prepared, name, protocol):
  data = prepared(name, protocol)
  pad = padding_row(data.fields, data.num_columns)
  for s in SPLITS:
    sp = data.split(s)
    assert np.all(sp.y[~sp.mask] == 0)
    assert np.all(sp.x[~sp.mask] == pad)
    assert np.all(sp.y[sp.mask] >= data.rating_range[0])


@pytest.mark.parametrize("name,protocol", REAL + [("synthetic", None)])
def test_indices_are_within_each_fields_vocabulary(prepared, name, protocol):
  data = prepared(name, protocol)
  for s in SPLITS:
    rows = data.split(s).x[data.split(s).mask]
    for f in data.fields:
      cols = rows[:, f.start:f.stop]
      assert cols.min() >= 0 and cols.max() < f.table_size, f.name


@pytest.mark.parametrize("name,protocol", [("ml1m", None), ("ml100k", None), ("ml100k", "raw")])
def test_multi_fields_are_padded_with_the_reserved_index_after_their_values(prepared, name,
                                                                            protocol):
  data = prepared(name, protocol)
  multi = [f for f in data.fields if f.kind == "multi"]
  assert multi
  for s in SPLITS:
    sp = data.split(s)
    for f in multi:
      assert f.pad_index == f.vocab_size
      slots = sp.x[..., f.start:f.stop]
      valid = slots[sp.mask]
      is_pad = valid == f.pad_index
      assert not is_pad[:, 0].any(), "every row has at least one value"
      assert np.all(is_pad[:, :-1] <= is_pad[:, 1:]), "pads come after the values"
      assert np.all(slots[~sp.mask] == f.pad_index)


def test_bookcrossing_reference_predictors(prepared):
  """docs/methods.md §7: global mean 1.484 / 3.430, support mean 1.288 / 2.855."""
  data = prepared("bookcrossing")
  test = data.test
  pos = np.arange(test.max_len)[None, :]
  query = (pos >= test.length[:, None] - QUERY_SIZE) & test.mask
  support = pos < test.length[:, None] - QUERY_SIZE

  def mae_mse(pred):
    err = np.where(query, pred - test.y, 0.0)
    return (np.abs(err).sum(1) / QUERY_SIZE).mean(), ((err ** 2).sum(1) / QUERY_SIZE).mean()

  assert data.train_mean == pytest.approx(7.735, abs=5e-4)
  np.testing.assert_allclose(mae_mse(np.float32(data.train_mean)), (1.484, 3.430), atol=5e-4)
  support_mean = (test.y * support).sum(1) / support.sum(1)
  np.testing.assert_allclose(mae_mse(support_mean[:, None]), (1.288, 2.855), atol=5e-4)


# ----------------------------------------------------------------------------- raw protocol


def test_raw_ml100k_counts_without_clovers_first_line_bug(prepared):
  data = prepared("ml100k", "raw")
  counts = data.meta["counts"]
  assert sum(c["users"] for c in counts.values()) == 582
  assert sum(c["ratings"] for c in counts.values()) == 25778
  assert np.sum([c["groups"] for c in counts.values()], axis=0).tolist() == [404, 178]
  assert data.meta["seed"] == 12345 and data.group_names == ["M", "F"]


def test_raw_ml100k_split_is_7_1_2_within_each_group(prepared):
  data = prepared("ml100k", "raw")
  for g, total in enumerate((404, 178)):
    sizes = [int(np.sum(data.split(s).group == g)) for s in SPLITS]
    assert sizes == [round(0.7 * total), round(0.1 * total),
                     total - round(0.7 * total) - round(0.1 * total)]


def test_raw_ml100k_ratings_are_in_time_order(prepared, shared_data_dir):
  data = prepared("ml100k", "raw")
  u = np.loadtxt(shared_data_dir / "ml-100k" / "u.data", dtype=np.int64)
  order = np.lexsort((np.arange(len(u)), u[:, 3], u[:, 0]))
  u = u[order]
  for s in SPLITS:
    sp = data.split(s)
    for i in range(sp.num_users):
      want = u[u[:, 0] == sp.user_id[i], 2]
      np.testing.assert_array_equal(sp.y[i, :sp.length[i]], want)


def test_same_seed_gives_identical_arrays_and_another_seed_another_split(shared_data_dir):
  a = build("ml100k", protocol="raw", data_dir=shared_data_dir, progress=False)[0]
  b = build("ml100k", protocol="raw", data_dir=shared_data_dir, progress=False)[0]
  c = build("ml100k", protocol="raw", data_dir=shared_data_dir, seed=7, progress=False)[0]
  for s in SPLITS:
    for key in ("x", "y", "length", "group", "user_id"):
      np.testing.assert_array_equal(getattr(a[s], key), getattr(b[s], key))
  assert set(a["train"].user_id.tolist()) != set(c["train"].user_id.tolist())
  assert a["train"].num_users == c["train"].num_users


def test_raw_ml1m_keeps_file_order_and_says_there_are_no_timestamps(prepared, shared_data_dir):
  data = prepared("ml1m", "raw")
  assert any("no timestamps" in note for note in data.meta["notes"])
  assert "file order" in data.meta["order"]
  with open(shared_data_dir / "ml-1m" / "ratings_without_timestamps.dat") as f:
    ratings = np.array([next(f).split("::") for _ in range(3000)], np.int64)
  sp = data.train
  for i in np.flatnonzero(sp.user_id <= ratings[-1, 0] - 1):
    want = ratings[ratings[:, 0] == sp.user_id[i], 2]
    np.testing.assert_array_equal(sp.y[i, :sp.length[i]], want)
  assert [f.name for f in data.fields] == ["genre", "gender", "age", "occupation", "zip"]


def test_raw_ml1m_takes_imdb_fields_from_movies_extrainfos(shared_data_dir, tmp_path):
  small = tmp_path / "ml-1m"
  small.mkdir()
  for name in ("users.dat", "movies.dat"):
    shutil.copy(shared_data_dir / "ml-1m" / name, small / name)
  with open(shared_data_dir / "ml-1m" / "ratings_without_timestamps.dat") as f:
    (small / "ratings_without_timestamps.dat").write_text("".join(next(f) for _ in range(40000)))
  splits, meta = build("ml1m", protocol="raw", data_dir=tmp_path, progress=False,
                       movies_extrainfos=shared_data_dir / "ml-1m-clover" / "movies_extrainfos.dat")
  layout = [(f["name"], f["kind"], f["stop"] - f["start"]) for f in meta["fields"]]
  assert layout == [("rate", "categorical", 1), ("genre", "multi", 7), ("director", "multi", 12),
                    ("actor", "multi", 4), ("gender", "categorical", 1), ("age", "categorical", 1),
                    ("occupation", "categorical", 1), ("zip", "categorical", 1)]
  assert meta["sensitive"]["column"] == 24


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_by_seed():
  a = build("synthetic", progress=False)[0]
  b = build("synthetic", progress=False)[0]
  c = build("synthetic", seed=1, progress=False)[0]
  for s in SPLITS:
    np.testing.assert_array_equal(a[s].x, b[s].x)
    np.testing.assert_array_equal(a[s].y, b[s].y)
  assert not np.array_equal(a["train"].y, c["train"].y)


def test_synthetic_group_0_is_the_minority_with_lower_preference(prepared):
  data = prepared("synthetic")
  train = data.train
  assert np.bincount(train.group).tolist() == [105, 420]
  means = [train.y[train.mask & (train.group == g)[:, None]].mean() for g in (0, 1)]
  assert means[1] - means[0] == pytest.approx(2.0, abs=0.25)  # 2 eta
  assert data.sensitive_column is None
  assert [f.side for f in data.fields] == ["item", "item", "user"]
  cohort = train.x[:, 0, 2]
  for g in (0, 1):  # the cohort field does not reveal the group
    shares = np.bincount(cohort[train.group == g], minlength=4) / np.sum(train.group == g)
    assert shares.max() < 0.4


def test_synthetic_reveal_group_adds_the_group_as_a_user_feature(prepared):
  data = prepared("synthetic", reveal_group=True, num_minority=30, num_majority=90)
  col = data.sensitive_column
  assert data.fields[-1].name == "group" and col == data.fields[-1].start
  sp = data.train
  np.testing.assert_array_equal(sp.x[sp.mask][:, col], np.repeat(sp.group, sp.length))


def test_synthetic_rejects_bad_options():
  with pytest.raises(DataError, match="etaa do not apply to synthetic"):
    build("synthetic", progress=False, etaa=1.0)
  with pytest.raises(DataError, match="min_ratings"):
    build("synthetic", progress=False, min_ratings=5)


# ----------------------------------------------------------------------------- custom CSV


def _write_custom(tmp_path: pathlib.Path, users=30, items=40, seed=0):
  rng = np.random.default_rng(seed)
  lines = ["user,item,rating,timestamp"]
  for u in range(users):
    for k, i in enumerate(rng.choice(items, 13 + u % 5, replace=False)):
      lines.append(f"u{u},m{i},{rng.integers(1, 6)},{1000 - k}")  # newest first in the file
  (tmp_path / "ratings.csv").write_text("\n".join(lines) + "\n")
  rows = ["user,gender,age,likes"]
  for u in range(users):
    rows.append(f"u{u},{'F' if u % 3 == 0 else 'M'},{20 + u},a|b" if u % 2 else
                f"u{u},{'F' if u % 3 == 0 else 'M'},{20 + u},c")
  (tmp_path / "users.csv").write_text("\n".join(rows) + "\n")
  item_rows = ["item,genre,year"] + [f"m{i},{'x|y|z' if i % 4 == 0 else 'y'},{1990 + i % 7}"
                                     for i in range(items)]
  (tmp_path / "items.csv").write_text("\n".join(item_rows) + "\n")
  return {"ratings": tmp_path / "ratings.csv", "users": tmp_path / "users.csv",
          "items": tmp_path / "items.csv", "sensitive": "gender"}


def test_custom_csv_round_trip(tmp_path):
  files = _write_custom(tmp_path)
  out = prepare("custom", tmp_path / "out", progress=False, **files)
  data = load_prepared(out)
  assert data.group_names == ["F", "M"] and data.sensitive_column is None
  layout = [(f.name, f.side, f.kind, f.width) for f in data.fields]
  assert layout == [("genre", "item", "multi", 3), ("year", "item", "categorical", 1),
                    ("age", "user", "categorical", 1), ("likes", "user", "multi", 2)]
  assert sum(c["users"] for c in data.meta["counts"].values()) == 30
  assert any("not all integers" in n for n in data.meta["notes"])
  # Timestamps count down in the file, so time order reverses each user's lines.
  ratings = np.genfromtxt(files["ratings"], delimiter=",", dtype=str, skip_header=1)
  sp = data.train
  first = ratings[ratings[:, 0] == ratings[0, 0]]
  i = int(np.flatnonzero(sp.user_id == 0)[0]) if 0 in sp.user_id else None
  if i is not None:
    np.testing.assert_array_equal(sp.y[i, :sp.length[i]], first[::-1, 2].astype(float))


def test_custom_sensitive_as_feature_equals_the_group(tmp_path):
  files = _write_custom(tmp_path)
  data = load_prepared(prepare("custom", tmp_path / "out", progress=False,
                               sensitive_as_feature=True, **files))
  col = data.sensitive_column
  assert col is not None
  for s in SPLITS:
    sp = data.split(s)
    np.testing.assert_array_equal(sp.x[sp.mask][:, col], np.repeat(sp.group, sp.length))


def test_custom_without_items_file_uses_the_item_id(tmp_path):
  files = _write_custom(tmp_path)
  del files["items"]
  data = load_prepared(prepare("custom", tmp_path / "out", progress=False, **files))
  assert [(f.name, f.side) for f in data.fields][0] == ("item", "item")


def _replace_line(path: pathlib.Path, number: int, text: str):
  lines = path.read_text().splitlines()
  lines[number - 1] = text
  path.write_text("\n".join(lines) + "\n")


CUSTOM_ERRORS = {
    "missing file": (lambda f: f["ratings"].unlink(), "input file not found"),
    "malformed line": (lambda f: _replace_line(f["ratings"], 5, "u0,m1,3,5,9"),
                       "ratings.csv:5: malformed line: expected 4 fields"),
    "non-numeric rating": (lambda f: _replace_line(f["ratings"], 3, "u0,m1,abc,5"),
                           "ratings.csv:3: non-numeric rating 'abc'"),
    "unknown sensitive column": (lambda f: f.update(sensitive="race"),
                                 "unknown sensitive column 'race'"),
    "single-valued sensitive column": (
        lambda f: f["users"].write_text(f["users"].read_text().replace(",F,", ",M,")),
        "single value 'M'"),
    "unknown user": (lambda f: _replace_line(f["ratings"], 2, "nobody,m1,3,5"),
                     "user 'nobody' has no line in users.csv"),
    "duplicate user": (lambda f: _replace_line(f["users"], 3, "u0,M,33,c"), "appears twice"),
    "bad timestamp": (lambda f: _replace_line(f["ratings"], 2, "u0,m1,3,yesterday"),
                      "timestamp 'yesterday'"),
}


@pytest.mark.parametrize("case", sorted(CUSTOM_ERRORS))
def test_custom_bad_input_gets_a_clear_error(tmp_path, case):
  files = _write_custom(tmp_path)
  corrupt, message = CUSTOM_ERRORS[case]
  corrupt(files)
  with pytest.raises(DataError, match=message):
    prepare("custom", tmp_path / "out", progress=False, **files)
  assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- bad state files


@pytest.fixture
def clover_copy(shared_data_dir, tmp_path) -> pathlib.Path:
  """A writable copy of ml-100k-clover (small) under tmp_path/data."""
  dest = tmp_path / "data" / "ml-100k-clover"
  shutil.copytree(shared_data_dir / "ml-100k-clover", dest)
  for p in dest.iterdir():
    p.chmod(0o644)
  return dest


def _edit_json(path: pathlib.Path, fn):
  obj = json.loads(path.read_text())
  fn(obj)
  path.write_text(json.dumps(obj))


def _first(obj):
  return next(iter(obj))


def _shorten(obj):
  obj[_first(obj)] = obj[_first(obj)][:5]


STATE_ERRORS = {
    "user with fewer than 11 interactions": (
        lambda d: (_edit_json(d / "user_cold_state_test.json", _shorten),
                   _edit_json(d / "user_cold_state_test_y.json", _shorten)),
        dict(min_interactions=5), "has 5 interactions; every task needs at least 11"),
    "feature outside the vocabulary": (
        lambda d: _edit_json(d / "user_profile.json", lambda o: o["0"].__setitem__(2, 25)),
        {}, "occupation 25 is outside the vocabulary 0..20"),
    "malformed json": (lambda d: (d / "user_warm_state.json").write_text('{"1": [1, 2,'), {},
                       "user_warm_state.json:1:.*malformed JSON"),
    "ratings do not match items": (
        lambda d: _edit_json(d / "user_warm_state_y.json", lambda o: o[_first(o)].pop()), {},
        "ratings but user_warm_state.json lists"),
    "non-numeric rating": (
        lambda d: _edit_json(d / "user_cold_state_valid_y.json",
                             lambda o: o[_first(o)].__setitem__(0, "five")), {},
        "non-numeric rating 'five'"),
    "missing file": (lambda d: (d / "user_cold_state_test_y.json").unlink(), {},
                     "user_cold_state_test_y.json .*To work offline, place"),
}


@pytest.mark.parametrize("case", sorted(STATE_ERRORS))
def test_clover_bad_input_gets_a_clear_error(clover_copy, tmp_path, case):
  corrupt, options, message = STATE_ERRORS[case]
  corrupt(clover_copy)
  with pytest.raises(DataError, match=message):
    prepare("ml100k", tmp_path / "out", data_dir=clover_copy.parent, progress=False, **options)
  assert not (tmp_path / "out").exists()


@pytest.fixture
def raw_copy(shared_data_dir, tmp_path) -> pathlib.Path:
  dest = tmp_path / "data" / "ml-100k"
  dest.mkdir(parents=True)
  for name in ("u.data", "u.item", "u.user"):
    shutil.copy(shared_data_dir / "ml-100k" / name, dest / name)
    (dest / name).chmod(0o644)
  return dest


@pytest.mark.parametrize("line,message", [
    ("196\t242\t3", "u.data:1: malformed line: expected 4 fields"),
    ("196\t242\tgood\t881250949", "u.data:1: non-numeric rating 'good'"),
])
def test_raw_bad_line_is_named_with_its_line_number(raw_copy, tmp_path, line, message):
  text = (raw_copy / "u.data").read_text().split("\n", 1)[1]
  (raw_copy / "u.data").write_text(line + "\n" + text)
  with pytest.raises(DataError, match=message):
    prepare("ml100k", tmp_path / "out", protocol="raw", data_dir=raw_copy.parent,
            progress=False)


def test_bookcrossing_has_no_raw_protocol():
  with pytest.raises(DataError, match="only the clover protocol"):
    build("bookcrossing", protocol="raw", progress=False)


# ----------------------------------------------------------------------------- cache and CLI


def test_ensure_prepared_reuses_the_cache_and_repairs_a_broken_entry(tmp_path):
  small = dict(num_minority=20, num_majority=60, num_items=40, min_ratings=12, max_ratings=20)
  path = ensure_prepared("synthetic", cache_dir=tmp_path, progress=False, **small)
  assert path.parent == tmp_path / "prepared" and path.name.startswith("synthetic-synthetic-12345-")
  stamp = (path / "train.npz").stat().st_mtime_ns
  assert ensure_prepared("synthetic", cache_dir=tmp_path, progress=False, **small) == path
  assert (path / "train.npz").stat().st_mtime_ns == stamp
  (path / "train.npz").write_bytes(b"broken")
  assert ensure_prepared("synthetic", cache_dir=tmp_path, progress=False, **small) == path
  load_prepared(path)
  other = ensure_prepared("synthetic", cache_dir=tmp_path, progress=False, seed=3, **small)
  assert other != path


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=PROJECT_ROOT,
                        capture_output=True, text=True, timeout=120, env=env)


def test_cli_prepares_a_folder(tmp_path):
  result = _cli("--dataset", "synthetic", "--num-minority", "20", "--num-majority", "60",
                "--out", str(tmp_path / "syn"), "--no-progress")
  assert result.returncode == 0, result.stderr
  assert str(tmp_path / "syn") in result.stdout
  assert load_prepared(tmp_path / "syn").meta["synthetic"]["num_minority"] == 20


@pytest.mark.parametrize("args,message", [
    (("--dataset", "custom", "--ratings", "nope.csv", "--users", "nope.csv", "--sensitive", "g"),
     "input file not found"),
    (("--dataset", "bookcrossing", "--protocol", "raw"), "only the clover protocol"),
    (("--dataset", "ml100k", "--eta", "2"), "--eta do(es) not apply"),
])
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, args, message):
  result = _cli(*args, "--out", str(tmp_path / "out"))
  assert result.returncode == 2
  assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
  assert message in result.stderr
  assert not (tmp_path / "out").exists()
