"""Tests for mtjax.data: loading, validation, class names, normalization, batching."""

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest

from mtjax import data

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
    """No env var, and tfds never touched (it would try the network)."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)

    def no_tfds(*args, **kwargs):
        raise data._SourceUnavailable("disabled in tests")

    monkeypatch.setattr(data, "_load_tfds", no_tfds)


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
    ip = data.write_idx(Path(folder) / f"{prefix}-images-idx3-ubyte{ext}", images)
    lp = data.write_idx(Path(folder) / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return images, labels, ip, lp


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("sub", ["", "fashion-mnist"])
def test_idx_round_trip(tmp_path, gz, sub):
    images, labels, _, _ = _write_split(tmp_path / sub, "test", gz=gz)
    x, y = data.load("fashion_mnist", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(x[..., 0], images)
    np.testing.assert_array_equal(y, labels)
    assert x.shape == (7, 28, 28, 1) and y.dtype == np.int32


def test_env_var_source_and_reload_after_rewrite(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    _write_split(tmp_path, "train", n=3, seed=1)
    assert len(data.load("fashion_mnist", "train")[0]) == 3
    images, _, _, _ = _write_split(tmp_path, "train", n=5, seed=2)
    x, _ = data.load("fashion_mnist", "train")
    np.testing.assert_array_equal(x[..., 0], images)


def test_write_idx_header(tmp_path):
    p = data.write_idx(tmp_path / "a-idx1-ubyte", np.arange(4, dtype=np.uint8))
    assert p.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 4, 0, 1, 2, 3])
    with pytest.raises(ValueError):
        data.write_idx(tmp_path / "b", np.array([256]))


def _corrupt(kind, ip, lp):
    """Corrupt one file; return the path the error must name."""
    if kind == "magic":
        raw = bytearray(gzip.decompress(ip.read_bytes()))
        raw[3] = 4
        ip.write_bytes(gzip.compress(bytes(raw)))
        return ip
    if kind == "dims":
        data.write_idx(ip, np.zeros((7, 28, 27), np.uint8))
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
        data.write_idx(lp, np.zeros(6, np.uint8))
        return lp
    if kind == "label":
        data.write_idx(lp, np.array([0, 1, 2, 3, 10, 5, 6], np.uint8))
        return lp
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["magic", "dims", "truncated", "extra", "truncated_gzip", "not_gzip", "count", "label"],
)
def test_idx_corruption_raises(tmp_path, kind):
    _, _, ip, lp = _write_split(tmp_path, "train")
    bad = _corrupt(kind, ip, lp)
    # Real data at the Debian path must not hide the corruption.
    with pytest.raises(data.DataFormatError, match=bad.name) as info:
        data.load("fashion_mnist", "train", data_dir=tmp_path)
    assert isinstance(info.value, ValueError)


def test_uncompressed_truncated(tmp_path):
    _, _, ip, _ = _write_split(tmp_path, "test", gz=False)
    ip.write_bytes(ip.read_bytes()[:100])
    with pytest.raises(data.DataFormatError, match="truncated"):
        data.load("fashion_mnist", "test", data_dir=tmp_path)


# --------------------------------------------------------------------------- missing data


def test_nothing_found_lists_all_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load("fashion_mnist", "train", data_dir=tmp_path)
    err = info.value
    assert isinstance(err, FileNotFoundError)
    msg = str(err)
    assert len(err.reasons) == 3
    for needle in (str(tmp_path), "absent", "tensorflow-datasets", "disabled in tests"):
        assert needle in msg
    assert "apt-get install dataset-fashion-mnist" in msg and data.ENV_VAR in msg


def test_nothing_found_cifar(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load("cifar100", "test")
    msg = str(info.value)
    assert "not set" in msg and "tensorflow-datasets" in msg
    assert "cifar-100-python" in msg and "https://www.cs.toronto.edu/~kriz/cifar.html" in msg
    with pytest.raises(data.DatasetNotFoundError):
        data.class_names("cifar100", data_dir=tmp_path)


def test_incomplete_folder_falls_through_to_tfds(tmp_path, monkeypatch):
    _write_split(tmp_path, "train")
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "absent")
    images, labels = _tiny(4)
    calls = []

    def fake_tfds(name, split, data_dir, label, download):
        calls.append((name, split, data_dir, label, download))
        return images[..., None], labels.astype(np.int32)

    monkeypatch.setattr(data, "_load_tfds", fake_tfds)
    x, _ = data.load("fashion_mnist", "train", data_dir=tmp_path)
    assert len(x) == 4 and calls == [("fashion_mnist", "train", str(tmp_path), "fine", True)]


def test_argument_errors():
    with pytest.raises(ValueError, match="cifar100.*fashion_mnist"):
        data.load("mnist", "train")
    with pytest.raises(ValueError, match="split"):
        data.load("fashion_mnist", "validation")
    with pytest.raises(ValueError, match="label"):
        data.load("cifar100", "train", label="medium")
    with pytest.raises(ValueError, match="label"):
        data.load("fashion_mnist", "train", label="coarse")


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
    data.write_cifar100_python(folder, fine_names=fine_names, coarse_names=coarse_names, **parts)
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
    _cifar(tmp_path)
    raw = (tmp_path / "train").read_bytes()
    assert raw[:2] == b"\x80\x02"  # pickle protocol 2, like the originals
    obj = pickle.loads(raw, encoding="bytes")
    keys = [b"filenames", b"batch_label", b"fine_labels", b"coarse_labels", b"data"]
    assert list(obj) == keys
    assert obj[b"data"].shape == (6, 3072) and obj[b"data"].dtype == np.uint8
    # Row-major planes: 1024 red values, then green, then blue.
    assert set(obj[b"data"][0, :1024]) == {10} and set(obj[b"data"][0, 2048:]) == {30}
    meta = pickle.loads((tmp_path / "meta").read_bytes(), encoding="bytes")
    assert len(meta[b"fine_label_names"]) == 100 and len(meta[b"coarse_label_names"]) == 20
    assert not list(tmp_path.glob("*.tmp"))


def _rewrite_train(folder, edit):
    path = folder / "train"
    obj = pickle.loads(path.read_bytes(), encoding="bytes")
    edit(obj)
    path.write_bytes(pickle.dumps(obj, protocol=2))


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda o: o.pop(b"coarse_labels"), "missing keys"),
        (lambda o: o.__setitem__(b"data", o[b"data"][:, :3000]), "shape"),
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
