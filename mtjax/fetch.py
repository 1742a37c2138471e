"""Download the original raw dataset files, without TensorFlow.

`download_raw(name, folder)` fetches the files `mtjax.data` reads:

- Fashion-MNIST: the four IDX ``.gz`` files into ``folder/fashion-mnist/``;
- CIFAR-100: ``cifar-100-python.tar.gz``, extracted into ``folder/cifar-100-python/``
  (the archive is deleted afterwards).

Every file is streamed into a temporary file next to its destination while its MD5 (and,
where published, SHA-256 and size) is computed; it is renamed into place only when all match
the published values. A network error, a short read or a mismatch removes the temporary file
and raises `DownloadError` naming the URL; mirrors are tried in order. An archive is checked
before anything is extracted: only regular files and folders under its one top folder (no
absolute paths, no ``..``, no links or devices); it is extracted into a temporary folder that
is then renamed into place.

`SOURCES` maps a dataset to its `RawFile` entries (tests swap it for a local server).
Checksums: Fashion-MNIST MD5s from the README of github.com/zalandoresearch/fashion-mnist,
SHA-256s and sizes from tensorflow-datasets' checksum list for the same URLs; CIFAR-100's MD5
from https://www.cs.toronto.edu/~kriz/cifar.html.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from mtjax._tqdm import tqdm

__all__ = ["DEFAULT_CACHE_DIR", "SOURCES", "TIMEOUT_S", "DownloadError", "RawFile", "download_raw"]

StrPath = str | os.PathLike[str]

#: Where `mtjax.data.load(download=True)` puts files when neither ``data_dir`` nor
#: ``$MTJAX_DATA_DIR`` is given.
DEFAULT_CACHE_DIR = Path("~/.cache/mtjax")

#: Default timeout (s) of each network operation (connect, each read).
TIMEOUT_S = 60.0

_CHUNK = 1 << 20


class DownloadError(OSError):
    """A download failed (network, short read, checksum) or an archive is unsafe; the message
    names the URL or file."""


@dataclasses.dataclass(frozen=True)
class RawFile:
    """One published file: ``path`` relative to the download folder, mirror ``urls`` (tried
    in order), the published ``md5`` and, when known, ``sha256`` and ``size`` (bytes).
    ``extract``: a ``.tar.gz`` whose members all lie in this top folder; it is extracted
    into the download folder and then deleted."""

    path: str
    urls: tuple[str, ...]
    md5: str
    sha256: str | None = None
    size: int | None = None
    extract: str | None = None


_FASHION_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)


def _fashion(name: str, md5: str, sha256: str, size: int) -> RawFile:
    urls = tuple(base + name for base in _FASHION_MIRRORS)
    return RawFile(f"fashion-mnist/{name}", urls, md5, sha256, size)


SOURCES: dict[str, tuple[RawFile, ...]] = {
    "fashion_mnist": (
        _fashion(
            "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84", 26421880,
        ),
        _fashion(
            "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe",
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845", 29515,
        ),
        _fashion(
            "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79",
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073", 4422102,
        ),
        _fashion(
            "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310",
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5", 5148,
        ),
    ),
    "cifar100": (
        RawFile(
            "cifar-100-python.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
            "eb9058c3a382ffc7106e4002c42a8d85",
            extract="cifar-100-python",
        ),
    ),
}  # fmt: skip


def download_raw(
    name: str,
    folder: StrPath,
    *,
    progress: bool | None = None,
    timeout: float | None = None,
) -> Path:
    """Download the raw files of dataset ``name`` (a key of `SOURCES`) into ``folder``
    (created if missing) and return ``folder``. Files already there with the published
    checksums are kept. ``progress``: tqdm bars (None: only on a terminal). ``timeout``: of
    each network operation, in seconds (default `TIMEOUT_S`). Raises `DownloadError`."""
    timeout = TIMEOUT_S if timeout is None else float(timeout)
    if name not in SOURCES:
        raise ValueError(f"name: no download for {name!r}; known: {', '.join(sorted(SOURCES))}")
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    fetched: list[tuple[Path, Path]] = []
    try:
        for raw in SOURCES[name]:
            dest = folder / raw.path
            if raw.extract is None and dest.is_file() and _matches(dest, raw):
                continue
            fetched.append((_fetch(raw, dest, progress, timeout), dest))
        # every file verified: rename them all (a set is complete or absent together)
        for tmp, dest in fetched:
            os.replace(tmp, dest)
        fetched = []
    finally:
        for tmp, _ in fetched:
            tmp.unlink(missing_ok=True)
    for raw in SOURCES[name]:
        if raw.extract is not None:
            _extract(folder / raw.path, folder, raw.extract)
    return folder


def _digests(path: Path) -> tuple[str, str, int]:
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest(), path.stat().st_size


def _mismatch(raw: RawFile, md5: str, sha256: str, size: int) -> str | None:
    """Why a file with these digests is not ``raw`` (None: it is)."""
    if raw.size is not None and size != raw.size:
        return f"{size} bytes, the published size is {raw.size}"
    if md5 != raw.md5.lower():
        return f"MD5 {md5} does not match the published {raw.md5}"
    if raw.sha256 is not None and sha256 != raw.sha256.lower():
        return f"SHA-256 {sha256} does not match the published {raw.sha256}"
    return None


def _matches(path: Path, raw: RawFile) -> bool:
    return _mismatch(raw, *_digests(path)) is None


def _fetch(raw: RawFile, dest: Path, progress: bool | None, timeout: float) -> Path:
    """A verified temporary copy of ``raw`` next to ``dest``, from the first mirror that
    works."""
    errors = []
    for url in raw.urls:
        try:
            return _stream(url, raw, dest, progress, timeout)
        except DownloadError as e:
            errors.append(str(e))
    raise DownloadError(f"cannot download {raw.path}: " + "; ".join(errors))


def _stream(url: str, raw: RawFile, dest: Path, progress: bool | None, timeout: float) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(name)
    try:
        md5, sha = hashlib.md5(), hashlib.sha256()
        n = 0
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    length = resp.headers.get("Content-Length")
                    want = int(length) if length and length.isdigit() else None
                    bar = tqdm(
                        total=want or raw.size, desc=dest.name, unit="B", unit_scale=True,
                        unit_divisor=1024, leave=False,
                        disable=None if progress is None else not progress,
                    )  # fmt: skip
                    with bar:
                        while chunk := resp.read(_CHUNK):
                            out.write(chunk)
                            md5.update(chunk)
                            sha.update(chunk)
                            n += len(chunk)
                            bar.update(len(chunk))
            except (OSError, http.client.HTTPException, ValueError) as e:
                raise DownloadError(f"{url}: {type(e).__name__}: {e}") from e
            out.flush()
            os.fsync(out.fileno())
        if want is not None and n != want:
            raise DownloadError(f"{url}: truncated download: {n} of {want} bytes")
        why = _mismatch(raw, md5.hexdigest(), sha.hexdigest(), n)
        if why is not None:
            raise DownloadError(f"{url}: {why}; the download was deleted")
        os.chmod(tmp, 0o666 & ~_umask())
        return tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_member(member: tarfile.TarInfo, root: str, archive: Path) -> None:
    path = PurePosixPath(member.name)
    parts = path.parts
    if path.is_absolute() or ".." in parts or not parts or parts[0] != root:
        raise DownloadError(
            f"{archive}: unsafe archive member {member.name!r}: every member must lie in "
            f"{root}/ (no absolute paths, no '..'); nothing was extracted"
        )
    if not (member.isfile() or member.isdir()):
        raise DownloadError(
            f"{archive}: unsafe archive member {member.name!r}: only regular files and "
            "folders are extracted (no links or devices); nothing was extracted"
        )


def _extract(archive: Path, folder: Path, root: str) -> Path:
    """Extract ``archive`` (all members under ``root``) into ``folder/root``, then delete
    it. ``folder/root`` must not hold files yet."""
    target = folder / root
    tmpdir = Path(tempfile.mkdtemp(dir=folder, prefix=f".{root}.", suffix=".tmp"))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, root, archive)
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmpdir, members=members, **kwargs)
        if not (tmpdir / root).is_dir():
            raise DownloadError(f"{archive}: no {root}/ folder in the archive")
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if target.exists():
            raise DownloadError(f"{archive}: {target} already exists; remove it to extract")
        os.replace(tmpdir / root, target)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise DownloadError(f"{archive}: cannot extract: {type(e).__name__}: {e}") from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        archive.unlink(missing_ok=True)
    return target
