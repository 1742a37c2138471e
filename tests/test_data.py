"""Tests for mtjax.data: loading, sources, safe unpickling, tensorflow-datasets, class names,
normalization, batching."""

import gzip
import importlib.util
import os
import pickle
import pickletools
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mtjax import data, experiments, fetch
from mtjax.testing import py2_pickle, write_cifar100_python, write_idx

ROOT = Path(__file__).resolve().parents[1]
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
_REAL_LOAD_TFDS = data._load_tfds


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    """No env var, an empty download cache, no raw downloads (tests/test_fetch.py has them),
    and tfds never touched unless a test asks for `real_tfds`."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(fetch, "DEFAULT_CACHE_DIR", tmp_path / "download-cache")

    def no_tfds(*args, **kwargs):
        raise data._SourceUnavailable("disabled in tests")

    def no_download(name, folder):
        raise fetch.DownloadError("raw downloads disabled in tests")

    monkeypatch.setattr(data, "_load_tfds", no_tfds)
    monkeypatch.setattr(data, "_download_raw", no_download)


@pytest.fixture
def real_tfds(monkeypatch):
    """The real tensorflow-datasets path, with an empty cache before and after."""
    monkeypatch.setattr(data, "_load_tfds", _REAL_LOAD_TFDS)
    _REAL_LOAD_TFDS.cache_clear()
    yield pytest.importorskip("tensorflow_datasets")
    _REAL_LOAD_TFDS.cache_clear()


@pytest.fixture
def no_debian(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "absent")


# --------------------------------------------------------------------------- real Fashion-MNIST


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist():
    x, y = data.load("fashion_mnist", "train")
    xt, yt = data.load("fashion_mnist", "test")
    assert x.shape == (60000, 28, 28, 1) and xt.shape == (10000, 28, 28, 1)
    assert x.dtype == xt.dtype == np.uint8
    assert y.shape == (60000,) and yt.shape == (10000,)
    assert y.dtype == yt.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(y, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(yt, minlength=10), [1000] * 10)
    assert y[0] == 9 and yt[0] == 9  # both first images are ankle boots
    assert data.class_names("fashion_mnist")[y[0]] == "Ankle boot"
    # Pixel sums; train mean 72.94 / 255 = 0.2860, the published Fashion-MNIST mean.
    assert int(x.sum(dtype=np.int64)) == 3431114169
    assert int(xt.sum(dtype=np.int64)) == 573469082
    # Cached, read-only, and not re-writable by callers.
    x2, _ = data.load("fashion_mnist", "train")
    assert np.shares_memory(x, x2)
    for a in (x, y):
        assert not a.flags.writeable
        with pytest.raises(ValueError):
            a.flags.writeable = True


# --------------------------------------------------------------------------- tiny IDX files


def _tiny(n=7, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    return images, labels


def _write_split(folder, split="train", gz=True, n=7, seed=0):
    prefix = {"train": "train", "test": "t10k"}[split]
    ext = ".gz" if gz else ""
    images, labels = _tiny(n, seed)
    ip = write_idx(Path(folder) / f"{prefix}-images-idx3-ubyte{ext}", images)
    lp = write_idx(Path(folder) / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return images, labels, ip, lp


def _write_both(folder, gz=True, n=7, seed=0):
    """Both splits (test has n + 1 examples); returns {split: (images, labels, ip, lp)}."""
    return {
        "train": _write_split(folder, "train", gz, n, seed),
        "test": _write_split(folder, "test", gz, n + 1, seed + 100),
    }


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("sub", ["", "fashion-mnist"])
def test_idx_round_trip(tmp_path, gz, sub):
    parts = _write_both(tmp_path / sub, gz=gz)
    for split in ("train", "test"):
        images, labels, _, _ = parts[split]
        x, y = data.load("fashion_mnist", split, data_dir=tmp_path)
        np.testing.assert_array_equal(x[..., 0], images)
        np.testing.assert_array_equal(y, labels)
        assert x.shape == (len(images), 28, 28, 1) and y.dtype == np.int32


def test_env_var_source_and_reload_after_rewrite(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    _write_both(tmp_path, n=3, seed=1)
    assert len(data.load("fashion_mnist", "train")[0]) == 3
    images, _, _, _ = _write_split(tmp_path, "train", n=5, seed=2)
    x, _ = data.load("fashion_mnist", "train")
    np.testing.assert_array_equal(x[..., 0], images)


def test_write_idx_header(tmp_path):
    p = write_idx(tmp_path / "a-idx1-ubyte", np.arange(4, dtype=np.uint8))
    assert p.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 4, 0, 1, 2, 3])
    with pytest.raises(ValueError):
        write_idx(tmp_path / "b", np.array([256]))


def test_writers_are_not_in_the_data_api():
    for name in ("write_idx", "write_cifar100_python"):
        assert not hasattr(data, name) and name not in data.__all__


def _corrupt(kind, ip, lp):
    """Corrupt one file; return the path the error must name."""
    if kind == "magic":
        raw = bytearray(gzip.decompress(ip.read_bytes()))
        raw[3] = 4
        ip.write_bytes(gzip.compress(bytes(raw)))
        return ip
    if kind == "dims":
        write_idx(ip, np.zeros((7, 28, 27), np.uint8))
        return ip
    if kind == "truncated":
        raw = gzip.decompress(lp.read_bytes())
        lp.write_bytes(gzip.compress(raw[:-1]))
        return lp
    if kind == "extra":
        raw = gzip.decompress(ip.read_bytes())
        ip.write_bytes(gzip.compress(raw + b"\0"))
        return ip
    if kind == "truncated_gzip":
        raw = ip.read_bytes()
        ip.write_bytes(raw[: len(raw) // 2])
        return ip
    if kind == "not_gzip":
        lp.write_bytes(b"hello, not gzip")
        return lp
    if kind == "count":
        write_idx(lp, np.zeros(6, np.uint8))
        return lp
    if kind == "label":
        write_idx(lp, np.array([0, 1, 2, 3, 10, 5, 6], np.uint8))
        return lp
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["magic", "dims", "truncated", "extra", "truncated_gzip", "not_gzip", "count", "label"],
)
def test_idx_corruption_raises(tmp_path, kind):
    _, _, ip, lp = _write_both(tmp_path)["train"]
    bad = _corrupt(kind, ip, lp)
    # Real data at the Debian path must not hide the corruption.
    with pytest.raises(data.DataFormatError, match=bad.name) as info:
        data.load("fashion_mnist", "train", data_dir=tmp_path)
    assert isinstance(info.value, ValueError)


def test_uncompressed_truncated(tmp_path):
    _, _, ip, _ = _write_both(tmp_path, gz=False)["test"]
    ip.write_bytes(ip.read_bytes()[:100])
    with pytest.raises(data.DataFormatError, match="truncated"):
        data.load("fashion_mnist", "test", data_dir=tmp_path)


# --------------------------------------------------------------------------- sources


@pytest.fixture
def fake_debian(tmp_path, monkeypatch):
    """A complete tiny Debian copy, so that any fallback to it would show."""
    folder = tmp_path / "debian"
    _write_both(folder, n=2, seed=9)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", folder)
    return folder


def test_default_sources_listed(no_debian):
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load("fashion_mnist", "train")
    err = info.value
    assert isinstance(err, FileNotFoundError)
    assert [src.split(" ")[0] for src, _ in err.reasons] == [
        "data_dir",
        "Debian",
        "download",
        "tensorflow-datasets",
    ]
    msg = str(err)
    for needle in (
        "not set",
        "absent",
        "download-cache",
        "disabled in tests",
        "apt-get install dataset-fashion-mnist",
    ):
        assert needle in msg
    assert data.ENV_VAR in msg and "download=True" in msg and "--download" in msg


def test_default_order_debian_then_tfds(fake_debian, monkeypatch):
    calls = []

    def fake_tfds(name, split, data_dir, download):
        calls.append((name, split, data_dir, download))
        images, labels = _tiny(4)
        return images[..., None], labels.astype(np.int32), None

    monkeypatch.setattr(data, "_load_tfds", fake_tfds)
    assert len(data.load("fashion_mnist", "train")[0]) == 2 and calls == []  # Debian first
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", fake_debian.parent / "absent")
    assert len(data.load("fashion_mnist", "test")[0]) == 4
    assert len(data.load("cifar100", "test")[0]) == 4  # (fake data; cifar has no Debian copy)
    assert calls == [("fashion_mnist", "test", None, False), ("cifar100", "test", None, False)]
    data.load("fashion_mnist", "test", download=True)
    assert calls[-1] == ("fashion_mnist", "test", None, True)


def test_incomplete_debian_copy_is_skipped_for_both_splits(fake_debian, monkeypatch):
    (fake_debian / "t10k-labels-idx1-ubyte.gz").unlink()
    calls = []

    def fake_tfds(name, split, data_dir, download):
        calls.append(split)
        images, labels = _tiny(5)
        return images[..., None], labels.astype(np.int32), None

    monkeypatch.setattr(data, "_load_tfds", fake_tfds)
    for split in ("train", "test"):  # train must not come from Debian while test comes from tfds
        assert len(data.load("fashion_mnist", split)[0]) == 5
    assert calls == ["train", "test"]


@pytest.mark.parametrize("how", ["argument", "env"])
def test_missing_folder_is_an_error(tmp_path, fake_debian, monkeypatch, how):
    folder = tmp_path / "nonexistent"
    if how == "env":
        monkeypatch.setenv(data.ENV_VAR, str(folder))
    kwargs = {"data_dir": folder} if how == "argument" else {}
    with pytest.raises(data.DatasetNotFoundError, match=f"{folder} is not a folder") as info:
        data.load("fashion_mnist", "train", **kwargs)
    assert (data.ENV_VAR if how == "env" else "data_dir=") in str(info.value)


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar100"])
def test_empty_folder_is_an_error(tmp_path, fake_debian, name):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load(name, "train", data_dir=folder)
    msg = str(info.value)
    assert f"data_dir={str(folder)!r} does not hold it" in msg
    expected = "t10k-labels-idx1-ubyte" if name == "fashion_mnist" else "cifar-100-python"
    assert expected in msg and "disabled in tests" in msg and "--download" in msg


def test_folder_with_only_train_files_is_an_error(tmp_path, fake_debian):
    _write_split(tmp_path, "train")
    for split in ("train", "test"):
        with pytest.raises(data.DatasetNotFoundError, match="lacks") as info:
            data.load("fashion_mnist", split, data_dir=tmp_path)
        msg = str(info.value)
        for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            assert str(tmp_path / stem) in msg
        assert "train-images" not in msg.split("lacks")[1]


def test_cifar_folder_with_only_train_is_an_error(tmp_path):
    _cifar(tmp_path / "cifar-100-python")
    (tmp_path / "cifar-100-python" / "test").unlink()
    for split in ("train", "test"):
        with pytest.raises(data.DatasetNotFoundError) as info:
            data.load("cifar100", split, data_dir=tmp_path)
        assert f"lacks {tmp_path / 'cifar-100-python' / 'test'}" in str(info.value)


def test_load_arrays_does_not_download_by_default(tmp_path, monkeypatch):
    calls = []

    def fake_tfds(name, split, data_dir, download):
        calls.append(download)
        raise data._SourceUnavailable("fake")

    monkeypatch.setattr(data, "_load_tfds", fake_tfds)
    with pytest.raises(data.DatasetNotFoundError):
        experiments.load_arrays("cifar100")
    with pytest.raises(data.DatasetNotFoundError):
        experiments.load_arrays("cifar100", data_dir=tmp_path, download=True)
    assert calls == [False, True]


def test_argument_errors():
    with pytest.raises(ValueError, match="cifar100.*fashion_mnist"):
        data.load("mnist", "train")
    with pytest.raises(ValueError, match="split"):
        data.load("fashion_mnist", "validation")
    with pytest.raises(ValueError, match="label"):
        data.load("cifar100", "train", label="medium")
    with pytest.raises(ValueError, match="label"):
        data.load("fashion_mnist", "train", label="coarse")


# --------------------------------------------------------------------------- scripts/train.py


def _train_main():
    return runpy.run_path(str(ROOT / "scripts" / "train.py"))["main"]


def test_train_script_nonexistent_data_dir(tmp_path, fake_debian, capsys):
    folder = tmp_path / "nonexistent"
    out = str(tmp_path / "out")
    argv = ["--data-dir", str(folder), "--epochs", "1", "--no-progress", "--out", out]
    with pytest.raises(SystemExit):
        _train_main()(argv)
    assert f"{folder} is not a folder" in capsys.readouterr().err


def test_train_script_download_flag(tmp_path, monkeypatch):
    calls = []

    def fake_tfds(name, split, data_dir, download):
        calls.append((name, data_dir, download))
        raise data._SourceUnavailable("fake")

    monkeypatch.setattr(data, "_load_tfds", fake_tfds)
    main = _train_main()
    argv = ["--dataset", "cifar100", "--data-dir", str(tmp_path), "--no-progress"]
    for extra in ([], ["--download"]):
        with pytest.raises(SystemExit):
            main([*argv, "--out", str(tmp_path / "out"), "--overwrite", *extra])
    assert calls == [("cifar100", str(tmp_path), False), ("cifar100", str(tmp_path), True)]


def test_train_script_cifar_without_data_fails_fast(tmp_path):
    """The real tfds path, no mocks: no local data and no --download is a quick clear error."""
    env = {k: v for k, v in os.environ.items() if k != data.ENV_VAR}
    env["TFDS_DATA_DIR"] = str(tmp_path / "tfds")
    env["HOME"] = str(tmp_path / "home")  # an empty download cache
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "out"
    argv = ["--dataset", "cifar100", "--epochs", "1", "--no-progress", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *argv],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()
    assert "train.py: error: cannot load 'cifar100' split 'train'" in proc.stderr
    assert f"not prepared in {tmp_path / 'tfds'}" in proc.stderr
    assert "--download" in last[-1]
    assert not (out / "results.json").exists()


# --------------------------------------------------------------------------- tensorflow-datasets


@pytest.mark.parametrize("name,split", [("fashion_mnist", "train"), ("cifar100", "test")])
@pytest.mark.parametrize("where", ["default", "folder"])
def test_tfds_mock_data(real_tfds, no_debian, tmp_path, monkeypatch, name, split, where):
    """The real tfds code path (builder -> download_and_prepare -> array_record data source),
    with tfds' own mock generating the examples."""
    n = 60
    kwargs = {"data_dir": tmp_path} if where == "folder" else {}
    monkeypatch.setattr(data, "_tensorflow_available", lambda: True)  # tfds' mock prepares
    with real_tfds.testing.mock_data(num_examples=n):
        x, y = data.load(name, split, download=True, **kwargs)
        if name == "cifar100":
            _, yc = data.load(name, split, label="coarse", download=True, **kwargs)
    shape, n_classes = ((28, 28, 1), 10) if name == "fashion_mnist" else ((32, 32, 3), 100)
    assert x.shape == (n, *shape) and x.dtype == np.uint8
    assert y.shape == (n,) and y.dtype == np.int32
    assert y.min() >= 0 and y.max() < n_classes and len(np.unique(y)) > n_classes // 10
    assert x.std() > 10  # random pixels, not a blank array
    assert not x.flags.writeable and not y.flags.writeable
    if name == "cifar100":
        assert yc.shape == (n,) and yc.dtype == np.int32
        assert yc.min() >= 0 and yc.max() < 20 and len(np.unique(yc)) > 2
        assert not np.array_equal(yc, y)  # the coarse column, not the fine one


@pytest.mark.parametrize(
    "example,match",
    [
        ({"label": 100}, r"label\[1\] = 100 outside 0..99"),
        ({"coarse_label": -1}, r"coarse_label\[1\] = -1 outside 0..19"),
        ({"image": np.zeros((28, 28, 3), np.uint8)}, "same shape"),
        ({"image": np.zeros((32, 32, 1), np.uint8), "all": True}, r"images \(2, 32, 32, 1\)"),
        ({"image": np.zeros((32, 32, 3), np.float32), "all": True}, "float32"),
    ],
)
def test_tfds_bad_examples_are_a_format_error(real_tfds, example, match):
    good = {"image": np.zeros((32, 32, 3), np.uint8), "label": 3, "coarse_label": 1}

    bad = {k: v for k, v in example.items() if k != "all"}

    def as_data_source(self, split, **kwargs):  # a prepared dataset with bad examples
        return [{**good, **bad} if "all" in example else good, {**good, **bad}]

    with real_tfds.testing.mock_data(as_data_source_fn=as_data_source):
        with pytest.raises(data.DataFormatError, match=match) as info:
            data.load("cifar100", "test")
    assert "tfds:cifar100/test" in str(info.value)


def test_tfds_not_prepared_without_download(real_tfds, tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load("cifar100", "train", data_dir=tmp_path)
    msg = str(info.value)
    assert f"not prepared in {tmp_path / 'cifar100'}" in msg and "download=True" in msg
    assert "cifar-100-python" in msg


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow installed"
)
def test_tfds_prepare_without_tensorflow_says_so(real_tfds, tmp_path, monkeypatch):
    """Without TensorFlow tfds is not even asked to download (preparing would fail after
    it); the reason says so. Only the network is faked: tfds would get local IDX files."""
    raw = tmp_path / "raw"
    files = {f"{s}_{k}": write_idx(raw / f"{s}-{k}", np.zeros(3, np.uint8))
             for s in ("train", "test") for k in ("data", "labels")}  # fmt: skip
    downloads = []

    def fake_download_and_extract(self, urls):
        downloads.append(urls)
        return {k: str(files[k]) for k in urls}

    dm = real_tfds.download.DownloadManager
    monkeypatch.setattr(dm, "download_and_extract", fake_download_and_extract)
    folder = tmp_path / "data"
    folder.mkdir()
    with pytest.raises(data.DatasetNotFoundError, match="needs TensorFlow") as info:
        data.load("fashion_mnist", "train", data_dir=folder, download=True)
    assert "pip install tensorflow" in str(info.value)
    assert f"not prepared in {folder / 'fashion_mnist'}" in str(info.value)
    assert downloads == []


# --------------------------------------------------------------------------- CIFAR-100


def _cifar(folder, n_train=6, n_test=4):
    rng = np.random.default_rng(3)
    parts = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        fine = rng.integers(0, 100, n)
        coarse = rng.integers(0, 20, n)
        parts[split] = (images, fine, coarse)
    parts["train"][0][0] = [10, 20, 30]  # distinct R, G, B everywhere in image 0
    fine_names = [f"f{i}" for i in range(100)]
    coarse_names = [f"c{i}" for i in range(20)]
    write_cifar100_python(folder, fine_names=fine_names, coarse_names=coarse_names, **parts)
    return parts


@pytest.mark.parametrize("nested", [True, False])
def test_cifar_round_trip(tmp_path, nested):
    folder = tmp_path / "cifar-100-python" if nested else tmp_path / "mine"
    parts = _cifar(folder)
    data_dir = tmp_path if nested else folder
    for split in ("train", "test"):
        images, fine, coarse = parts[split]
        x, y = data.load("cifar100", split, data_dir=data_dir)
        _, yc = data.load("cifar100", split, data_dir=data_dir, label="coarse")
        assert x.shape == (len(images), 32, 32, 3) and x.dtype == np.uint8
        np.testing.assert_array_equal(x, images)
        np.testing.assert_array_equal(y, fine)
        np.testing.assert_array_equal(yc, coarse)
        assert y.dtype == yc.dtype == np.int32
    x, _ = data.load("cifar100", "train", data_dir=data_dir)
    assert (x[0, ..., 0] == 10).all() and (x[0, ..., 1] == 20).all() and (x[0, ..., 2] == 30).all()
    assert data.class_names("cifar100", data_dir=data_dir)[:2] == ["f0", "f1"]
    assert data.class_names("cifar100", data_dir=data_dir, label="coarse")[19] == "c19"


def test_cifar_file_format_matches_original(tmp_path):
    """The writer produces what Python 2's cPickle wrote for the originals: protocol 2, bytes
    keys, Python 2 ``str`` opcodes, and only NumPy 1's array globals."""
    _cifar(tmp_path)
    for filename in ("train", "test", "meta"):
        raw = (tmp_path / filename).read_bytes()
        assert raw[:2] == b"\x80\x02"  # pickle protocol 2
        ops = list(pickletools.genops(raw))
        globals_ = {arg for op, arg, _ in ops if "GLOBAL" in op.name}
        names = {op.name for op, _, _ in ops}
        assert names.isdisjoint({"BINUNICODE", "SHORT_BINUNICODE", "BINBYTES", "SHORT_BINBYTES"})
        if filename == "meta":
            assert not globals_
        else:
            assert globals_ == {
                "numpy.core.multiarray _reconstruct",
                "numpy ndarray",
                "numpy dtype",
            }
    obj = pickle.loads((tmp_path / "train").read_bytes(), encoding="bytes")  # a valid pickle
    keys = [b"filenames", b"batch_label", b"fine_labels", b"coarse_labels", b"data"]
    assert list(obj) == keys
    assert obj[b"batch_label"] == b"training batch 1 of 1" and obj[b"filenames"][0].endswith(
        b".png"
    )
    assert all(type(v) is int for v in obj[b"fine_labels"])
    assert obj[b"data"].shape == (6, 3072) and obj[b"data"].dtype == np.uint8
    # Row-major planes: 1024 red values, then green, then blue.
    assert set(obj[b"data"][0, :1024]) == {10} and set(obj[b"data"][0, 2048:]) == {30}
    meta = pickle.loads((tmp_path / "meta").read_bytes(), encoding="bytes")
    assert len(meta[b"fine_label_names"]) == 100 and len(meta[b"coarse_label_names"]) == 20
    assert meta[b"fine_label_names"][0] == b"f0"
    assert not list(tmp_path.glob("*.tmp"))


def test_py2_pickle_matches_pickle_semantics():
    obj = {b"k": [0, 255, 256, 65536, -1, 2**31 - 1], b"s": b"x" * 300, b"t": (1, 2, 3, 4)}
    obj |= {b"e": [], b"n": None, b"b": (True, False), b"a": np.arange(12, dtype=np.uint8)}
    got = pickle.loads(py2_pickle(obj), encoding="bytes")
    np.testing.assert_array_equal(got.pop(b"a"), obj.pop(b"a"))
    assert got == obj
    with pytest.raises(TypeError):
        py2_pickle({b"x": 1.5})


def test_cifar_python3_protocol2_pickle_loads(tmp_path):
    """A file re-pickled by Python 3 at protocol 2 (``_codecs.encode`` for bytes, NumPy 2's
    ``numpy._core``) still loads."""
    parts = _cifar(tmp_path)
    path = tmp_path / "train"
    obj = pickle.loads(path.read_bytes(), encoding="bytes")
    raw = pickle.dumps(obj, protocol=2)
    globals_ = {arg for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}
    assert {"_codecs encode", "numpy._core.multiarray _reconstruct"} <= globals_
    path.write_bytes(raw)
    x, y = data.load("cifar100", "train", data_dir=tmp_path)
    np.testing.assert_array_equal(x, parts["train"][0])
    np.testing.assert_array_equal(y, parts["train"][1])


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("filename", ["train", "test", "meta"])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_crafted_pickle_is_refused(tmp_path, filename, protocol):
    folder = tmp_path / "cifar-100-python"
    _cifar(folder)
    marker = tmp_path / "pwned"
    path = folder / filename
    payload = pickle.dumps({b"data": _Payload(marker), b"fine_label_names": []}, protocol)
    path.write_bytes(payload)
    system = f"{os.system.__module__}.system"
    with pytest.raises(data.DataFormatError) as info:
        if filename == "meta":
            data.class_names("cifar100", data_dir=tmp_path)
        else:
            data.load("cifar100", filename, data_dir=tmp_path)
    assert str(path) in str(info.value) and f"refused global '{system}'" in str(info.value)
    assert not marker.exists()
    # The payload is real: a plain pickle.load runs it.
    pickle.loads(payload, encoding="bytes")
    assert marker.exists()


def test_cifar_refuses_other_globals(tmp_path):
    _cifar(tmp_path)
    path = tmp_path / "train"
    path.write_bytes(pickle.dumps({b"data": {1, 2}}, protocol=2))  # builtins.set: not in CIFAR
    with pytest.raises(data.DataFormatError, match="refused global '__builtin__.set'"):
        data.load("cifar100", "train", data_dir=tmp_path)


def _rewrite_train(folder, edit):
    path = folder / "train"
    obj = pickle.loads(path.read_bytes(), encoding="bytes")
    edit(obj)
    path.write_bytes(pickle.dumps(obj, protocol=2))


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda o: o.pop(b"coarse_labels"), "missing keys"),
        (lambda o: o.__setitem__(b"data", o[b"data"][:, :3000]), "uint8 array"),
        (lambda o: o.__setitem__(b"data", [[0] * 3072]), "b'data' is list"),
        (lambda o: o.__setitem__(b"fine_labels", o[b"fine_labels"][:-1]), "fine_labels"),
        (lambda o: o[b"fine_labels"].__setitem__(2, 100), "fine_labels"),
        (lambda o: o[b"coarse_labels"].__setitem__(0, 20), "coarse_labels"),
    ],
)
def test_cifar_validation(tmp_path, edit, match):
    _cifar(tmp_path)
    _rewrite_train(tmp_path, edit)
    with pytest.raises(data.DataFormatError, match=match) as info:
        data.load("cifar100", "train", data_dir=tmp_path)
    assert str(tmp_path / "train") in str(info.value)


def test_cifar_unreadable_pickle(tmp_path):
    _cifar(tmp_path)
    (tmp_path / "test").write_bytes(b"\x80\x02garbage")
    with pytest.raises(data.DataFormatError, match="unpickle"):
        data.load("cifar100", "test", data_dir=tmp_path)


def test_cifar_class_names_missing_meta(tmp_path):
    _cifar(tmp_path)
    (tmp_path / "meta").unlink()
    with pytest.raises(data.DatasetNotFoundError, match="meta"):
        data.class_names("cifar100", data_dir=tmp_path)
    with pytest.raises(data.DatasetNotFoundError, match="not set"):
        data.class_names("cifar100")


# --------------------------------------------------------------------------- normalize, batches


def test_normalize():
    x = np.array([[[[0, 255, 51]]]], np.uint8)
    out = data.normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], [-1.0, 1.0, -0.6], atol=1e-6)
    out = data.normalize(x, mean=[0.0, 0.5, 0.2], std=[1.0, 0.5, 0.2])
    np.testing.assert_allclose(out[0, 0, 0], [0.0, 1.0, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="std"):
        data.normalize(x, std=0.0)


def _toy(n=10):
    return np.arange(n)[:, None] * np.ones((1, 2), np.uint8), np.arange(n, dtype=np.int32)


def test_batches_deterministic_per_epoch():
    x, y = _toy(10)

    def order(**kw):
        return np.concatenate([b[1] for b in data.batches(x, y, 3, **kw)])

    a = order(seed=1, epoch=0)
    np.testing.assert_array_equal(a, order(seed=1, epoch=0))
    assert not np.array_equal(a, order(seed=1, epoch=1))
    assert not np.array_equal(a, order(seed=2, epoch=0))
    assert len(a) == 9 and len(set(a.tolist())) == 9  # drop_last: 3 full batches
    np.testing.assert_array_equal(order(seed=1, epoch=0, shuffle=False), np.arange(9))


@pytest.mark.parametrize("n,bs", [(10, 3), (10, 5), (4, 7), (1, 1)])
def test_batches_pad_and_mask(n, bs):
    x, y = _toy(n)
    out = list(data.batches(x, y, bs, seed=0, epoch=3, drop_last=False))
    assert len(out) == data.num_batches(n, bs, drop_last=False) == -(-n // bs)
    for xb, yb, mask in out:
        assert xb.shape == (bs, 2) and yb.shape == (bs,) and mask.dtype == bool
        np.testing.assert_array_equal(xb[:, 0], yb)
    masks = np.concatenate([m for _, _, m in out])
    seen = np.concatenate([yb[m] for _, yb, m in out])
    np.testing.assert_array_equal(np.sort(seen), np.arange(n))  # each index exactly once
    assert masks.sum() == n and masks[:n].all() and not masks[n:].any()
    order = np.random.default_rng((0, 3)).permutation(n)
    pad = len(masks) - n
    np.testing.assert_array_equal(out[-1][1][bs - pad :], order[np.arange(pad) % n])


def test_batches_errors():
    x, y = _toy(4)
    with pytest.raises(ValueError, match="batch_size"):
        data.batches(x, y, 0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="labels"):
        data.batches(x, y[:3], 2, seed=0, epoch=0)
    with pytest.raises(ValueError, match="batch_size"):
        data.num_batches(4, 0)
    assert data.num_batches(10, 3) == 3 and data.num_batches(10, 3, drop_last=False) == 4
    assert data.num_batches(0, 3, drop_last=False) == 0
