"""Datasets as numpy arrays: Fashion-MNIST and CIFAR-100.

`load` returns ``(images, labels)``: images uint8 ``(N, H, W, C)``, labels int32 ``(N,)``.
The arrays are cached in-process and returned read-only; copy them to modify.

Where the data comes from:

- A folder given as ``data_dir`` (argument), else by the environment variable ``MTJAX_DATA_DIR``:
  only that folder is used, and it must hold the dataset (or receive it, ``download=True``),
  else `DatasetNotFoundError` names what is missing. Either the raw files -- Fashion-MNIST:
  ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte`` (``.gz`` optional; in the folder or its ``fashion-mnist/``
  subfolder); CIFAR-100: ``train`` and ``test`` of the ``cifar-100-python/`` folder from
  https://www.cs.toronto.edu/~kriz/cifar.html (the folder itself or its parent) -- or a
  tensorflow-datasets copy prepared in that folder.
- Without a folder: the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``, Fashion-MNIST only), then the download cache
  ``~/.cache/mtjax`` (raw files, as in a folder), then tensorflow-datasets' own folder.

Train and test always come from one source: a folder holding the files of only one split is an
error. Files that are present but malformed raise `DataFormatError`.

Downloads are opt-in (``download=True``). When no local raw files are found, the original
raw files are downloaded (`mtjax.fetch`: published URLs, checksums verified, no TensorFlow)
into ``data_dir``, else ``$MTJAX_DATA_DIR``, else ``~/.cache/mtjax``. If that fails,
tensorflow-datasets is tried last: it downloads and prepares the dataset as ``array_record``
files only when TensorFlow is installed (preparing needs it; reading a prepared copy does not).

CIFAR-100 files are Python pickles. They are read with an unpickler that admits only the globals
such files use (NumPy array reconstruction, and ``_codecs.encode`` that Python 3 writes for bytes
at protocol 2); any other global, such as ``os.system`` in a crafted file, is refused with a
`DataFormatError` before it is called.

Normalization (`normalize`): ``(x / 255 - mean) / std`` per channel, in float32; the defaults
``mean = std = 0.5`` map pixels to ``[-1, 1]``.

Synthetic files in these formats: `mtjax.testing`.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import importlib.util
import math
import os
import pickle
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from numpy._core.multiarray import _reconstruct

from mtjax import fetch

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

#: The only globals a CIFAR-100 pickle may name, as the unpickler sees them. The originals
#: (Python 2 cPickle, protocol 2) use the three NumPy ones; Python 3 at protocol 2 writes
#: ``numpy._core`` and ``_codecs.encode(text, "latin1")`` for bytes.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class DatasetNotFoundError(FileNotFoundError):
    """No source has the dataset; ``reasons`` holds ``(source, why)`` for each source tried."""

    def __init__(self, message: str, reasons: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.reasons = reasons

    def __str__(self) -> str:
        return str(self.args[0])


class DataFormatError(ValueError):
    """A dataset file is present but malformed or unsafe; the message names the file."""


class _SourceUnavailable(Exception):
    """A source does not have the data (as opposed to having bad data)."""


class _Incomplete(Exception):
    """A folder holds some of a dataset's raw files but not all (both splits) of them."""


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
    """The user's folder (None if not given) and a description of where it came from."""
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


def _check_labels(where: object, labels: np.ndarray, n_classes: int, what: str = "labels") -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        bad = int(np.flatnonzero((labels < 0) | (labels >= n_classes))[0])
        raise DataFormatError(
            f"{where}: {what}[{bad}] = {int(labels[bad])} outside 0..{n_classes - 1}"
        )


# --------------------------------------------------------------------------- raw files


def _raw_layout(name: str, folder: Path) -> tuple[tuple[Path, ...], dict[str, tuple[str, ...]]]:
    """Candidate folders, in order, and the file stems of each split."""
    if name == "fashion_mnist":
        stems = {
            s: (f"{p}-images-idx3-ubyte", f"{p}-labels-idx1-ubyte") for s, p in _IDX_PREFIX.items()
        }
        return (folder, folder / "fashion-mnist"), stems
    return (folder / _CIFAR_DIRNAME, folder), {s: (s,) for s in SPLITS}


def _expected(name: str, folder: Path) -> str:
    """The raw files ``load`` looks for in ``folder``, in words."""
    cands, stems = _raw_layout(name, folder)
    files = ", ".join(s for split in SPLITS for s in stems[split])
    if name == "fashion_mnist":
        return f"{files} (.gz optional) in {cands[0]} or {cands[1]}"
    return f"{files} in {cands[0]} or {cands[1]}"


def _raw_files(name: str, folder: Path) -> dict[str, tuple[Path, ...]] | None:
    """The raw files of both splits, ``{split: paths}``; None if ``folder`` has none of them.

    The first candidate folder holding any of the files must hold all of them (`_Incomplete`).
    """
    cands, stems = _raw_layout(name, folder)
    for cand in cands:
        found: dict[str, Path | None] = {}
        for stem in (s for split in SPLITS for s in stems[split]):
            exts = ("", ".gz") if name == "fashion_mnist" else ("",)
            hits = [cand / f"{stem}{e}" for e in exts if (cand / f"{stem}{e}").is_file()]
            found[stem] = hits[0] if hits else None
        if not any(found.values()):
            continue
        missing = [str(cand / s) + ("[.gz]" if name == "fashion_mnist" else "")
                   for s, p in found.items() if p is None]  # fmt: skip
        if missing:
            have = ", ".join(p.name for p in found.values() if p is not None)
            raise _Incomplete(f"{cand} has {have} but lacks {', '.join(missing)}")
        return {split: tuple(found[s] for s in stems[split]) for split in SPLITS}
    return None


def _read_raw(name: str, files: tuple[Path, ...]):
    """``(images, fine, coarse)`` from one split's raw files; coarse is None for Fashion-MNIST."""
    if name == "fashion_mnist":
        images_path, labels_path = files
        images, labels = _read_fashion_mnist(_stat_key(images_path), _stat_key(labels_path))
        return images, labels, None
    return _read_cifar100(_stat_key(files[0]))


# --------------------------------------------------------------------------- Fashion-MNIST (IDX)


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


# --------------------------------------------------------------------------- CIFAR-100 (pickle)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `_PICKLE_GLOBALS`; any other global is a `DataFormatError`."""

    def __init__(self, file, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_GLOBALS[module, name]
        except KeyError:
            raise DataFormatError(
                f"{self._path}: refused global '{module}.{name}': a CIFAR-100 file holds only "
                "dicts, lists, bytes, numbers and NumPy arrays (is this file from "
                f"{CIFAR_URL}?)"
            ) from None


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, path).load()
    except DataFormatError:
        raise
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
    data = obj[b"data"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != _CIFAR_PIXELS
    ):
        raise DataFormatError(
            f"{path}: b'data' is {type(data).__name__} {getattr(data, 'shape', '')} "
            f"{getattr(data, 'dtype', '')}, expected a uint8 array (N, {_CIFAR_PIXELS})"
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


def _decode_names(path: Path, obj: dict, key: bytes, n: int) -> list[str]:
    names = obj[key]
    if not isinstance(names, list | tuple) or len(names) != n:
        raise DataFormatError(f"{path}: {key!r} should be a list of {n} names")
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in names]


# --------------------------------------------------------------------------- tensorflow-datasets


def _needs_tensorflow(name: str) -> str:
    return (
        f"preparing {name} needs TensorFlow, which is not installed (`pip install "
        "tensorflow`); the prepared array_record files are then read without it"
    )


def _tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _tfds_failure(e: Exception, name: str, download: bool, skipped: bool, builder) -> str:
    """Why tensorflow-datasets could not give the data, in words."""
    if isinstance(e, ModuleNotFoundError) and e.name == "tensorflow":
        return _needs_tensorflow(name)
    if builder is not None and not builder.is_prepared():
        if skipped:
            return f"not prepared in {builder.data_dir}, and {_needs_tensorflow(name)}"
        if not download:
            return f"not prepared in {builder.data_dir} (download=False)"
    return f"{type(e).__name__}: {e}"


@functools.lru_cache(maxsize=4)
def _load_tfds(name: str, split: str, data_dir: str | None, download: bool):
    """``(images, fine, coarse)`` through tensorflow-datasets' array_record data source.

    ``download=True`` downloads and prepares the dataset first (a no-op once prepared) when
    TensorFlow is installed; without it only a prepared copy can be read (preparing would
    fail after the download). Raises `_SourceUnavailable` with the reason when
    tensorflow-datasets cannot give the data.
    """
    try:
        import tensorflow_datasets as tfds
    except Exception as e:
        raise _SourceUnavailable(f"cannot import tensorflow_datasets: {e}") from e
    builder = None
    skipped = download and not _tensorflow_available()
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        if download and not skipped:
            builder.download_and_prepare()
        source = builder.as_data_source(split=split)
        examples = [source[i] for i in range(len(source))]
    except Exception as e:
        raise _SourceUnavailable(_tfds_failure(e, name, download, skipped, builder)) from e
    where = f"tfds:{name}/{split}"
    want = (28, 28, 1) if name == "fashion_mnist" else (32, 32, 3)
    try:
        images = np.stack([np.asarray(ex["image"]) for ex in examples])
        keys = ("label",) if name == "fashion_mnist" else ("label", "coarse_label")
        labels = [np.asarray([ex[k] for ex in examples]) for k in keys]
    except (KeyError, ValueError) as e:
        raise DataFormatError(f"{where}: unexpected examples: {type(e).__name__}: {e}") from e
    if images.dtype != np.uint8 or images.shape[1:] != want:
        raise DataFormatError(
            f"{where}: images {images.shape} {images.dtype}, expected (N, {want}) uint8"
        )
    n_classes = (10,) if name == "fashion_mnist" else (100, 20)
    for k, lab, n in zip(keys, labels, n_classes, strict=True):
        if lab.shape != (len(images),) or not np.issubdtype(lab.dtype, np.integer):
            raise DataFormatError(f"{where}: {k} {lab.shape} {lab.dtype} for {len(images)} images")
        _check_labels(where, lab, n, k)
    out = [_readonly(lab.astype(np.int32)) for lab in labels]
    return _readonly(np.ascontiguousarray(images)), out[0], out[1] if len(out) > 1 else None


# --------------------------------------------------------------------------- public API


def _how_to_get(name: str) -> str:
    if name == "fashion_mnist":
        local = (
            "`apt-get install dataset-fashion-mnist`, or pass a folder holding the four "
            "*-idx?-ubyte.gz files as data_dir (scripts: --data-dir) or in "
            f"${ENV_VAR}"
        )
    else:
        local = (
            f"pass a folder holding {_CIFAR_DIRNAME}/ from {CIFAR_URL} as data_dir "
            f"(scripts: --data-dir) or in ${ENV_VAR}"
        )
    return (
        f"To get the data: {local}; or pass download=True (scripts: --download) to download "
        f"the original files (checksums verified; into data_dir, ${ENV_VAR} or "
        f"{fetch.DEFAULT_CACHE_DIR}; needs internet)."
    )


def _download_raw(name: str, folder: Path) -> None:
    """Download the raw files of ``name`` into ``folder`` (`mtjax.fetch.download_raw`)."""
    fetch.download_raw(name, folder)


def _raw_source(name: str, folder: Path, split: str, download: bool, label: str, reasons: list):
    """``(images, fine, coarse)`` from the raw files in ``folder``, downloading them first
    when ``download`` and they are missing; None (and the reasons appended) otherwise.

    Incomplete raw files are an error (`_Incomplete`) unless ``download`` completes them."""
    try:
        files = _raw_files(name, folder) if folder.is_dir() else None
    except _Incomplete as e:
        if not download:
            raise
        reasons.append((f"{label}: raw files", f"incomplete: {e}"))
    else:
        if files is not None:
            return _read_raw(name, files[split])
        reasons.append((f"{label}: raw files", f"no {_expected(name, folder)}"))
    if not download:
        return None
    try:
        _download_raw(name, folder)
        files = _raw_files(name, folder)
    except (fetch.DownloadError, _Incomplete, OSError) as e:
        reasons.append((f"{label}: raw download", str(e)))
        return None
    if files is None:
        reasons.append((f"{label}: raw download", f"still no {_expected(name, folder)}"))
        return None
    return _read_raw(name, files[split])


def _not_found(header: str, name: str, reasons: list) -> DatasetNotFoundError:
    lines = [header]
    lines += [f"  {i}. {src}: {why}" for i, (src, why) in enumerate(reasons, 1)]
    lines.append(_how_to_get(name))
    return DatasetNotFoundError("\n".join(lines), reasons)


def _from_folder(desc: str, folder: Path, name: str, split: str, download: bool):
    """``(images, fine, coarse)`` from the user's folder, which must hold the dataset (or
    receive it with ``download``)."""
    if not folder.is_dir():
        why = f"{folder} is not a folder"
        msg = f"cannot load {name!r}: {desc}: {why}.\n{_how_to_get(name)}"
        raise DatasetNotFoundError(msg, [(desc, why)])
    reasons: list[tuple[str, str]] = []
    try:
        got = _raw_source(name, folder, split, download, desc, reasons)
    except _Incomplete as e:
        msg = (
            f"cannot load {name!r} from {desc}: incomplete raw files: {e}. Train and test "
            f"must come from the same folder.\n{_how_to_get(name)}"
        )
        raise DatasetNotFoundError(msg, [(desc, str(e))]) from None
    if got is not None:
        return got
    try:
        return _load_tfds(name, split, str(folder), download)
    except _SourceUnavailable as e:
        reasons.append((f"{desc}: tensorflow-datasets", str(e)))
    header = f"cannot load {name!r} split {split!r}: {desc} does not hold it:"
    raise _not_found(header, name, reasons) from None


def _from_defaults(desc: str, name: str, split: str, download: bool):
    """``(images, fine, coarse)`` from the Debian copy, the download cache (downloading into
    it with ``download``), then tensorflow-datasets' folder."""
    reasons = [(desc, "not set")]
    if name == "fashion_mnist":
        debian = Path(DEBIAN_FASHION_MNIST_DIR)
        src = f"Debian package dataset-fashion-mnist ({debian})"
        try:
            files = _raw_files(name, debian) if debian.is_dir() else None
        except _Incomplete as e:
            reasons.append((src, f"skipped, incomplete: {e}"))
        else:
            if files is not None:
                return _read_raw(name, files[split])
            reasons.append((src, f"not installed: no {_expected(name, debian)}"))
    cache = Path(fetch.DEFAULT_CACHE_DIR).expanduser()
    label = f"download cache ({cache})"
    try:
        got = _raw_source(name, cache, split, download, label, reasons)
    except _Incomplete as e:
        reasons.append((f"{label}: raw files", f"skipped, incomplete: {e}"))
        got = None
    if got is not None:
        return got
    try:
        return _load_tfds(name, split, None, download)
    except _SourceUnavailable as e:
        reasons.append(("tensorflow-datasets (its default folder)", str(e)))
    raise _not_found(f"cannot load {name!r} split {split!r}; sources tried:", name, reasons)


def load(
    name: str,
    split: str,
    *,
    data_dir: StrPath | None = None,
    label: str = "fine",
    download: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Return read-only ``(images uint8 (N,H,W,C), labels int32 (N,))`` for ``split``.

    ``label`` selects CIFAR-100's ``"fine"`` (100) or ``"coarse"`` (20) classes.
    ``download=True`` downloads the original files of a dataset no local source has (into
    ``data_dir``, else ``$MTJAX_DATA_DIR``, else ``~/.cache/mtjax``; checksums verified),
    falling back to tensorflow-datasets when TensorFlow is installed. See the module
    docstring for the sources.
    """
    _check_args(name, split, label)
    desc, folder = _user_dir(data_dir)
    if folder is not None:
        images, fine, coarse = _from_folder(desc, folder, name, split, download)
    else:
        images, fine, coarse = _from_defaults(desc, name, split, download)
    return _view(images), _view(coarse if label == "coarse" else fine)


def class_names(name: str, *, data_dir: StrPath | None = None, label: str = "fine") -> list[str]:
    """Class names indexed by label; CIFAR-100 names come from its ``meta`` file (in the
    folder, else in the download cache)."""
    _check_args(name, None, label)
    if name == "fashion_mnist":
        return list(FASHION_MNIST_CLASSES)
    desc, folder = _user_dir(data_dir)
    if folder is None:
        desc = f"{desc} not set, download cache"
        folder = Path(fetch.DEFAULT_CACHE_DIR).expanduser()
    cands = (folder / _CIFAR_DIRNAME / "meta", folder / "meta")
    path = next((p for p in cands if p.is_file()), None)
    if path is None:
        why = f"no {' or '.join(map(str, cands))}"
        msg = f"cannot find the CIFAR-100 meta file; {desc}: {why}\n{_how_to_get(name)}"
        raise DatasetNotFoundError(msg, [(desc, why)])
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
