"""Node-local cache of remote inputs: a remote dataset or teacher checkpoint is downloaded once per node.

Every Ray Train worker of every trial asks for its dataset and teacher through :func:`local_dataset` and
:func:`local_file`. A local location (a path or ``file://``) is returned as it is and read in place. A
remote one (``s3://``...) is copied once into the node's cache folder and every later caller on the node
reads the copy, so a 64-trial search reads a dataset from storage once per node, not 64 times.

Layout of the cache folder (``data.cache_dir``, else ``$GANKD_RAY_CACHE``, else ``~/.cache/gankd-ray``, resolved
on each node): ``datasets/<key>/`` and ``files/<key>/<name>``, each with its ``<key>.lock`` beside it.

- Key of a dataset: ``<inputs_sha256>-<digest of dataset.json>``. ``inputs_sha256`` alone does not cover the
  split assignment (a COCO file cut by other fractions keeps it), so the digest of the whole ``dataset.json``
  (splits, counts, creation time) tells two preparations of the same inputs apart. Only what training reads
  is copied: ``dataset.json``, ``annotations/`` and ``parquet/`` (``images/`` repeats the parquet image
  bytes).
- Key of a file: its URI, size and modification time (one metadata request; no content hash to compute).
- One download per key: an ``fcntl.flock`` on the key's lock file serialises the processes of a node
  (trials, workers, loader processes); the copy goes into a staging folder beside the target, is checked
  against the remote listing (every size, and ``dataset.json`` / the file's metadata unchanged), gets the
  completion marker last and is renamed into place. A folder without the marker (a crash, a hand edit) is
  removed and downloaded again; staging folders left by dead processes are swept under the lock.
- Full disk: when the remote bytes do not fit in the free space minus the reserve (``data.cache_reserve_mb``),
  or the disk fills up during the copy (ENOSPC/EDQUOT), one warning is logged, the staging folder removed,
  and the remote URI is returned: the caller streams from storage as before.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import posixpath
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from gankd_ray import storage

log = logging.getLogger(__name__)

CACHE_ENV = "GANKD_RAY_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/gankd-ray"
DEFAULT_RESERVE_MB = 1024  # free space a cached copy must leave on the node's disk
MARKER = ".gankd-cache-complete"  # written last into a staged copy: present means whole
DATASET_PARTS = ("dataset.json", "annotations", "parquet")  # what training reads of a prepared dataset
COPY_THREADS = 8  # object stores serve parallel GETs much faster than one stream
CHUNK_BYTES = 8 << 20
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Fetched:
    """Where to read an input from, and whether this call downloaded it (``False`` for a hit, a local input
    or the full-disk fallback)."""

    location: str
    downloaded: bool


def cache_root(cache_dir: str | None = None) -> Path:
    """The node's cache folder: ``cache_dir`` if given, else ``$GANKD_RAY_CACHE``, else ``~/.cache/gankd-ray``
    (``~`` is this node's home)."""
    chosen = cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser().absolute()


def local_dataset(uri: str, cache_dir: str | None = None, reserve_mb: float = DEFAULT_RESERVE_MB) -> str:
    """A location of the prepared dataset ``uri`` to read on this node: ``uri`` itself when local, else the
    node's cached copy (downloaded by the first caller), or ``uri`` when the copy does not fit."""
    return fetch_dataset(uri, cache_dir, reserve_mb).location


def local_file(uri: str, cache_dir: str | None = None, reserve_mb: float = DEFAULT_RESERVE_MB) -> str:
    """Like :func:`local_dataset` for one file (a teacher's ``model.pt``). A remote file that does not exist,
    or whose filesystem reports no modification time, is returned as it is, for its reader to handle."""
    return fetch_file(uri, cache_dir, reserve_mb).location


def fetch_dataset(uri: str, cache_dir: str | None = None, reserve_mb: float = DEFAULT_RESERVE_MB) -> Fetched:
    """:func:`local_dataset`, saying whether this call downloaded it. ``DatasetError`` when the remote is not a
    prepared dataset, ``CacheError`` when the copy does not match it."""
    from gankd_ray.data.reader import read_dataset_info

    if storage.is_local(uri):
        return Fetched(uri, False)
    info = read_dataset_info(uri)
    target = cache_root(cache_dir) / "datasets" / _dataset_key(uri, info)

    def download(staging: Path) -> dict[str, int]:
        listing = _remote_listing(uri, DATASET_PARTS)
        _check_fits(target, listing, reserve_mb)
        _copy_files(uri, storage.resolve(uri)[1], listing, staging)
        _check_copy(uri, staging, listing)
        if json.loads((staging / "dataset.json").read_bytes()) != info:
            _mismatch(uri, "dataset.json changed during the copy")
        return listing

    return _fetch_once(target, uri, download, target)


def fetch_file(uri: str, cache_dir: str | None = None, reserve_mb: float = DEFAULT_RESERVE_MB) -> Fetched:
    """:func:`local_file`, saying whether this call downloaded it."""
    if storage.is_local(uri):
        return Fetched(uri, False)
    before = _remote_info(uri)
    if before.type != pafs.FileType.File or before.mtime_ns is None:
        return Fetched(uri, False)
    name = posixpath.basename(before.path)
    target = cache_root(cache_dir) / "files" / _digest(f"{uri}\n{before.size}\n{before.mtime_ns}")[:32]

    def download(staging: Path) -> dict[str, int]:
        listing = {name: before.size}
        _check_fits(target, listing, reserve_mb)
        _copy_files(uri, posixpath.dirname(before.path), listing, staging)
        _check_copy(uri, staging, listing)
        after = _remote_info(uri)
        if (after.size, after.mtime_ns) != (before.size, before.mtime_ns):
            _mismatch(uri, "the file changed during the copy")
        return listing

    return _fetch_once(target, uri, download, target / name)


# --------------------------------------------------------------------------------------------
# one locked download per key


class CacheError(storage.StorageError):
    """The node cache cannot be used, or its copy does not match storage; one line naming the location."""


class _NoRoom(Exception):
    """The copy does not fit on this node's disk; the message says by how much."""


def _fetch_once(target: Path, uri: str, download: Callable[[Path], dict[str, int]], cached: Path) -> Fetched:
    """``cached`` (a path inside ``target``) once ``target`` is complete, downloading it under the key's lock
    if no one has; ``uri`` itself when it does not fit on this node's disk."""
    if _is_complete(target):
        return Fetched(str(cached), False)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target.with_name(target.name + ".lock")):
            if _is_complete(target):  # another process finished it while this one waited
                return Fetched(str(cached), False)
            _sweep(target)
            _download_into_place(target, uri, download)
    except _NoRoom as err:
        return _stream_instead(uri, str(err))
    except storage.StorageError:
        raise
    except OSError as err:
        if err.errno in DISK_FULL:
            return _stream_instead(uri, f"the disk filled up during the copy ({err.strerror})")
        raise CacheError(
            f"{target.parent}: cannot use the node cache ({err.strerror or err}); set data.cache_dir or "
            f"{CACHE_ENV} to a writable folder"
        ) from None
    return Fetched(str(cached), True)


def _download_into_place(target: Path, uri: str, download: Callable[[Path], dict[str, int]]) -> None:
    staging = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.staging")
    started = time.monotonic()
    try:
        staging.mkdir()
        listing = download(staging)
        marker = {"source": uri, "files": listing, "downloaded_at": time.time()}
        with open(staging / MARKER, "w") as out:
            out.write(json.dumps(marker, indent=2) + "\n")
            os.fsync(out.fileno())
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("%s: cached at %s (%d bytes, %.1f s)", uri, target, sum(listing.values()), time.monotonic() - started)


def _stream_instead(uri: str, why: str) -> Fetched:
    log.warning("%s: not cached on this node, %s; reading it from storage instead", uri, why)
    return Fetched(uri, False)


def _is_complete(target: Path) -> bool:
    return (target / MARKER).is_file()


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_file``, held by this process until the block ends (or it dies). The
    file stays: removing it would let two processes lock two different files of the same name."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _sweep(target: Path) -> None:
    """Under the key's lock: an incomplete ``target`` and every staging folder of the key are leftovers of
    dead processes (a live one would hold the lock)."""
    leftovers = [target] if target.exists() else []
    leftovers += target.parent.glob(f".{glob.escape(target.name)}.*.staging")
    for folder in leftovers:
        log.info("%s: removing an incomplete cached copy", folder)
        shutil.rmtree(folder, ignore_errors=True)


def _check_fits(target: Path, listing: dict[str, int], reserve_mb: float) -> None:
    needed = sum(listing.values())
    free = shutil.disk_usage(target.parent).free
    reserve = int(reserve_mb * 2**20)
    if needed > free - reserve:
        raise _NoRoom(
            f"{_mb(needed)} needed, {_mb(free)} free in {target.parent} and {_mb(reserve)} kept free "
            "(data.cache_reserve_mb)"
        )


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


# --------------------------------------------------------------------------------------------
# remote side


def _dataset_key(uri: str, info: dict) -> str:
    from gankd_ray.data.records import DatasetError

    inputs = info.get("inputs_sha256")
    if not isinstance(inputs, str) or not SHA256_HEX.fullmatch(inputs):
        raise DatasetError(f"{storage.join(uri, 'dataset.json')}: inputs_sha256 is missing or not a sha256 digest")
    return f"{inputs}-{_digest(json.dumps(info, sort_keys=True))[:12]}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _remote_info(uri: str) -> pafs.FileInfo:
    filesystem, path = storage.resolve(uri)
    try:
        return filesystem.get_file_info(path)
    except OSError as err:
        raise storage.StorageError(f"{uri}: {storage.reason(err)}") from None


def _remote_listing(uri: str, parts: tuple[str, ...]) -> dict[str, int]:
    """``{path relative to uri: size}`` of every file of ``parts`` (files or folders) under ``uri``."""
    filesystem, root = storage.resolve(uri)
    listing: dict[str, int] = {}
    try:
        for part in parts:
            info = filesystem.get_file_info(posixpath.join(root, part))
            if info.type == pafs.FileType.Directory:
                found = filesystem.get_file_info(pafs.FileSelector(info.path, recursive=True))
            else:
                found = [info]
            listing.update({item.path[len(root) + 1 :]: item.size for item in found if item.type == pafs.FileType.File})
    except OSError as err:
        raise storage.StorageError(f"{uri}: cannot list ({storage.reason(err)})") from None
    return listing


def _copy_files(uri: str, root: str, listing: dict[str, int], staging: Path) -> None:
    """Every file of ``listing`` from under ``root`` (a path in ``uri``'s filesystem) to the same relative path
    under ``staging``, in parallel. Local write errors keep their errno (a full disk); remote ones are
    ``StorageError`` naming ``uri``."""
    filesystem, _ = storage.resolve(uri)

    def copy(relative: str) -> None:
        local = staging / relative
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            stream = filesystem.open_input_stream(posixpath.join(root, relative))
        except OSError as err:
            raise storage.StorageError(f"{uri}: cannot read {relative} ({storage.reason(err)})") from None
        with stream, open(local, "wb") as out:
            while chunk := _read_chunk(stream, uri, relative):
                out.write(chunk)
            os.fsync(out.fileno())  # on disk before the marker is: a node crash leaves no short "complete" file

    pool = ThreadPoolExecutor(max_workers=min(COPY_THREADS, max(1, len(listing))))
    try:
        for copying in [pool.submit(copy, relative) for relative in sorted(listing)]:
            copying.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a failure, copies not yet started never start


def _read_chunk(stream, uri: str, relative: str) -> bytes:
    try:
        return stream.read(CHUNK_BYTES)
    except OSError as err:
        raise storage.StorageError(f"{uri}: cannot read {relative} ({storage.reason(err)})") from None


def _check_copy(uri: str, staging: Path, listing: dict[str, int]) -> None:
    for relative, size in sorted(listing.items()):
        copied = (staging / relative).stat().st_size
        if copied != size:
            _mismatch(uri, f"{relative} has {copied} bytes, the remote listing {size}")


def _mismatch(uri: str, detail: str) -> None:
    raise CacheError(f"{uri}: the node cache's copy does not match storage ({detail}); the copy was removed")
