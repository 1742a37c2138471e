"""mtjax.fetch: raw dataset downloads without TensorFlow, against a loopback HTTP server that
serves synthetic files in the real formats; the published checksums against the Debian copy."""

import gzip
import hashlib
import http.server
import io
import re
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from mtjax import data, fetch
from mtjax.testing import write_cifar100_python, write_idx

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_NAMES = [f"{p}-{k}-idx{d}-ubyte.gz" for p in ("train", "t10k")
                 for k, d in (("images", 3), ("labels", 1))]  # fmt: skip


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    """No env var, no Debian copy, a fresh download cache, no tfds, short timeouts."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "absent")
    monkeypatch.setattr(fetch, "DEFAULT_CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(fetch, "TIMEOUT_S", 5.0)

    def no_tfds(*args, **kwargs):
        raise data._SourceUnavailable("disabled in tests")

    monkeypatch.setattr(data, "_load_tfds", no_tfds)


class Server:
    """HTTP server on 127.0.0.1 in a thread. Serves ``files`` {url path: bytes}; a path in
    ``truncate`` is announced with its full Content-Length but only half is sent."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in outer.truncate else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"


@pytest.fixture
def server():
    s = Server()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()
    s.thread.join(timeout=5)
    assert not s.thread.is_alive()


def _raw_file(path, body, urls, **overrides):
    fields = dict(
        md5=hashlib.md5(body).hexdigest(), sha256=hashlib.sha256(body).hexdigest(),
        size=len(body),
    )  # fmt: skip
    return fetch.RawFile(path, tuple(urls), **(fields | overrides))


def _fashion_files(tmp_path):
    """{file name: gz bytes} of a tiny Fashion-MNIST and {split: (images, labels)}."""
    rng = np.random.default_rng(0)
    arrays, files = {}, {}
    for split, prefix, n in (("train", "train", 6), ("test", "t10k", 4)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        arrays[split] = (images, labels)
        for kind, arr, d in (("images", images, 3), ("labels", labels, 1)):
            name = f"{prefix}-{kind}-idx{d}-ubyte.gz"
            files[name] = write_idx(tmp_path / "src" / name, arr).read_bytes()
    return files, arrays


def _serve_fashion(server, tmp_path, monkeypatch, **overrides):
    """Fashion-MNIST on the server (the first mirror of every file is a 404)."""
    files, arrays = _fashion_files(tmp_path)
    entries = []
    for name, body in files.items():
        server.files[f"/fm/{name}"] = body
        urls = [server.url(f"/gone/{name}"), server.url(f"/fm/{name}")]
        entries.append(_raw_file(f"fashion-mnist/{name}", body, urls, **overrides))
    monkeypatch.setattr(fetch, "SOURCES", {**fetch.SOURCES, "fashion_mnist": tuple(entries)})
    return arrays


def _cifar_tar(tmp_path, extra=None):
    """A cifar-100-python.tar.gz of synthetic files; ``extra(tar)`` may add members."""
    rng = np.random.default_rng(1)
    parts = {}
    for split, n in (("train", 5), ("test", 3)):
        parts[split] = (
            rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 100, n), rng.integers(0, 20, n),
        )  # fmt: skip
    folder = write_cifar100_python(tmp_path / "src" / "cifar-100-python", **parts)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")
        if extra is not None:
            extra(tar)
    return buf.getvalue(), parts


def _serve_cifar(server, tmp_path, monkeypatch, extra=None):
    body, parts = _cifar_tar(tmp_path, extra)
    server.files["/kriz/cifar-100-python.tar.gz"] = body
    entry = _raw_file(
        "cifar-100-python.tar.gz", body, [server.url("/kriz/cifar-100-python.tar.gz")],
        extract="cifar-100-python",
    )  # fmt: skip
    monkeypatch.setattr(fetch, "SOURCES", {**fetch.SOURCES, "cifar100": (entry,)})
    return parts


def _all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------- success


def test_load_downloads_fashion_mnist_into_the_cache(server, tmp_path, monkeypatch):
    arrays = _serve_fashion(server, tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    with pytest.raises(data.DatasetNotFoundError, match="download cache"):
        data.load("fashion_mnist", "train")  # opt-in: nothing fetched without download=True
    assert server.requests == []
    x, y = data.load("fashion_mnist", "train", download=True)
    np.testing.assert_array_equal(x[..., 0], arrays["train"][0])
    np.testing.assert_array_equal(y, arrays["train"][1])
    files = [f"fashion-mnist/{n}" for n in sorted(FASHION_NAMES)]
    assert _all_files(cache) == ["fashion-mnist", *files]  # no temporary files left
    # every file: the 404 mirror first, then the working one
    assert server.requests == [p for n in FASHION_NAMES for p in (f"/gone/{n}", f"/fm/{n}")]
    xt, yt = data.load("fashion_mnist", "test")  # now found locally, without download
    np.testing.assert_array_equal(yt, arrays["test"][1])
    assert len(server.requests) == 8
    fetch.download_raw("fashion_mnist", cache)  # verified files are kept, not fetched again
    assert len(server.requests) == 8


def test_load_downloads_cifar100_into_data_dir(server, tmp_path, monkeypatch):
    parts = _serve_cifar(server, tmp_path, monkeypatch)
    folder = tmp_path / "mine"
    folder.mkdir()
    x, y = data.load("cifar100", "test", data_dir=folder, download=True)
    np.testing.assert_array_equal(x, parts["test"][0])
    np.testing.assert_array_equal(y, parts["test"][1])
    _, yc = data.load("cifar100", "train", data_dir=folder, label="coarse")
    np.testing.assert_array_equal(yc, parts["train"][2])
    # the archive is deleted after extraction; no temporary folder is left
    assert _all_files(folder) == [f"cifar-100-python{s}" for s in ("", "/meta", "/test", "/train")]
    assert data.class_names("cifar100", data_dir=folder)[:2] == ["fine_00", "fine_01"]
    assert not (tmp_path / "cache").exists()


def test_cifar100_default_cache_and_class_names(server, tmp_path, monkeypatch):
    parts = _serve_cifar(server, tmp_path, monkeypatch)
    x, _ = data.load("cifar100", "train", download=True)
    np.testing.assert_array_equal(x, parts["train"][0])
    assert (tmp_path / "cache" / "cifar-100-python" / "meta").is_file()
    assert data.class_names("cifar100", label="coarse")[19] == "coarse_19"


def test_progress_bar(server, tmp_path, monkeypatch, capsys):
    _serve_fashion(server, tmp_path, monkeypatch)
    fetch.download_raw("fashion_mnist", tmp_path / "dl", progress=True)
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz" in err and "B/s" in err
    fetch.download_raw("fashion_mnist", tmp_path / "dl2", progress=False)
    assert capsys.readouterr().err == ""


def test_order_local_then_raw_download_then_tfds(server, tmp_path, monkeypatch):
    calls = []

    def fake_tfds(name, split, data_dir, download):
        calls.append((name, split, data_dir, download))
        raise data._SourceUnavailable("fake tfds")

    monkeypatch.setattr(data, "_load_tfds", fake_tfds)
    entry = fetch.RawFile("fashion-mnist/x.gz", (server.url("/nothing"),), "0" * 32)
    monkeypatch.setattr(fetch, "SOURCES", {**fetch.SOURCES, "fashion_mnist": (entry,)})
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load("fashion_mnist", "train", download=True)
    assert [src.split(" (")[0] for src, _ in info.value.reasons] == [
        "data_dir / $MTJAX_DATA_DIR",
        "Debian package dataset-fashion-mnist",
        "download cache",
        "download cache",
        "tensorflow-datasets",
    ]
    assert "raw download" in info.value.reasons[3][0]
    assert server.url("/nothing") in str(info.value) and "404" in str(info.value)
    assert calls == [("fashion_mnist", "train", None, True)]  # tfds only after the raw download
    _serve_fashion(server, tmp_path, monkeypatch)
    data.load("fashion_mnist", "train", download=True)
    assert len(calls) == 1  # raw download worked: tfds not asked


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("field", ["md5", "sha256", "size"])
def test_checksum_mismatch_rejects_the_file(server, tmp_path, monkeypatch, field):
    wrong = {"md5": "0" * 32, "sha256": "f" * 64, "size": 12345}[field]
    _serve_fashion(server, tmp_path, monkeypatch, **{field: wrong})
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load("fashion_mnist", "train", download=True)
    msg = str(info.value)
    url = server.url("/fm/train-images-idx3-ubyte.gz")
    what = {"md5": "MD5", "sha256": "SHA-256", "size": "published size"}[field]
    assert f"{url}: " in msg and what in msg and str(wrong) in msg
    assert _all_files(tmp_path / "cache") == ["fashion-mnist"]  # rejected, removed, no .part
    with pytest.raises(fetch.DownloadError, match=re.escape(url)):
        fetch.download_raw("fashion_mnist", tmp_path / "direct")


def test_truncated_download_is_rejected(server, tmp_path, monkeypatch):
    _serve_fashion(server, tmp_path, monkeypatch, size=None)  # the length check, not the size
    path = "/fm/t10k-images-idx3-ubyte.gz"
    server.truncate.add(path)
    server.files.pop("/gone/t10k-images-idx3-ubyte.gz", None)
    n = len(server.files[path])
    with pytest.raises(fetch.DownloadError) as info:
        fetch.download_raw("fashion_mnist", tmp_path / "dl")
    assert f"{server.url(path)}: truncated download: {n // 2} of {n} bytes" in str(info.value)
    assert _all_files(tmp_path / "dl") == ["fashion-mnist"]  # nothing kept, not even the others


def test_network_failure_names_the_url(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cifar-100-python.tar.gz"
    entry = fetch.RawFile("cifar-100-python.tar.gz", (url,), "0" * 32, extract="cifar-100-python")
    monkeypatch.setattr(fetch, "SOURCES", {**fetch.SOURCES, "cifar100": (entry,)})
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load("cifar100", "train", download=True)
    assert f"{url}: URLError" in str(info.value) and "refused" in str(info.value)
    assert _all_files(tmp_path / "cache") == []
    with pytest.raises(ValueError, match="mnist"):
        fetch.download_raw("mnist", tmp_path)


def _add(tar, name, *, kind="file", target=""):
    info = tarfile.TarInfo(name)
    body = b"owned"
    if kind == "file":
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
        return
    info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
    info.linkname = target
    tar.addfile(info)


@pytest.mark.parametrize(
    "kind,member",
    [
        ("dotdot", "cifar-100-python/../../evil"),
        ("absolute", "/tmp/mtjax-evil"),
        ("outside", "evil"),
        ("symlink", "cifar-100-python/link"),
        ("hardlink", "cifar-100-python/hard"),
    ],
)
def test_unsafe_tar_member_is_refused(server, tmp_path, monkeypatch, kind, member):
    def extra(tar):
        if kind in ("symlink", "hardlink"):
            _add(tar, member, kind=kind, target="/etc/passwd")
        else:
            _add(tar, member)

    _serve_cifar(server, tmp_path, monkeypatch, extra)  # the checksums match: only the check
    folder = tmp_path / "mine"
    folder.mkdir()
    with pytest.raises(fetch.DownloadError) as info:
        fetch.download_raw("cifar100", folder)
    msg = str(info.value)
    assert f"unsafe archive member {member!r}" in msg and "nothing was extracted" in msg
    assert _all_files(folder) == []  # archive deleted, no temporary or extracted files
    assert not list(tmp_path.rglob("evil")) and not Path("/tmp/mtjax-evil").exists()
    with pytest.raises(data.DatasetNotFoundError, match="unsafe archive member"):
        data.load("cifar100", "train", data_dir=folder, download=True)


# --------------------------------------------------------------------------- the real table


def test_sources_table():
    for name, entries in fetch.SOURCES.items():
        assert name in data.DATASETS
        for e in entries:
            assert re.fullmatch(r"[0-9a-f]{32}", e.md5), e
            assert e.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", e.sha256), e
            assert e.urls and all(u.startswith(("http://", "https://")) for u in e.urls), e
    assert [Path(e.path).name for e in fetch.SOURCES["fashion_mnist"]] == FASHION_NAMES
    (cifar,) = fetch.SOURCES["cifar100"]
    assert cifar.urls == ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",)
    assert cifar.md5 == "eb9058c3a382ffc7106e4002c42a8d85" and cifar.extract == "cifar-100-python"


#: gzip header fields of the published files that the Debian package normalized away
#: (strip-nondeterminism: the FNAME field removed, MTIME set to the package build time).
ORIGINAL_MTIMES = {
    "train-images-idx3-ubyte.gz": 1504176606,
    "train-labels-idx1-ubyte.gz": 1504176606,
    "t10k-images-idx3-ubyte.gz": 1504176627,
    "t10k-labels-idx1-ubyte.gz": 1504176627,
}


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_published_fashion_mnist_checksums_match_the_debian_copy():
    """The Debian files differ from the published ones only in the gzip header: with the
    original name and mtime put back, they have the published MD5, SHA-256 and size."""
    for e in fetch.SOURCES["fashion_mnist"]:
        name = Path(e.path).name
        deb = (DEBIAN / name).read_bytes()
        assert deb[:4] == b"\x1f\x8b\x08\x00"  # deflate, no FNAME
        mtime = ORIGINAL_MTIMES[name].to_bytes(4, "little")
        original = b"\x1f\x8b\x08\x08" + mtime + deb[8:10] + name[:-3].encode() + b"\0" + deb[10:]
        assert gzip.decompress(original) == gzip.decompress(deb)
        assert hashlib.md5(original).hexdigest() == e.md5, name
        assert hashlib.sha256(original).hexdigest() == e.sha256, name
        assert len(original) == e.size, name
