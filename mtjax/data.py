"""Datasets as numpy arrays: Fashion-MNIST and CIFAR-100.

`load` returns ``(images, labels)``: images uint8 ``(N, H, W, C)``, labels int32 ``(N,)``.
The arrays are cached in-process and returned read-only; copy them to modify.

Sources, tried in order until one has the data:

1. ``data_dir`` (argument), else the environment variable ``MTJAX_DATA_DIR``: a folder with
   the raw files. Fashion-MNIST: ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
   ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz`` (``.gz`` optional; in the folder
   or its ``fashion-mnist/`` subfolder). CIFAR-100: the ``cifar-100-python/`` folder from
   https://www.cs.toronto.edu/~kriz/cifar.html (the folder itself or its parent).
2. Fashion-MNIST only: the Debian package ``dataset-fashion-mnist``
   (``/usr/share/datasets/fashion-mnist``).
3. tensorflow-datasets (``tfds.data_source``, then ``tfds.load``), which may download.

A source whose files are absent is skipped; files that are present but malformed raise
`DataFormatError`. If no source has the data, `DatasetNotFoundError` lists every source tried.
CIFAR-100 files are Python pickles: only load them from a source you trust.

Normalization (`normalize`): ``(x / 255 - mean) / std`` per channel, in float32; the defaults
``mean = std = 0.5`` map pixels to ``[-1, 1]``.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import pickle
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from mtjax.fileio import atomic_write_bytes

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "ENV_VAR",
    "DataFormatError",
    "DatasetNotFoundError",
    "batches",
    "class_names",
    "load",
    "normalize",
    "num_batches",
    "write_cifar100_python",
    "write_idx",
]

StrPath = str | os.PathLike[str]

ENV_VAR = "MTJAX_DATA_DIR"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

DATASETS = ("cifar100", "fashion_mnist")
SPLITS = ("train", "test")
LABELS = ("fine", "coarse")

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_CIFAR_DIRNAME = "cifar-100-python"
_CIFAR_PIXELS = 3 * 32 * 32
_NUM_CLASSES = {"fashion_mnist": 10, "fine": 100, "coarse": 20}


class DatasetNotFoundError(FileNotFoundError):
    """No source has the dataset; ``reasons`` holds ``(source, why)`` for each source tried."""

    def __init__(self, message: str, reasons: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.reasons = reasons

    def __str__(self) -> str:
        return str(self.args[0])


class DataFormatError(ValueError):
    """A dataset file is present but malformed; the message names the file."""


class _SourceUnavailable(Exception):
    """A source does not have the data (as opposed to having bad data)."""


# --------------------------------------------------------------------------- argument checks


def _check_args(name: str, split: str | None, label: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    if name == "fashion_mnist" and label != "fine":
        raise ValueError(f"label={label!r} is only available for cifar100; use label='fine'")


def _user_dir(data_dir: StrPath | None) -> tuple[str, Path | None]:
    """The folder of source 1 and a description of where it came from."""
    if data_dir is not None:
        return f"data_dir={os.fspath(data_dir)!r}", Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR, "")
    if env:
        return f"${ENV_VAR}={env!r}", Path(env).expanduser()
    return f"data_dir / ${ENV_VAR}", None


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _view(a: np.ndarray) -> np.ndarray:
    """A read-only view of a cached read-only array (its flag cannot be turned back on)."""
    v = a.view()
    v.flags.writeable = False
    return v


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


# --------------------------------------------------------------------------- Fashion-MNIST (IDX)


def _find_idx(folder: Path, split: str) -> tuple[Path, Path]:
    """Images and labels files for ``split`` in ``folder`` or ``folder/fashion-mnist``."""
    if not folder.is_dir():
        raise _SourceUnavailable(f"{folder} is not a folder")
    prefix = _IDX_PREFIX[split]
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    notes = []
    for cand in (folder, folder / "fashion-mnist"):
        found = []
        for stem in stems:
            hits = [p for p in (cand / stem, cand / f"{stem}.gz") if p.is_file()]
            found.append(hits[0] if hits else None)
        if all(found):
            return found[0], found[1]
        if any(found):
            missing = [s for s, f in zip(stems, found, strict=True) if f is None]
            notes.append(f"{cand} lacks {missing[0]}[.gz]")
    if not notes:
        notes.append(f"no {stems[0]}[.gz] in {folder} or {folder / 'fashion-mnist'}")
    raise _SourceUnavailable("; ".join(notes))


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"{path}: cannot read file: {type(e).__name__}: {e}") from e


def _parse_idx(path: Path, data: bytes, magic: int, shape: tuple[int, ...]) -> np.ndarray:
    """Parse an unsigned-byte IDX file; ``shape`` gives the dims after the first."""
    ndim = 1 + len(shape)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(f"{path}: {len(data)} bytes, shorter than the IDX header")
    got_magic = int.from_bytes(data[:4], "big")
    if got_magic != magic:
        raise DataFormatError(f"{path}: IDX magic number {got_magic}, expected {magic}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if dims[1:] != shape:
        raise DataFormatError(
            f"{path}: IDX dims {dims}, expected (N, {', '.join(map(str, shape))})"
        )
    want = header + math.prod(dims)
    if len(data) != want:
        kind = "truncated" if len(data) < want else "trailing bytes"
        raise DataFormatError(f"{path}: {kind}: {len(data)} bytes, IDX dims {dims} need {want}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _check_labels(where: object, labels: np.ndarray, n_classes: int, what: str = "labels") -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        bad = int(np.flatnonzero((labels < 0) | (labels >= n_classes))[0])
        raise DataFormatError(
            f"{where}: {what}[{bad}] = {int(labels[bad])} outside 0..{n_classes - 1}"
        )


@functools.lru_cache(maxsize=8)
def _read_fashion_mnist(
    images_key: tuple[str, int, int], labels_key: tuple[str, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = Path(images_key[0]), Path(labels_key[0])
    images = _parse_idx(images_path, _read_maybe_gzip(images_path), _IDX_IMAGES_MAGIC, (28, 28))
    labels = _parse_idx(labels_path, _read_maybe_gzip(labels_path), _IDX_LABELS_MAGIC, ())
    if len(images) != len(labels):
        raise DataFormatError(
            f"{labels_path}: {len(labels)} labels but {images_path} has {len(images)} images"
        )
    _check_labels(labels_path, labels, _NUM_CLASSES["fashion_mnist"])
    return _readonly(images[..., None]), _readonly(labels.astype(np.int32))


def _load_fashion_mnist_dir(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = _find_idx(folder, split)
    return _read_fashion_mnist(_stat_key(images_path), _stat_key(labels_path))


# --------------------------------------------------------------------------- CIFAR-100 (pickle)


def _find_cifar(folder: Path, filename: str) -> Path:
    """``filename`` in ``folder/cifar-100-python`` or ``folder``."""
    if not folder.is_dir():
        raise _SourceUnavailable(f"{folder} is not a folder")
    for cand in (folder / _CIFAR_DIRNAME, folder):
        if (cand / filename).is_file():
            return cand / filename
    raise _SourceUnavailable(f"no {_CIFAR_DIRNAME}/{filename} in {folder} (nor {filename})")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as e:  # pickle raises many types on bad input
        raise DataFormatError(f"{path}: cannot unpickle: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _require_keys(path: Path, obj: dict, keys: Sequence[bytes]) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DataFormatError(f"{path}: missing keys {missing}; has {sorted(map(repr, obj))}")


@functools.lru_cache(maxsize=4)
def _read_cifar100(key: tuple[str, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    path = Path(key[0])
    obj = _unpickle(path)
    _require_keys(path, obj, (b"data", b"fine_labels", b"coarse_labels"))
    data = np.asarray(obj[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        raise DataFormatError(
            f"{path}: b'data' has shape {data.shape} dtype {data.dtype}, "
            f"expected (N, {_CIFAR_PIXELS}) uint8"
        )
    n = len(data)
    out = []
    for k, n_classes in ((b"fine_labels", 100), (b"coarse_labels", 20)):
        try:
            lab = np.asarray(obj[k], dtype=np.int64)
        except (TypeError, ValueError) as e:
            raise DataFormatError(f"{path}: {k!r} is not a list of integers: {e}") from e
        if lab.shape != (n,):
            raise DataFormatError(f"{path}: {k!r} has shape {lab.shape}, expected ({n},)")
        _check_labels(path, lab, n_classes, k.decode())
        out.append(_readonly(lab.astype(np.int32)))
    images = np.ascontiguousarray(data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))
    return _readonly(images), out[0], out[1]


def _load_cifar100_dir(folder: Path, split: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    images, fine, coarse = _read_cifar100(_stat_key(_find_cifar(folder, split)))
    return images, fine if label == "fine" else coarse


def _decode_names(path: Path, obj: dict, key: bytes, n: int) -> list[str]:
    names = obj[key]
    if not isinstance(names, list | tuple) or len(names) != n:
        raise DataFormatError(f"{path}: {key!r} should be a list of {n} names")
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in names]


# --------------------------------------------------------------------------- tensorflow-datasets


@functools.lru_cache(maxsize=4)
def _load_tfds(
    name: str, split: str, data_dir: str | None, label: str, download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Load through tensorflow-datasets; raise `_SourceUnavailable` with the reasons on failure."""
    key = "coarse_label" if label == "coarse" else "label"
    try:
        import tensorflow_datasets as tfds
    except Exception as e:
        raise _SourceUnavailable(f"cannot import tensorflow_datasets: {e}") from e
    errors = []
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
        examples = [source[i] for i in range(len(source))]
        images = np.stack([np.asarray(ex["image"]) for ex in examples])
        labels = np.asarray([ex[key] for ex in examples])
    except Exception as e:
        errors.append(f"tfds.data_source: {type(e).__name__}: {e}")
        try:
            ds = tfds.as_numpy(
                tfds.load(name, split=split, data_dir=data_dir, batch_size=-1, download=download)
            )
            images, labels = np.asarray(ds["image"]), np.asarray(ds[key])
        except Exception as e2:
            errors.append(f"tfds.load: {type(e2).__name__}: {e2}")
            raise _SourceUnavailable("; ".join(errors)) from e2
    where = f"tfds:{name}/{split}"
    want = (28, 28, 1) if name == "fashion_mnist" else (32, 32, 3)
    if images.dtype != np.uint8 or images.shape[1:] != want or len(labels) != len(images):
        raise DataFormatError(
            f"{where}: images {images.shape} {images.dtype}, labels {labels.shape}"
        )
    _check_labels(
        where, labels, _NUM_CLASSES["fashion_mnist" if name == "fashion_mnist" else label]
    )
    return _readonly(np.ascontiguousarray(images)), _readonly(labels.astype(np.int32))


# --------------------------------------------------------------------------- public API


def _how_to_get(name: str) -> str:
    if name == "fashion_mnist":
        local = (
            "`apt-get install dataset-fashion-mnist`, or set "
            f"{ENV_VAR} to a folder holding the four *-idx?-ubyte.gz files"
        )
    else:
        local = f"set {ENV_VAR} to a folder containing {_CIFAR_DIRNAME}/ from {CIFAR_URL}"
    return f"To get the data: {local}; or give tensorflow-datasets internet access to download it."


def load(
    name: str,
    split: str,
    *,
    data_dir: StrPath | None = None,
    label: str = "fine",
    download: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Return read-only ``(images uint8 (N,H,W,C), labels int32 (N,))`` for ``split``.

    ``label`` selects CIFAR-100's ``"fine"`` (100) or ``"coarse"`` (20) classes.
    ``download=False`` lets tensorflow-datasets use only data it has already prepared.
    """
    _check_args(name, split, label)
    desc, folder = _user_dir(data_dir)
    reasons: list[tuple[str, str]] = []

    def attempt(source: str, fn, *args):
        try:
            images, labels = fn(*args)
        except _SourceUnavailable as e:
            reasons.append((source, str(e)))
            return None
        return _view(images), _view(labels)

    if folder is None:
        reasons.append((desc, "not set"))
    else:
        fn = _load_fashion_mnist_dir if name == "fashion_mnist" else _load_cifar100_dir
        args = (folder, split) if name == "fashion_mnist" else (folder, split, label)
        if (got := attempt(desc, fn, *args)) is not None:
            return got
    if name == "fashion_mnist":
        debian = Path(DEBIAN_FASHION_MNIST_DIR)
        src = f"Debian package dataset-fashion-mnist ({debian})"
        if (got := attempt(src, _load_fashion_mnist_dir, debian, split)) is not None:
            return got
    tfds_dir = None if folder is None else str(folder)
    try:
        got = attempt("tensorflow-datasets", _load_tfds, name, split, tfds_dir, label, download)
        if got is not None:
            return got
    except DataFormatError:
        raise
    except Exception as e:  # a monkeypatched or broken tfds path: still a missing source
        reasons.append(("tensorflow-datasets", f"{type(e).__name__}: {e}"))
    lines = [f"cannot load {name!r} split {split!r}; sources tried:"]
    lines += [f"  {i}. {src}: {why}" for i, (src, why) in enumerate(reasons, 1)]
    lines.append(_how_to_get(name))
    raise DatasetNotFoundError("\n".join(lines), reasons)


def class_names(name: str, *, data_dir: StrPath | None = None, label: str = "fine") -> list[str]:
    """Class names indexed by label; CIFAR-100 names come from its ``meta`` file."""
    _check_args(name, None, label)
    if name == "fashion_mnist":
        return list(FASHION_MNIST_CLASSES)
    desc, folder = _user_dir(data_dir)
    try:
        if folder is None:
            raise _SourceUnavailable("not set")
        path = _find_cifar(folder, "meta")
    except _SourceUnavailable as e:
        msg = f"cannot find CIFAR-100 meta file; {desc}: {e}\n{_how_to_get(name)}"
        raise DatasetNotFoundError(msg, [(desc, str(e))]) from None
    obj = _unpickle(path)
    key, n = (b"fine_label_names", 100) if label == "fine" else (b"coarse_label_names", 20)
    _require_keys(path, obj, (key,))
    return _decode_names(path, obj, key, n)


def normalize(
    images: np.ndarray, mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5
) -> np.ndarray:
    """Return ``(images / 255 - mean) / std`` as float32; mean/std broadcast over the last axis."""
    mean_a = np.asarray(mean, dtype=np.float32)
    std_a = np.asarray(std, dtype=np.float32)
    if np.any(std_a <= 0):
        raise ValueError(f"std must be positive, got {std}")
    x = np.asarray(images, dtype=np.float32) / np.float32(255.0)
    return (x - mean_a) / std_a


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Number of batches `batches` yields for ``n`` examples."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return n // batch_size if drop_last else -(-n // batch_size)


def batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Return an iterator over the ``(x, y, mask)`` batches of one epoch (arguments checked now).

    The order is ``np.random.default_rng((seed, epoch)).permutation(n)`` (or ``arange(n)``
    without ``shuffle``). With ``drop_last=False`` the last batch is filled by wrapping to the
    start of that order, and ``mask`` is False on those padded entries; otherwise all True.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(images) != len(labels):
        raise ValueError(f"labels has length {len(labels)} but images has {len(images)}")
    for arg, value in (("seed", seed), ("epoch", epoch)):
        if value < 0:
            raise ValueError(f"{arg} must be >= 0, got {value}")
    n = len(images)
    order = np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)

    def gen() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for b in range(num_batches(n, batch_size, drop_last)):
            pos = np.arange(b * batch_size, (b + 1) * batch_size)
            idx = order[pos % n]
            yield images[idx], labels[idx], pos < n

    return gen()


# --------------------------------------------------------------------------- writers


def write_idx(path: StrPath, array: np.ndarray) -> Path:
    """Write an unsigned-byte IDX file (gzip-compressed if ``path`` ends in ``.gz``)."""
    path = Path(path)
    a = np.asarray(array)
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.integer) or (a.size and (a.min() < 0 or a.max() > 255)):
            raise ValueError(f"array must hold integers in 0..255, got dtype {a.dtype}")
        a = a.astype(np.uint8)
    if not 1 <= a.ndim <= 255:
        raise ValueError(f"array must have 1..255 dimensions, got {a.ndim}")
    header = bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    data = header + np.ascontiguousarray(a).tobytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    atomic_write_bytes(path, data)
    return path


def _cifar_batch(split: str, images, fine, coarse) -> dict[bytes, object]:
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise ValueError(f"{split} images must be uint8 (N, 32, 32, 3), got {x.shape} {x.dtype}")
    n = len(x)
    labels = []
    for what, lab, k in (("fine", fine, 100), ("coarse", coarse, 20)):
        lab = np.asarray(lab)
        if lab.shape != (n,) or (n and (lab.min() < 0 or lab.max() >= k)):
            raise ValueError(f"{split} {what} labels must have shape ({n},) and lie in 0..{k - 1}")
        labels.append([int(v) for v in lab])
    batch_label = b"training batch 1 of 1" if split == "train" else b"testing batch 1 of 1"
    return {
        b"filenames": [f"synthetic_{split}_{i:05d}.png".encode() for i in range(n)],
        b"batch_label": batch_label,
        b"fine_labels": labels[0],
        b"coarse_labels": labels[1],
        b"data": np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(n, _CIFAR_PIXELS)),
    }


def write_cifar100_python(
    folder: StrPath,
    *,
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray, np.ndarray],
    fine_names: Sequence[str] | None = None,
    coarse_names: Sequence[str] | None = None,
) -> Path:
    """Write ``train``, ``test`` and ``meta`` in the ``cifar-100-python`` format into ``folder``.

    ``train``/``test`` are ``(images uint8 (N,32,32,3), fine, coarse)``; names default to
    ``fine_00``.. and ``coarse_00``... Pickle protocol 2, bytes keys, as the originals.
    """
    folder = Path(folder)
    fine_names = [f"fine_{i:02d}" for i in range(100)] if fine_names is None else fine_names
    coarse_names = [f"coarse_{i:02d}" for i in range(20)] if coarse_names is None else coarse_names
    if len(fine_names) != 100 or len(coarse_names) != 20:
        raise ValueError("fine_names needs 100 entries and coarse_names 20")
    files = {
        split: _cifar_batch(split, *parts) for split, parts in (("train", train), ("test", test))
    }
    files["meta"] = {
        b"fine_label_names": [s.encode() for s in fine_names],
        b"coarse_label_names": [s.encode() for s in coarse_names],
    }
    for filename, obj in files.items():
        atomic_write_bytes(folder / filename, pickle.dumps(obj, protocol=2))
    return folder
