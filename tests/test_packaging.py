"""A wheel of the project is the whole product: the ``fast-jax`` command and
``python -m fast_jax`` work from an empty folder with nothing of the checkout around.

The wheel is built from a copy of the project's files (``pip wheel --no-build-isolation``,
offline), installed without dependencies into a fresh venv that also sees this
interpreter's packages (so JAX is not installed again), and run from an empty folder, so
that only the wheel's files can be imported.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _sh(*cmd, cwd, timeout=300):
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
  proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                        timeout=timeout, env=env)
  assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout}\n{proc.stderr}"
  return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  """A wheel built from a copy of the project (the checkout is never written to)."""
  src = tmp_path_factory.mktemp("src")
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  for name in ("fast_jax", "data_prep"):  # data_prep, the checkout alias, must stay out
    shutil.copytree(ROOT / name, src / name, ignore=ignore)
  dist = tmp_path_factory.mktemp("dist")
  _sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
      "-w", dist, src, cwd=dist)
  (path,) = dist.glob("fast_jax-*.whl")
  return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> pathlib.Path:
  """The bin folder of a venv with the wheel installed."""
  env_dir = tmp_path_factory.mktemp("venv")
  venv.create(env_dir, system_site_packages=True, with_pip=True)
  bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
  # This interpreter's packages (JAX, ...) after the venv's own, also when it is itself a
  # venv, whose packages --system-site-packages would not reach. A .pth line adds a path
  # only: an editable install of fast_jax found there is not activated.
  where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
  site = _sh(bin_dir / "python", "-c", where, cwd=env_dir).strip()
  ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
  (pathlib.Path(site) / "_parent_env.pth").write_text("\n".join(ours) + "\n")
  _sh(bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index",
      "--ignore-installed", wheel, cwd=env_dir)
  return bin_dir


def test_wheel_holds_the_package_with_its_commands_and_no_top_level_data_prep(wheel):
  names = zipfile.ZipFile(wheel).namelist()
  assert not [n for n in names if n.startswith("data_prep/")]
  assert not [n for n in names if n.startswith(("experiments/", "tests/", "results/"))]
  for sub in ("cli", "data_prep"):
    here = {p.relative_to(ROOT).as_posix() for p in (ROOT / "fast_jax" / sub).glob("*.py")}
    assert here and here <= set(names), sorted(here - set(names))
  entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
  assert "fast-jax = fast_jax.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_command_trains_from_an_empty_folder(installed, tmp_path):
  work = tmp_path / "empty"
  work.mkdir()
  where = _sh(installed / "python", "-c", "import fast_jax; print(fast_jax.__file__)", cwd=work)
  assert pathlib.Path(where.strip()).is_relative_to(installed.parent), where  # not the checkout

  out = _sh(installed / "python", "-m", "fast_jax", "--help", cwd=work)
  assert "run" in out and "prep" in out and "table2" in out
  assert "--dataset" in _sh(installed / "fast-jax", "prep", "--help", cwd=work)
  assert "--datasets" in _sh(installed / "fast-jax", "table2", "--help", cwd=work)

  _sh(installed / "fast-jax", "run", "--dataset", "synthetic", "--epochs", "2", "--seeds", "1",
      "--out", "r", cwd=work)
  results = json.loads((work / "r" / "results.json").read_text())
  assert len(results["per_seed"]) == 1 and results["mean"]["mae"] > 0
  assert (work / "r" / "config.json").exists() and (work / "r" / "metrics.jsonl").exists()
