"""Downloads against a local HTTP server on 127.0.0.1 serving the shared data folder."""

from __future__ import annotations

import functools
import hashlib
import http.server
import pathlib
import shutil
import socket
import threading
import time
import zipfile

import pytest

from data_prep import build, ensure_prepared, sources
from fast_jax.dataset import DataError


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


@pytest.fixture(scope="module")
def serve():
  """serve(folder) -> base URL of an HTTP server on 127.0.0.1 for that folder."""
  servers = []

  def start(folder: pathlib.Path) -> str:
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    servers.append(server)
    return f"http://127.0.0.1:{server.server_address[1]}"

  yield start
  for server in servers:
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def mirror(serve, shared_data_dir) -> str:
  return serve(shared_data_dir)


def test_mirror_download_verifies_checksums_and_prepares(mirror, tmp_path, monkeypatch):
  monkeypatch.setenv("FAST_JAX_DATA_URL", mirror)
  monkeypatch.setenv("FAST_JAX_OFFLINE", "0")
  path = ensure_prepared("ml100k", cache_dir=tmp_path, progress=False)
  raw = tmp_path / "raw" / "ml-100k-clover"
  for name, md5 in sources.FOLDERS["ml-100k-clover"].md5.items():
    assert hashlib.md5((raw / name).read_bytes()).hexdigest() == md5
  assert path == tmp_path / "prepared" / "ml100k-clover-12345"
  assert not list(raw.glob(".*part*"))


def test_mirror_takes_the_first_alternative_it_has(mirror, tmp_path):
  folder = sources.resolve("ml1m", "raw", cache_dir=tmp_path, download=True, mirror=mirror,
                           timeout=10)
  assert sorted(p.name for p in folder.iterdir()) == [
      "movies.dat", "ratings_without_timestamps.dat", "users.dat"]


def test_checksum_mismatch_is_an_error_and_saves_nothing(serve, shared_data_dir, tmp_path):
  tampered = tmp_path / "mirror" / "ml-100k-clover"
  shutil.copytree(shared_data_dir / "ml-100k-clover", tampered)
  (tampered / "user_profile.json").chmod(0o644)
  (tampered / "user_profile.json").write_text("{}")
  url = serve(tmp_path / "mirror")
  with pytest.raises(DataError, match="checksum mismatch for .*user_profile.json: expected md5 "
                                      "d63e481039a8459597d362e4879f9f31"):
    sources.resolve("ml100k", "clover", cache_dir=tmp_path / "cache", download=True, mirror=url,
                    timeout=10)
  target = tmp_path / "cache" / "raw" / "ml-100k-clover"
  assert not (target / "user_profile.json").exists()
  assert not list(target.glob(".*part*"))


def test_missing_remote_file_names_the_url_and_where_to_place_it(serve, shared_data_dir,
                                                                 tmp_path):
  partial = tmp_path / "mirror" / "bookcrossing-clover"
  shutil.copytree(shared_data_dir / "bookcrossing-clover", partial)
  (partial / "user_cold_state_test_y.json").unlink()
  url = serve(tmp_path / "mirror")
  with pytest.raises(DataError, match=r"user_cold_state_test_y.json not found \(HTTP 404\).*"
                                      "To work offline, place"):
    sources.resolve("bookcrossing", "clover", cache_dir=tmp_path / "cache", download=True,
                    mirror=url, timeout=10)


def test_unreachable_server_says_which_files_to_place_where(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  with pytest.raises(DataError, match=r"could not reach .*To work offline, place u.data, u.item, "
                                      r"u.user in .*ml-100k/"):
    sources.resolve("ml100k", "raw", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
                    download=True, mirror=f"http://127.0.0.1:{port}", timeout=5)


def test_offline_error_lists_the_files_and_their_home(tmp_path):
  with pytest.raises(DataError, match="downloads are off.*files.grouplens.org/datasets/movielens/"
                                      "ml-1m.zip"):
    build("ml1m", protocol="raw", data_dir=tmp_path, cache_dir=tmp_path / "cache", progress=False)


def test_download_timeout_is_bounded(tmp_path):
  with socket.socket() as silent:  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/u.data"
    start = time.monotonic()
    with pytest.raises(DataError, match="timed out"):
      sources.download_file(url, tmp_path / "u.data", timeout=0.5)
    assert time.monotonic() - start < 5
  assert not list(tmp_path.iterdir())


def test_zip_release_is_verified_and_extracted(serve, shared_data_dir, tmp_path, monkeypatch):
  """The GroupLens route: download the zip, check its md5, extract and check the members."""
  site = tmp_path / "site"
  site.mkdir()
  with zipfile.ZipFile(site / "ml-100k.zip", "w") as z:
    for name in ("u.data", "u.item", "u.user", "README"):
      z.write(shared_data_dir / "ml-100k" / name, f"ml-100k/{name}")
  url = serve(site)
  md5 = hashlib.md5((site / "ml-100k.zip").read_bytes()).hexdigest()
  folder = sources.FOLDERS["ml-100k"]
  local = sources.Folder(folder.name, folder.md5,
                         archive=sources.Archive(f"{url}/ml-100k.zip", md5, "ml-100k/"))
  monkeypatch.setitem(sources.FOLDERS, "ml-100k", local)
  got = sources.resolve("ml100k", "raw", cache_dir=tmp_path / "cache", download=True, timeout=10)
  assert sorted(p.name for p in got.iterdir()) == ["u.data", "u.item", "u.user"]
  assert (tmp_path / "cache" / "raw" / "downloads" / "ml-100k.zip").is_file()

  wrong = sources.Folder(folder.name, folder.md5,
                         archive=sources.Archive(f"{url}/ml-100k.zip", "0" * 32, "ml-100k/"))
  monkeypatch.setitem(sources.FOLDERS, "ml-100k", wrong)
  with pytest.raises(DataError, match="checksum mismatch for .*ml-100k.zip"):
    sources.resolve("ml100k", "raw", cache_dir=tmp_path / "cache2", download=True, timeout=10)


def test_a_zip_placed_in_the_data_dir_is_used_offline(shared_data_dir, tmp_path, monkeypatch):
  data = tmp_path / "data"
  data.mkdir()
  with zipfile.ZipFile(data / "ml-100k.zip", "w") as z:
    for name in ("u.data", "u.item", "u.user"):
      z.write(shared_data_dir / "ml-100k" / name, f"ml-100k/{name}")
  folder = sources.FOLDERS["ml-100k"]
  md5 = hashlib.md5((data / "ml-100k.zip").read_bytes()).hexdigest()
  monkeypatch.setitem(sources.FOLDERS, "ml-100k", sources.Folder(
      folder.name, folder.md5, archive=sources.Archive(folder.archive.url, md5, "ml-100k/")))
  got = sources.resolve("ml100k", "raw", data_dir=data, cache_dir=tmp_path / "cache",
                        download=False)
  assert got == tmp_path / "cache" / "raw" / "ml-100k"
