"""``--dataset synthetic``: the setting of the FAST paper's Theorem 1 (appendix A.1).

Two groups of users, G0 with ``num_minority`` (m0) users and G1 with ``num_majority`` (m1),
m0 < m1 by default. User u's preference is drawn from N(-eta, sigma^2) in G0 and
N(+eta, sigma^2) in G1, and each rating is

    r = base + preference_u + item_effect_i + noise,   noise ~ N(0, noise^2)

with item_effect_i = category effect + own effect (each N(0, item_std^2 / 2)). Ratings
are continuous floats (meta.json records the observed range). Items have an item-id
field and a category field; users have a ``cohort`` field drawn independently of the
group, so no input reveals the group unless ``reveal_group=True`` adds it as a user
feature. Each user rates ``min_ratings..max_ratings`` distinct items in random order.

A meta-learner trained on this data with one small inner step starts every user near
the training-weighted mean preference, which lies close to the majority's +eta: the
minority's query loss is larger (Theorem 1), and up-weighting G0 closes the gap.
Everything is deterministic given ``seed``; no files are needed.
"""

from __future__ import annotations

import math

import numpy as np

from fast_jax.dataset import MIN_LENGTH, SPLITS, DataError

from fast_jax.data_prep.common import (Tasks, check_splits_nonempty, column_of, filter_lengths, layout,
                              make_meta, pack_all, stratified_split)

DEFAULTS = {
    "num_minority": 150, "num_majority": 600, "eta": 1.0, "sigma": 0.5, "base": 3.0,
    "item_std": 0.5, "noise": 0.5, "num_items": 200, "num_categories": 5, "num_cohorts": 4,
    "min_ratings": 20, "max_ratings": 40, "reveal_group": False,
}


def prepare_synthetic(*, seed: int, min_interactions: int, max_interactions: int,
                      progress: bool = False, **options):
  unknown = sorted(set(options) - set(DEFAULTS))
  if unknown:
    raise DataError(f"unknown synthetic option(s) {', '.join(unknown)}; expected "
                    f"{', '.join(DEFAULTS)}")
  o = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
  _check(o)
  rng = np.random.default_rng(seed)
  m0, m1 = o["num_minority"], o["num_majority"]
  num_users, num_items = m0 + m1, o["num_items"]
  group = rng.permutation(np.r_[np.zeros(m0, np.int32), np.ones(m1, np.int32)])
  preference = np.where(group == 0, -o["eta"], o["eta"]) + o["sigma"] * rng.standard_normal(
      num_users)
  category = rng.integers(0, o["num_categories"], num_items)
  half_std = o["item_std"] / math.sqrt(2)
  item_effect = (half_std * rng.standard_normal(o["num_categories"])[category]
                 + half_std * rng.standard_normal(num_items))
  cohort = rng.integers(0, o["num_cohorts"], num_users)
  lengths = rng.integers(o["min_ratings"], o["max_ratings"] + 1, num_users)
  items = np.concatenate([rng.choice(num_items, n, replace=False) for n in lengths])
  owner = np.repeat(np.arange(num_users), lengths)
  rating = (o["base"] + preference[owner] + item_effect[items]
            + o["noise"] * rng.standard_normal(items.size)).astype(np.float32)
  tasks = Tasks(user_id=np.arange(num_users, dtype=np.int64),
                user_row=np.arange(num_users, dtype=np.int64), group=group,
                offsets=np.r_[0, np.cumsum(lengths)].astype(np.int64),
                item_row=items.astype(np.int64), rating=rating)
  tasks = filter_lengths(tasks, min_interactions, max_interactions, "synthetic data")

  item_table = np.stack([np.arange(num_items), category], axis=1).astype(np.int32)
  user_cols = [cohort] + ([group] if o["reveal_group"] else [])
  user_table = np.stack(user_cols, axis=1).astype(np.int32)
  fields = layout([("item", "item", "categorical", 1, num_items),
                   ("category", "item", "categorical", 1, o["num_categories"]),
                   ("cohort", "user", "categorical", 1, o["num_cohorts"])]
                  + ([("group", "user", "categorical", 1, 2)] if o["reveal_group"] else []))
  parts = stratified_split(tasks.group, seed)
  split_tasks = {s: tasks.subset(parts[s]) for s in SPLITS}
  check_splits_nonempty(split_tasks, "synthetic data")
  splits = pack_all(split_tasks, item_table, user_table, fields)
  lo, hi = float(tasks.rating.min()), float(tasks.rating.max())
  meta = make_meta(
      dataset="synthetic", protocol="synthetic", seed=seed, fields=fields,
      sensitive={"name": "group",
                 "column": column_of(fields, "group") if o["reveal_group"] else None,
                 "groups": ["G0 (preference -eta)", "G1 (preference +eta)"]},
      rating_min=math.floor(lo * 1000) / 1000, rating_max=math.ceil(hi * 1000) / 1000,
      splits=splits, order="random item order per user; the query is the last 10 valid rows",
      sources={}, notes=[
          "FAST Theorem 1 setting: rating = base + preference + item effect + noise, "
          "preference ~ N(-eta, sigma^2) in G0 and N(+eta, sigma^2) in G1; continuous ratings",
          "users split 7:1:2 by seed, stratified by group; the cohort field is independent of "
          "the group" + ("; the group is a user feature (reveal_group)" if o["reveal_group"]
                         else "; no input reveals the group")])
  meta["synthetic"] = {k: o[k] for k in DEFAULTS}  # the generator's parameters
  return splits, meta


def _check(o: dict) -> None:
  for k in ("num_minority", "num_majority", "num_items", "num_categories", "num_cohorts",
            "min_ratings", "max_ratings"):
    if not isinstance(o[k], (int, np.integer)) or isinstance(o[k], bool) or o[k] < 1:
      raise DataError(f"synthetic option {k} must be a positive integer, got {o[k]!r}")
  for k in ("eta", "sigma", "base", "item_std", "noise"):
    if not isinstance(o[k], (int, float)) or not math.isfinite(o[k]):
      raise DataError(f"synthetic option {k} must be a finite number, got {o[k]!r}")
  if o["sigma"] < 0 or o["item_std"] < 0 or o["noise"] < 0:
    raise DataError("synthetic options sigma, item_std and noise must be >= 0")
  if o["min_ratings"] < MIN_LENGTH or o["max_ratings"] < o["min_ratings"]:
    raise DataError(f"synthetic ratings per user {o['min_ratings']}..{o['max_ratings']} are "
                    f"invalid; expected {MIN_LENGTH} <= min_ratings <= max_ratings")
  if o["max_ratings"] > o["num_items"]:
    raise DataError(f"synthetic max_ratings {o['max_ratings']} exceeds num_items "
                    f"{o['num_items']} (users rate distinct items)")
  if min(o["num_minority"], o["num_majority"]) < 2:
    raise DataError("synthetic groups need at least 2 users each")
