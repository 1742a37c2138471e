"""Helpers for tests and examples: synthetic data written in the real on-disk formats, and
finite differences for gradient checks.

`write_idx` writes Fashion-MNIST's IDX files; `write_cifar100_python` writes the
``cifar-100-python`` files the way the originals were written (Python 2 cPickle, protocol 2).
`mtjax.data` reads both. `central_difference` is the reference of gradient checks.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtjax.fileio import atomic_write_bytes

__all__ = ["central_difference", "py2_pickle", "write_cifar100_python", "write_idx"]

StrPath = str | os.PathLike[str]

_CIFAR_PIXELS = 3 * 32 * 32


def central_difference(f: Callable[[Any], Any], x: Any, key: Any, h: float) -> float:
    """(f(x with x[key] + h) - f(x with x[key] - h)) / (2 h) as a float: `x` a dict, a list
    or tuple (`key` an index), or a `DeviceParams` (`key` a field name)."""

    def moved(step):
        if hasattr(x, "replace"):
            return x.replace(**{key: getattr(x, key) + step})
        if isinstance(x, dict):
            return {**x, key: x[key] + step}
        return type(x)(v + step if j == key else v for j, v in enumerate(x))

    return (float(f(moved(h))) - float(f(moved(-h)))) / (2 * h)


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


def py2_pickle(obj: object) -> bytes:
    """``obj`` pickled as Python 2's cPickle does at protocol 2, without memo opcodes.

    Handles None, bool, int (32-bit), bytes and str (both written as a Python 2 ``str``),
    tuple, list, dict, and uint8 NumPy arrays (as ``numpy.core.multiarray._reconstruct``
    with a NumPy 1 ``dtype`` state), which is all a CIFAR-100 file holds.
    """
    out = bytearray(b"\x80\x02")  # PROTO 2

    def put(o: object) -> None:
        if o is None:
            out.extend(b"N")
        elif isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")  # NEWTRUE / NEWFALSE
        elif isinstance(o, int):
            if 0 <= o < 256:
                out.extend(b"K" + bytes([o]))  # BININT1
            elif 0 <= o < 65536:
                out.extend(b"M" + struct.pack("<H", o))  # BININT2
            elif -(2**31) <= o < 2**31:
                out.extend(b"J" + struct.pack("<i", o))  # BININT
            else:
                raise ValueError(f"int {o} does not fit 32 bits")
        elif isinstance(o, bytes | str):
            b = o.encode("latin-1") if isinstance(o, str) else o
            head = b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))
            out.extend(head + b)  # SHORT_BINSTRING / BINSTRING: a Python 2 str
        elif isinstance(o, tuple):
            if len(o) <= 3:
                for x in o:
                    put(x)
                out.extend((b")", b"\x85", b"\x86", b"\x87")[len(o)])  # EMPTY_TUPLE, TUPLE1-3
            else:
                out.extend(b"(")
                for x in o:
                    put(x)
                out.extend(b"t")
        elif isinstance(o, list):
            out.extend(b"](")
            for x in o:
                put(x)
            out.extend(b"e")  # APPENDS
        elif isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                put(k)
                put(v)
            out.extend(b"u")  # SETITEMS
        elif isinstance(o, np.ndarray) and o.dtype == np.uint8:
            # _reconstruct(ndarray, (0,), 'b'), then BUILD with (1, shape, dtype, False, raw)
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            put((0,))
            put(b"b")
            out.extend(b"\x87R(")
            put(1)
            put(tuple(int(d) for d in o.shape))
            out.extend(b"cnumpy\ndtype\n")
            put(("u1", 0, 1))
            out.extend(b"R")
            put((3, "|", None, None, None, -1, -1, 0))
            out.extend(b"b")
            put(False)
            put(np.ascontiguousarray(o).tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(f"cannot write {type(o).__name__} {o!r:.40} as a Python 2 pickle")

    put(obj)
    out.extend(b".")  # STOP
    return bytes(out)


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
    ``fine_00``.. and ``coarse_00``... Dicts with bytes keys pickled as `py2_pickle` does,
    like the originals.
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
        atomic_write_bytes(folder / filename, py2_pickle(obj))
    return folder
