"""Presets: where the meta-learners' unset settings come from, and that the code preset
still reproduces the committed run.sh-regime results."""

import json
import pathlib

import numpy as np
import pytest

from fast_jax import config as config_lib
from fast_jax.config import Config, resolve
from fast_jax.experiment import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = ("lr", "inner_lr", "inner_steps", "out_bias")
# (backbone, dataset) pairs the presets are checked on: the swept ones and a fallback.
PAIRS = [("melu", "ml100k"), ("metacs", "ml100k"), ("metacs", "bookcrossing"),
         ("melu", "bookcrossing"), ("metacs", "ml1m"), ("melu", "ml1m"),
         ("melu", "synthetic")]


@pytest.mark.parametrize("backbone, dataset", PAIRS)
def test_the_validated_preset_fills_the_table_and_the_code_preset_runsh(backbone, dataset):
  validated = resolve(Config(backbone=backbone, dataset=dataset, method="origin"))
  table = config_lib.VALIDATED.get((backbone, dataset),
                                   config_lib.VALIDATED[(backbone, "ml100k")])
  assert {k: getattr(validated, k) for k in SETTINGS} == table
  code = resolve(Config(backbone=backbone, dataset=dataset, method="origin", preset="code"))
  assert (code.lr, code.inner_lr) == config_lib.LEARNING_RATES[backbone]
  assert code.inner_steps == 1
  assert code.out_bias == ("mean" if backbone == "metacs" else "init")
  explicit = resolve(Config(backbone=backbone, dataset=dataset, inner_lr=0.5, inner_steps=2))
  assert (explicit.inner_lr, explicit.inner_steps) == (0.5, 2)  # flags win


# Each swept entry of the two tables: (method, (backbone, dataset)).
SWEPT = [("origin", key) for key in config_lib.VALIDATED_SOURCE] + \
        [("clover", key) for key in config_lib.VALIDATED_CLOVER_SOURCE]
TABLES = {"origin": (config_lib.VALIDATED, config_lib.VALIDATED_SOURCE),
          "clover": (config_lib.VALIDATED_CLOVER, config_lib.VALIDATED_CLOVER_SOURCE)}


@pytest.mark.parametrize("method, key", SWEPT)
def test_every_swept_entry_is_the_winner_its_sweep_file_records(method, key):
  import pandas as pd
  table, sources = TABLES[method]
  source = ROOT / sources[key]
  best = pd.read_csv(source.with_name(source.stem + "_best.csv"))
  if "method" not in best:  # written before CLOVER sweeps existed: Origin's
    best["method"] = "origin"
  [row] = best[(best.backbone == key[0]) & (best.dataset == key[1]) &
               (best.method == method)].to_dict("records")
  assert {k: row[k] for k in SETTINGS} == pytest.approx(table[key])


def test_clover_takes_its_own_entry_where_it_has_one_and_origins_elsewhere(monkeypatch):
  own = dict(lr=1e-4, inner_lr=0.5, out_bias="mean", inner_steps=2)
  monkeypatch.setitem(config_lib.VALIDATED_CLOVER, ("melu", "bookcrossing"), own)
  settings = lambda **kw: {k: getattr(resolve(Config(**kw)), k) for k in SETTINGS}
  assert settings(backbone="melu", dataset="bookcrossing", method="clover") == own
  origin = settings(backbone="melu", dataset="bookcrossing", method="origin")
  assert origin == config_lib.VALIDATED[("melu", "bookcrossing")] != own
  assert settings(backbone="melu", dataset="ml1m", method="clover") == \
      config_lib.VALIDATED[("melu", "ml1m")]
  code = resolve(Config(backbone="melu", dataset="bookcrossing", method="clover", preset="code"))
  assert (code.lr, code.inner_lr, code.inner_steps) == (1e-4, 1e-4, 1)


def test_an_older_run_without_a_preset_reads_as_the_code_preset():
  record = json.loads((ROOT / "results" / "runs_code" / "ml100k" / "melu-origin" /
                       "config.json").read_text())
  assert "preset" not in record
  assert config_lib.from_record(record).preset == "code"


@pytest.mark.optimized
def test_the_code_preset_reproduces_a_committed_per_seed_result(prepared, tmp_path):
  """MeLU Origin on ML-100K, seed 1024, 50 epochs, --preset code and nothing else: the
  committed run.sh-regime result (results/runs_code), to float32 accumulation noise (its
  one inner step now runs in kernel form, which sums in another order: 1.2e-6 in MAE and
  5.1e-6 in MSE against the committed run)."""
  committed = json.loads((ROOT / "results" / "runs_code" / "ml100k" / "melu-origin" /
                          "results.json").read_text())["per_seed"][0]
  assert committed["seed"] == 1024
  results = train_and_evaluate(
      Config(dataset="ml100k", method="origin", preset="code", seeds=1, attack=False),
      tmp_path, data=prepared("ml100k"), progress=False, echo=lambda s: None)
  ours = results["per_seed"][0]
  for key in ("mae", "mse", "gf_mae", "gf_mse", "ndcg3"):
    np.testing.assert_allclose(ours[key], committed[key], atol=2e-5, err_msg=key)
  assert json.loads((tmp_path / "config.json").read_text())["preset"] == "code"
