"""Sources: resolution, downloads from a real HTTP server on loopback, S3 through moto."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cyclegan.data import sources
from cyclegan.data.prepare import prepare
from cyclegan.errors import DataError
from tests.test_data_prepare import SPLITS, cfg_for, make_layout, paths_in, tree_hashes

# ---------------------------------------------------------------------------------------------
# A real HTTP server on 127.0.0.1 that counts requests and honours Range (for resume)
# ---------------------------------------------------------------------------------------------


@dataclass
class FileServer:
    root: Path
    url: str
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def count(self, name: str) -> int:
        return sum(1 for path, _ in self.requests if path.endswith("/" + name))


def _handler(server_state: FileServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            server_state.requests.append((self.path, rng))
            path = server_state.root / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            start = 0
            if rng and rng.startswith("bytes="):
                start = int(rng[len("bytes=") :].split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:])

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

    return Handler


@pytest.fixture
def file_server(tmp_path) -> Iterator[FileServer]:
    root = tmp_path / "www"
    root.mkdir()
    state = FileServer(root=root, url="")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


def _publish_zip(tmp_path: Path, server: FileServer, name: str) -> tuple[int, str]:
    from tests.test_data_prepare import _layout_zip

    src = make_layout(tmp_path / f"src_{name}")
    archive = _layout_zip(server.root / f"{name}.zip", src, top=name)
    data = archive.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------


def test_resolve_kinds(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "horse2zebra").mkdir()
    (tmp_path / "x.tar.gz").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert sources.resolve("synthetic").kind == "synthetic"
    assert sources.resolve("horse2zebra").kind == "dataset"  # the name wins...
    assert sources.resolve("./horse2zebra").kind == "folder"  # ...unless written as a path
    assert sources.resolve("x.tar.gz").kind == "archive"
    assert sources.resolve("https://example.org/d.zip").kind == "url"
    assert sources.resolve("s3://bucket/prefix").kind == "s3"
    for bad, match in [
        ("nonexistent_dataset", "not a folder, an archive"),
        ("notes.txt", "not an archive"),
        ("ftp://host/x.zip", "unsupported scheme"),
        ("", "empty"),
    ]:
        with pytest.raises(DataError, match=match):
            sources.resolve(bad)


def test_known_dataset_table_covers_the_reference_list() -> None:
    names = {
        "apple2orange",
        "summer2winter_yosemite",
        "horse2zebra",
        "monet2photo",
        "cezanne2photo",
        "ukiyoe2photo",
        "vangogh2photo",
        "maps",
        "facades",
        "iphone2dslr_flower",
    }
    assert set(sources.KNOWN_DATASETS) == names
    assert sources.KNOWN_DATASETS["horse2zebra"][0] == 116_867_962  # published size
    for size, digest in sources.KNOWN_DATASETS.values():
        assert size > 0 and len(digest) == 64 and int(digest, 16) >= 0


# ---------------------------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------------------------


def test_known_dataset_is_downloaded_once_and_prepared(tmp_path, file_server, monkeypatch) -> None:
    size, digest = _publish_zip(tmp_path, file_server, "tiny2test")
    monkeypatch.setitem(sources.KNOWN_DATASETS, "tiny2test", (size, digest))
    monkeypatch.setenv(sources.DATASETS_URL_ENV, file_server.url)
    paths = paths_in(tmp_path / "work")
    manifest = prepare(cfg_for("tiny2test"), paths)
    assert manifest["counts"] == dict.fromkeys(SPLITS, 4)
    assert manifest["source"] == {
        "kind": "dataset",
        "spec": "tiny2test",
        "url": f"{file_server.url}/tiny2test.zip",
        "sha256": digest,
        "size": size,
    }
    assert (paths.raw / "downloads" / "tiny2test.zip").stat().st_size == size
    assert file_server.count("tiny2test.zip") == 1
    first = tree_hashes(paths.prepared)
    # Second run: the verified download and its extraction are reused, nothing is fetched.
    assert prepare(cfg_for("tiny2test"), paths) == manifest
    assert file_server.count("tiny2test.zip") == 1
    assert tree_hashes(paths.prepared) == first


def test_checksum_mismatch_fails_and_leaves_no_finished_file(
    tmp_path, file_server, monkeypatch
) -> None:
    size, _ = _publish_zip(tmp_path, file_server, "tiny2test")
    monkeypatch.setitem(sources.KNOWN_DATASETS, "tiny2test", (size, "0" * 64))
    monkeypatch.setenv(sources.DATASETS_URL_ENV, file_server.url)
    paths = paths_in(tmp_path / "work")
    with pytest.raises(DataError) as e:
        prepare(cfg_for("tiny2test"), paths)
    assert "checksum mismatch" in str(e.value) and "\n" not in str(e.value)
    downloads = paths.raw / "downloads"
    assert not list(downloads.iterdir())  # neither tiny2test.zip nor a .part
    assert not paths.prepared.exists()


def test_wrong_size_is_never_taken_as_finished(tmp_path, file_server, monkeypatch) -> None:
    size, digest = _publish_zip(tmp_path, file_server, "tiny2test")
    # The server has fewer bytes than the table says: a short, unfinished download.
    monkeypatch.setitem(sources.KNOWN_DATASETS, "tiny2test", (size + 100, digest))
    monkeypatch.setenv(sources.DATASETS_URL_ENV, file_server.url)
    paths = paths_in(tmp_path / "work")
    with pytest.raises(DataError, match="incomplete"):
        prepare(cfg_for("tiny2test"), paths)
    assert not (paths.raw / "downloads" / "tiny2test.zip").exists()


def test_partial_download_is_resumed(tmp_path, file_server, monkeypatch) -> None:
    size, digest = _publish_zip(tmp_path, file_server, "tiny2test")
    downloads = tmp_path / "work" / "data" / "raw" / "downloads"
    downloads.mkdir(parents=True)
    data = (file_server.root / "tiny2test.zip").read_bytes()
    (downloads / "tiny2test.zip.part").write_bytes(data[:1000])  # an interrupted download
    monkeypatch.setitem(sources.KNOWN_DATASETS, "tiny2test", (size, digest))
    monkeypatch.setenv(sources.DATASETS_URL_ENV, file_server.url)
    prepare(cfg_for("tiny2test"), paths_in(tmp_path / "work"))
    assert file_server.requests == [("/tiny2test.zip", "bytes=1000-")]
    assert (downloads / "tiny2test.zip").read_bytes() == data
    assert not (downloads / "tiny2test.zip.part").exists()


def test_url_source_checks_data_sha256(tmp_path, file_server) -> None:
    _, digest = _publish_zip(tmp_path, file_server, "web")
    url = f"{file_server.url}/web.zip"
    paths = paths_in(tmp_path / "work")
    with pytest.raises(DataError, match="checksum mismatch"):
        prepare(cfg_for(url, sha256="f" * 64), paths)
    manifest = prepare(cfg_for(url, sha256=digest), paths)
    assert manifest["source"]["sha256"] == digest
    assert manifest["counts"]["trainA"] == 4
    with pytest.raises(DataError, match="HTTP 404"):
        prepare(cfg_for(f"{file_server.url}/missing.zip"), paths)


# ---------------------------------------------------------------------------------------------
# S3 (moto's real S3 server on loopback)
# ---------------------------------------------------------------------------------------------


def _isolate_aws(monkeypatch, tmp_path: Path) -> None:
    """No credentials may leak in from the machine: env, files or instance metadata."""
    import os

    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.slow
def test_s3_prefix_is_mirrored_and_prepared(tmp_path, moto_s3, monkeypatch) -> None:
    _isolate_aws(monkeypatch, tmp_path)
    for k, v in moto_s3.env.items():
        monkeypatch.setenv(k, v)
    bucket = moto_s3.create_bucket("cyclegan-data-src")
    src = make_layout(tmp_path / "src")
    client = moto_s3.client()
    for f in sorted(src.rglob("*.png")):
        client.upload_file(str(f), bucket, f"datasets/tiny/{f.relative_to(src).as_posix()}")
    paths = paths_in(tmp_path / "work")
    uri = f"s3://{bucket}/datasets/tiny"
    manifest = prepare(cfg_for(uri), paths)
    assert manifest["counts"] == dict.fromkeys(SPLITS, 4)
    assert manifest["source"] == {"kind": "s3", "spec": uri, "uri": uri, "objects": 16}
    mirror = paths.raw / "s3" / bucket / "datasets" / "tiny"
    assert (mirror / "trainA" / "img_000.png").read_bytes() == (
        src / "trainA" / "img_000.png"
    ).read_bytes()
    # A second run fetches only what changed and mirrors deletions.
    keep = (mirror / "trainB" / "img_000.png").stat().st_mtime_ns
    client.delete_object(Bucket=bucket, Key="datasets/tiny/testB/img_003.png")
    manifest = prepare(cfg_for(uri), paths)
    assert manifest["counts"]["testB"] == 3
    assert not (mirror / "testB" / "img_003.png").exists()
    assert (mirror / "trainB" / "img_000.png").stat().st_mtime_ns == keep
    # A credential-free config: nothing secret lands in the manifest.
    text = (paths.prepared / "manifest.json").read_text()
    assert moto_s3.env["AWS_SECRET_ACCESS_KEY"] not in text


@pytest.mark.parametrize("uri", ["s3://", "s3://../x", "s3://bucket/a/../../../etc"])
def test_bad_s3_uris_are_refused(tmp_path, uri) -> None:
    with pytest.raises(DataError, match=r"bucket|escapes"):
        prepare(cfg_for(uri), paths_in(tmp_path / "work"))


def test_s3_without_credentials_is_one_clear_error(tmp_path, monkeypatch) -> None:
    _isolate_aws(monkeypatch, tmp_path)
    paths = paths_in(tmp_path / "work")
    with pytest.raises(DataError) as e:
        prepare(cfg_for("s3://some-bucket/data", s3_endpoint_url="http://127.0.0.1:9"), paths)
    msg = str(e.value)
    assert "no AWS credentials" in msg and "AWS_ACCESS_KEY_ID" in msg
    assert "AWS_SECRET_ACCESS_KEY" in msg and "\n" not in msg
    assert not paths.prepared.exists()


@pytest.mark.slow
def test_s3_missing_bucket_is_a_data_error(tmp_path, moto_s3, monkeypatch) -> None:
    _isolate_aws(monkeypatch, tmp_path)
    for k, v in moto_s3.env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(DataError, match="NoSuchBucket"):
        prepare(cfg_for("s3://no-such-bucket-here/x"), paths_in(tmp_path / "work"))
