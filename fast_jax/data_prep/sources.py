"""Where the raw inputs live: local folders, the user cache, and their public homes.

Each input folder has the name it has in the shared data folder (``ml-100k``, ``ml-1m``,
``ml-100k-clover``, ``ml-1m-clover``, ``bookcrossing-clover``). :func:`resolve` looks for
the files a route needs in ``<data_dir>/<folder>/`` (or ``<data_dir>`` itself when it is
named ``<folder>``; ``data_dir`` defaults to ``$FAST_JAX_DATA_DIR``), then
``<cache>/raw/<folder>/``; when they are missing it downloads them into the cache and
verifies the checksums stored here (a failed download leaves no empty folder behind).
Downloads come from

* a mirror laid out like the shared data folder (``<mirror>/<folder>/<file>``), when the
  ``FAST_JAX_DATA_URL`` environment variable (or ``mirror=``) names one; otherwise
* the public homes: the GroupLens zips for MovieLens and the raw files of the public
  CLOVER repository (pinned commit) for the processed MeLU/CLOVER states.

Set ``FAST_JAX_OFFLINE=1`` to never download; the error then says which files to place
where.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile

import tqdm

from fast_jax.dataset import DataError

from fast_jax.data_prep.common import md5_file

DEFAULT_TIMEOUT = 30.0
GROUPLENS = "https://files.grouplens.org/datasets/movielens/"
CLOVER_COMMIT = "5f9ffa2f80d2609410b08d77d6acc8d1c0f6992a"
CLOVER_RAW = f"https://raw.githubusercontent.com/weitianxin/CLOVER/{CLOVER_COMMIT}/"


class MissingRemoteFile(DataError):
  """HTTP 404: the server does not have the file."""


@dataclasses.dataclass(frozen=True)
class Archive:
  """A zip holding a folder's files under ``prefix``."""
  url: str
  md5: str
  prefix: str

  @property
  def filename(self) -> str:
    return self.url.rsplit("/", 1)[-1]


@dataclasses.dataclass(frozen=True)
class Folder:
  """One input folder: the md5 of every known file, and where it is published."""
  name: str
  md5: dict
  base_url: str | None = None      # files are published one by one under this URL
  archive: Archive | None = None   # or inside this zip

  @property
  def home(self) -> str:
    return self.archive.url if self.archive else self.base_url


_CLOVER_STATES = ("user_cold_state_valid.json", "user_cold_state_valid_y.json",
                  "user_cold_state_test.json", "user_cold_state_test_y.json")

FOLDERS = {
    "ml-100k": Folder(
        "ml-100k",
        md5={"README": "91c17d554a8224595419825fb0cb2edd",
             "u.data": "6e47046882bad158b0efbb84cd5cb987",
             "u.genre": "a7578bdb37758741ae9429d2c736af18",
             "u.info": "6cae0afd8c0341aff31b631a192e57e6",
             "u.item": "c9e7f390115d79079537301d5204f3f7",
             "u.occupation": "035abaa2165f35cebce4b91e03481e0a",
             "u.user": "1b53539edc13caad0282c8500608a319"},
        archive=Archive(GROUPLENS + "ml-100k.zip", "0e33842e24a9c977be4e0107933c0723",
                        "ml-100k/")),
    "ml-1m": Folder(
        "ml-1m",
        # ratings.dat (with timestamps) is only checked through the GroupLens zip's md5.
        md5={"README": "6a3f626147ec67b732a69beccae0aaa8",
             "movies.dat": "ef9fd9ff8d1b33faf73e2122c371e910",
             "users.dat": "681c0711d0d4548cd3d4718a49c2dcd8",
             "ratings_without_timestamps.dat": "94ccc7129066e1e80d0959da0ea644ae"},
        archive=Archive(GROUPLENS + "ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906", "ml-1m/")),
    "ml-100k-clover": Folder(
        "ml-100k-clover",
        md5={"book_profile.json": "ceefbb771c94b169f5c8032460adcb22",
             "user_cold_state_test.json": "6cef7070751b5e9f0ea588342e88b729",
             "user_cold_state_test_y.json": "060e2e7666d29691ec668eb7c19be715",
             "user_cold_state_valid.json": "40111b4c0a501e1bfb6d4a1198657fcd",
             "user_cold_state_valid_y.json": "0a8b54cd9e95a40a35558bea4686ebc2",
             "user_profile.json": "d63e481039a8459597d362e4879f9f31",
             "user_warm_state.json": "40f63d969c95a9085c94eb11b005ef7c",
             "user_warm_state_y.json": "55d149e8956c8e157a66379e638fe8e8"},
        base_url=CLOVER_RAW + "ML100K/ml100k/"),
    "bookcrossing-clover": Folder(
        "bookcrossing-clover",
        md5={"book_profile.json": "2eb80434bf74ad6c212fe96bcd57bbee",
             "user_cold_state_test.json": "15fc4748cd1121372fc412373fff8155",
             "user_cold_state_test_y.json": "a1eda07f76e5e86cd0ccae35f46d93e4",
             "user_cold_state_valid.json": "76a0a1d78e07215643f37ae824da7d5e",
             "user_cold_state_valid_y.json": "36483db5f8c388d8c209a5f97f57494d",
             "user_profile.json": "dbfe7065caa537e5ddfd570f2dba2d0f",
             "user_warm_state.json": "c24a0d6f0fc513f1377287fa1286f1a2",
             "user_warm_state_y.json": "637b8f6e0206b77aa09c665325b19839"},
        base_url=CLOVER_RAW + "BX/bx/"),
    "ml-1m-clover": Folder(
        "ml-1m-clover",
        md5={"m_actor.txt": "c077e3f09aede8bffd586b1cbeb0ba2f",
             "m_age.txt": "b243375459bf17c658a8aedfa0197bd6",
             "m_director.txt": "003a6051ce54eb21fe090440a5c05760",
             "m_gender.txt": "81a701329b84ba96ddb5efc73fdfae9b",
             "m_genre.txt": "9533a1208d6a035287bb218572c0ed51",
             "m_occupation.txt": "74437cf5bf0caab73a2fedf7ade51e67",
             "m_rate.txt": "8eb27a1400a3e26f8d00e869b6414608",
             "m_zipcode.txt": "35f17969edf0601c4e5d58856140f9a3",
             "movies_extrainfos.dat": "7d3a0eea105a000f0a714366966c6de9",
             "users.dat": "681c0711d0d4548cd3d4718a49c2dcd8",
             "user_cold_state_test.json": "c31420d1416fa68e96fb16e001fa9cb9",
             "user_cold_state_test_y.json": "4c77c5d0484e908bc5a28eb70d73562e",
             "user_cold_state_valid.json": "4456e7469878192eb2b2082123cfa2e7",
             "user_cold_state_valid_y.json": "8e2f90ff8a7bc4983910c0481848b3ad",
             "warm_state.json": "c07a93919dd91afc4e9c6cdaf4bef037",
             "warm_state_y.json": "e34eed8376869fef82c9e0d0d97055fd"},
        base_url=CLOVER_RAW + "ML1M/movielens/ml-1m/"),
}

# The files each route reads; a tuple lists alternatives, the first preferred.
NEEDS = {
    ("ml100k", "clover"): ("ml-100k-clover", (
        ("user_profile.json",), ("book_profile.json",), ("user_warm_state.json",),
        ("user_warm_state_y.json",), *((f,) for f in _CLOVER_STATES))),
    ("bookcrossing", "clover"): ("bookcrossing-clover", (
        ("user_profile.json",), ("book_profile.json",), ("user_warm_state.json",),
        ("user_warm_state_y.json",), *((f,) for f in _CLOVER_STATES))),
    ("ml1m", "clover"): ("ml-1m-clover", (
        ("users.dat",), ("movies_extrainfos.dat",), ("warm_state.json",), ("warm_state_y.json",),
        *((f,) for f in _CLOVER_STATES),
        *((f"m_{v}.txt",) for v in ("rate", "genre", "director", "actor", "gender", "age",
                                     "occupation", "zipcode")))),
    ("ml100k", "raw"): ("ml-100k", (("u.data",), ("u.item",), ("u.user",))),
    ("ml1m", "raw"): ("ml-1m", (("users.dat",), ("movies.dat",),
                                ("ratings.dat", "ratings_without_timestamps.dat"))),
}


def cache_root(cache_dir=None) -> pathlib.Path:
  """``cache_dir``, else $FAST_JAX_CACHE, else ~/.cache/fast_jax."""
  root = cache_dir or os.environ.get("FAST_JAX_CACHE") or pathlib.Path.home() / ".cache/fast_jax"
  return pathlib.Path(root).expanduser()


def check_data_dir(data_dir=None, cache_dir=None) -> None:
  """A ``data_dir`` given (else $FAST_JAX_DATA_DIR) must be a folder: a mistyped path
  would otherwise pass unnoticed, the data coming from the cache or a download instead."""
  variable = os.environ.get("FAST_JAX_DATA_DIR") or None
  name = "--data-dir" if data_dir and str(data_dir) != variable else "$FAST_JAX_DATA_DIR"
  data_dir = data_dir or variable
  if data_dir is not None and not pathlib.Path(data_dir).expanduser().is_dir():
    raise DataError(f"{name} {data_dir}: no such folder (it should hold the raw data's "
                    f"folders, e.g. ml-100k-clover/; "
                    f"{'leave it out' if name == '--data-dir' else 'unset it'} to use the cache "
                    f"{cache_root(cache_dir)})")


def resolve(dataset: str, protocol: str, *, data_dir=None, cache_dir=None,
            download: bool | None = None, mirror: str | None = None,
            timeout: float = DEFAULT_TIMEOUT, progress: bool = False) -> pathlib.Path:
  """The folder holding every file the (dataset, protocol) route reads.

  Downloads missing files into ``<cache>/raw/<folder>/`` unless ``download`` is False
  (default: True unless $FAST_JAX_OFFLINE is set).
  """
  folder_name, needs = NEEDS[(dataset, protocol)]
  folder = FOLDERS[folder_name]
  root = cache_root(cache_dir)
  raw = root / "raw"
  target = raw / folder_name
  data_dir = data_dir or os.environ.get("FAST_JAX_DATA_DIR") or None
  candidates = []
  if data_dir is not None:
    data_dir = pathlib.Path(data_dir).expanduser()
    candidates += [data_dir / folder_name] + ([data_dir] if data_dir.name == folder_name else [])
  candidates.append(target)
  for c in candidates:
    if not _missing(c, needs):
      return c
  if folder.archive:
    for place in ([data_dir] if data_dir is not None else []) + [raw / "downloads"]:
      if (place / folder.archive.filename).is_file():
        _extract(place / folder.archive.filename, folder, needs, target)
        return target
  if download is None:
    download = os.environ.get("FAST_JAX_OFFLINE", "") in ("", "0")
  mirror = mirror or os.environ.get("FAST_JAX_DATA_URL") or None
  if not download:
    partial = next((c for c in candidates if c.is_dir() and len(_missing(c, needs)) < len(needs)),
                   None)
    what = (f"{', '.join(' or '.join(a) for a in _missing(partial, needs))} missing from "
            f"{partial}" if partial else "files are missing")
    raise DataError(f"{folder_name}: {what} and downloads are off (FAST_JAX_OFFLINE). "
                    + _placement_hint(folder, needs, data_dir, target))
  created = [d for d in (root, raw, raw / "downloads", target) if not d.exists()]
  try:
    fetch(folder, needs, target, mirror=mirror, timeout=timeout, progress=progress)
  except BaseException as e:
    for d in reversed(created):  # leave no empty folder behind
      if d.is_dir() and not any(d.iterdir()):
        d.rmdir()
    if isinstance(e, DataError):
      raise DataError(f"{e}. " + _placement_hint(folder, needs, data_dir, target)) from None
    raise
  return target


def fetch(folder: Folder, needs, target: pathlib.Path, *, mirror: str | None = None,
          timeout: float = DEFAULT_TIMEOUT, progress: bool = False) -> None:
  """Download the missing ``needs`` of ``folder`` into ``target``, verifying md5s."""
  target.mkdir(parents=True, exist_ok=True)
  missing = _missing(target, needs)
  if mirror:
    base = mirror.rstrip("/") + f"/{folder.name}/"
    for alternatives in missing:
      _fetch_first(base, alternatives, folder, target, timeout, progress)
  elif folder.archive:
    zip_path = target.parent / "downloads" / folder.archive.filename
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    download_file(folder.archive.url, zip_path, md5=folder.archive.md5, timeout=timeout,
                  progress=progress)
    _extract(zip_path, folder, needs, target)
  else:
    for alternatives in missing:
      name = alternatives[0]
      download_file(folder.base_url + name, target / name, md5=folder.md5.get(name),
                    timeout=timeout, progress=progress)
  still = _missing(target, needs)
  if still:
    raise DataError(f"could not obtain {', '.join(' or '.join(a) for a in still)} for "
                    f"{folder.name}")


def _fetch_first(base: str, alternatives, folder: Folder, target: pathlib.Path,
                 timeout: float, progress: bool) -> None:
  """Fetch the first alternative the mirror has; only files with a known md5 are taken."""
  verifiable = [n for n in alternatives if n in folder.md5]
  for i, name in enumerate(verifiable):
    try:
      download_file(base + name, target / name, md5=folder.md5[name], timeout=timeout,
                    progress=progress)
      return
    except MissingRemoteFile:
      if i == len(verifiable) - 1:
        raise


def download_file(url: str, dest: pathlib.Path, *, md5: str | None = None,
                  timeout: float = DEFAULT_TIMEOUT, progress: bool = False) -> pathlib.Path:
  """Stream ``url`` into ``dest`` atomically, checking ``md5``.

  Raises MissingRemoteFile (a DataError) for HTTP 404, DataError for any other failure
  (unreachable host, timeout, checksum mismatch). Nothing is left at ``dest`` on error.
  """
  dest = pathlib.Path(dest)
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.part-", dir=dest.parent)
  h = hashlib.md5()
  try:
    with os.fdopen(fd, "wb") as out:
      try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
          total = int(response.headers.get("Content-Length") or 0) or None
          with tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False,
                         disable=not progress, file=sys.stderr) as bar:
            for block in iter(lambda: response.read(1 << 16), b""):
              out.write(block)
              h.update(block)
              bar.update(len(block))
      except urllib.error.HTTPError as e:
        if e.code == 404:
          raise MissingRemoteFile(f"{url} not found (HTTP 404)") from None
        raise DataError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
      except urllib.error.URLError as e:
        raise DataError(f"could not reach {url}: {e.reason}") from None
      except (TimeoutError, OSError) as e:
        raise DataError(f"download of {url} failed: {e or type(e).__name__}") from None
    if md5 is not None and h.hexdigest() != md5:
      raise DataError(f"checksum mismatch for {url}: expected md5 {md5}, got {h.hexdigest()}; "
                      "the file was not saved")
    os.replace(tmp, dest)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return dest


def _missing(place: pathlib.Path, needs) -> list[tuple[str, ...]]:
  return [alts for alts in needs if not any((place / n).is_file() for n in alts)]


def _extract(zip_path: pathlib.Path, folder: Folder, needs, target: pathlib.Path) -> None:
  """Verify a folder's zip and extract the needed members (checking known md5s)."""
  if md5_file(zip_path) != folder.archive.md5:
    raise DataError(f"checksum mismatch for {zip_path}: expected md5 {folder.archive.md5} "
                    f"(the {folder.archive.url} release); delete it and retry")
  target.mkdir(parents=True, exist_ok=True)
  try:
    with zipfile.ZipFile(zip_path) as z:
      members = set(z.namelist())
      for alternatives in needs:
        name = next((n for n in alternatives if folder.archive.prefix + n in members), None)
        if name is None:
          raise DataError(f"{zip_path} has none of {list(alternatives)} under "
                          f"{folder.archive.prefix}")
        data = z.read(folder.archive.prefix + name)
        if name in folder.md5 and hashlib.md5(data).hexdigest() != folder.md5[name]:
          raise DataError(f"checksum mismatch for {name} in {zip_path}: expected md5 "
                          f"{folder.md5[name]}")
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.part-", dir=target)
        with os.fdopen(fd, "wb") as out:
          out.write(data)
        os.replace(tmp, target / name)
  except zipfile.BadZipFile:
    raise DataError(f"{zip_path} is not a valid zip file; delete it and retry") from None


def _placement_hint(folder: Folder, needs, data_dir, target: pathlib.Path) -> str:
  names = ", ".join(" or ".join(alts) for alts in needs)
  where = (f"{pathlib.Path(data_dir) / folder.name}/ (under --data-dir / $FAST_JAX_DATA_DIR "
           f"{data_dir}) or {target}/" if data_dir else
           f"DIR/{folder.name}/ and pass --data-dir DIR (or set FAST_JAX_DATA_DIR=DIR), or "
           f"in {target}/")
  source = (f"unzip {folder.archive.url} (or put {folder.archive.filename} in "
            f"{data_dir or target.parent / 'downloads'})" if folder.archive
            else f"download them from {folder.base_url}")
  return f"To work offline, place {names} in {where} ({source})"


def checksums(place: pathlib.Path, names, folder_name: str) -> tuple[dict, list[str]]:
  """meta.json ``sources`` for the files read, and notes for files unlike the reference."""
  known = FOLDERS[folder_name].md5
  sources, notes = {}, []
  for name in names:
    digest = md5_file(place / name)
    sources[f"{folder_name}/{name}"] = digest
    if name in known and known[name] != digest:
      notes.append(f"{folder_name}/{name} differs from the reference copy (md5 {known[name]})")
  return sources, notes
