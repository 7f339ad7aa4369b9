"""The prepared-data schema: round trip, atomic writes, and one clear error per bad folder."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from data_prep import build
from fast_jax import dataset
from fast_jax.dataset import DataError, TaskSplit, load_prepared, save_prepared

SMALL = dict(num_minority=20, num_majority=60, num_items=40, min_ratings=12, max_ratings=20)


@pytest.fixture(scope="module")
def small():
  """(splits, meta) of a small synthetic dataset."""
  return build("synthetic", progress=False, **SMALL)


@pytest.fixture
def folder(small, tmp_path) -> pathlib.Path:
  splits, meta = small
  return save_prepared(tmp_path / "data", splits, meta)


def test_round_trip_keeps_arrays_dtypes_and_meta(small, folder):
  splits, meta = small
  data = load_prepared(folder)
  for name in dataset.SPLITS:
    for key, dtype in dataset.ARRAYS.items():
      got = getattr(data.split(name), key)
      assert got.dtype == dtype
      np.testing.assert_array_equal(got, getattr(splits[name], key))
  assert data.meta["fields"] == meta["fields"]
  assert data.meta["counts"]["train"]["users"] == splits["train"].num_users
  assert data.meta["max_len"] == splits["train"].max_len
  assert data.num_groups == 2 and data.path == folder.absolute()
  assert [f.name for f in data.fields] == ["item", "category", "cohort"]


def test_task_split_mask_marks_valid_rows(folder):
  train = load_prepared(folder).train
  assert train.mask.sum() == train.num_ratings
  np.testing.assert_array_equal(train.mask.sum(1), train.length)


def test_save_replaces_a_prepared_folder_and_leaves_no_temporaries(small, folder):
  splits, meta = small
  save_prepared(folder, splits, {**meta, "notes": ["second write"]})
  assert load_prepared(folder).meta["notes"] == ["second write"]
  assert sorted(p.name for p in folder.parent.iterdir()) == ["data"]


def test_failed_save_leaves_the_old_folder_intact(small, folder, monkeypatch):
  splits, meta = small
  before = (folder / "meta.json").read_text()
  calls = []

  def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise OSError("disk full")
    return real(*args, **kwargs)

  real = np.savez_compressed
  monkeypatch.setattr(np, "savez_compressed", failing)
  with pytest.raises(OSError, match="disk full"):
    save_prepared(folder, splits, {**meta, "notes": ["never written"]})
  assert (folder / "meta.json").read_text() == before
  assert sorted(p.name for p in folder.parent.iterdir()) == ["data"]
  load_prepared(folder)


def test_save_refuses_to_replace_a_folder_that_is_not_prepared_data(small, tmp_path):
  splits, meta = small
  (tmp_path / "home").mkdir()
  (tmp_path / "home" / "precious.txt").write_text("keep me")
  with pytest.raises(DataError, match="not a prepared data folder"):
    save_prepared(tmp_path / "home", splits, meta)
  assert (tmp_path / "home" / "precious.txt").read_text() == "keep me"


def test_save_rejects_inconsistent_arrays(small, tmp_path):
  splits, meta = small
  bad = dict(splits)
  t = splits["test"]
  bad["test"] = TaskSplit(x=t.x, y=t.y, length=t.length, group=t.group,
                          user_id=np.r_[splits["train"].user_id[:1], t.user_id[1:]])
  with pytest.raises(DataError, match="also appears"):
    save_prepared(tmp_path / "out", bad, meta)
  assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- bad folders


def _edit(folder: pathlib.Path, split: str | None = None, meta=None, fix_counts=True, **change):
  """Rewrite one split's arrays (``change`` maps name -> fn(arrays) -> array or None to drop)."""
  meta_obj = json.loads((folder / "meta.json").read_text())
  if split is not None:
    with np.load(folder / f"{split}.npz") as npz:
      arrays = {k: npz[k].copy() for k in npz.files}
    for key, fn in change.items():
      value = fn(arrays)
      if value is None:
        del arrays[key]
      else:
        arrays[key] = value
    np.savez(folder / f"{split}.npz", **arrays)
    if fix_counts and "group" in arrays and "length" in arrays:
      meta_obj["counts"][split] = {
          "users": int(arrays["length"].size), "ratings": int(arrays["length"].sum()),
          "groups": np.bincount(arrays["group"].clip(0), minlength=2).tolist()}
  if meta is not None:
    meta(meta_obj)
  (folder / "meta.json").write_text(json.dumps(meta_obj))


def _set(a, index, value):
  a = a.copy()
  a[index] = value
  return a


def _shorten_first_user(arrays):
  """Make user 0 five rows long, padded after them (synthetic data pads with 0)."""
  arrays["x"][0, 5:] = 0
  arrays["y"][0, 5:] = 0
  return _set(arrays["length"], 0, 5)


BAD_FOLDERS = {
    "missing meta.json": (lambda f: (f / "meta.json").unlink(), "meta.json is missing"),
    "meta.json not JSON": (lambda f: (f / "meta.json").write_text("{oops"), "not valid JSON"),
    "missing split file": (lambda f: (f / "test.npz").unlink(), "test.npz is missing"),
    "truncated npz": (lambda f: (f / "valid.npz").write_bytes(
        (f / "valid.npz").read_bytes()[:300]), "truncated or unreadable"),
    "missing array": (lambda f: _edit(f, "train", group=lambda a: None),
                      "array 'group' is missing"),
    "wrong dtype": (lambda f: _edit(f, "train", x=lambda a: a["x"].astype(np.int64)),
                    "dtype int64, expected int32"),
    "wrong shape": (lambda f: _edit(f, "train", y=lambda a: a["y"][:, :-1]),
                    "y has shape"),
    "format version": (lambda f: _edit(f, meta=lambda m: m.update(format_version=7)),
                       "format_version"),
    "column count": (lambda f: _edit(f, meta=lambda m: m.update(num_columns=9)),
                     "num_columns"),
    "counts": (lambda f: _edit(f, meta=lambda m: m["counts"]["valid"].update(users=1)),
               "counts"),
    "index outside vocabulary": (lambda f: _edit(f, "test", x=lambda a: _set(a["x"], (0, 0, 0),
                                                                           40)),
                                 "field 'item' has index 40 outside its vocabulary 0..39"),
    "group outside range": (lambda f: _edit(f, "valid", group=lambda a: _set(a["group"], 0, 5),
                                            fix_counts=False),
                            "has group 5, expected 0..1"),
    "one group in train": (lambda f: _edit(f, "train", group=lambda a: np.zeros_like(a["group"])),
                           "at least 2 groups"),
    "user shorter than 11": (lambda f: _edit(f, "train", length=_shorten_first_user),
                             "has length 5"),
    "padding not padded": (lambda f: _edit(f, "train", y=lambda a: _set(
        a["y"], (int(np.argmin(a["length"])), -1), 3.0)), "padding rows"),
    "users in two splits": (lambda f: _edit(f, "test", user_id=lambda a: _set(
        a["user_id"], 0, np.load(f / "train.npz")["user_id"][0])), "also appears"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_load_prepared_explains_each_bad_folder(folder, case):
  corrupt, message = BAD_FOLDERS[case]
  corrupt(folder)
  with pytest.raises(DataError, match=message):
    load_prepared(folder)


def test_load_prepared_names_a_missing_folder(tmp_path):
  with pytest.raises(DataError, match="prepared data folder not found"):
    load_prepared(tmp_path / "nowhere")


def test_padding_row_uses_the_pad_index_of_multi_fields():
  fields = [{"name": "a", "side": "item", "kind": "categorical", "start": 0, "stop": 1,
             "vocab_size": 3, "pad_index": None},
            {"name": "g", "side": "item", "kind": "multi", "start": 1, "stop": 4,
             "vocab_size": 7, "pad_index": 7}]
  np.testing.assert_array_equal(dataset.padding_row(fields, 5), [0, 7, 7, 7, 0])
