"""The one storage seam: every file gankd-ray reads or writes goes through here.

A location is a local path (relative or absolute), a ``file://`` URI, or any pyarrow filesystem URI
(``s3://``, ``gs://``). Locations are normalised once, where the user typed them (:func:`normalize_uri`):
a relative path becomes absolute against the caller's working directory, so no Ray worker's working
directory ever matters. S3-compatible endpoints (MinIO, Ceph) are chosen the standard way, by
``AWS_ENDPOINT_URL`` and the usual ``AWS_*`` credential variables, which pyarrow (and so Ray's own
storage layer) reads too.

Writes never leave half a file: local files go through a temp file and a rename; an object store replaces
whole objects. A folder that must appear whole (an export, a report) is published by
:func:`publish_dir`: every file first, the file that marks it complete last.

Failures are :class:`StorageError` (an ``OSError``) with one line naming the location and the reason.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from gankd_ray.utils import atomic_write

FILE_SCHEME = "file://"
# pyarrow filesystem type -> URI scheme, to turn a (filesystem, path) pair (Ray checkpoints) into a URI.
SCHEMES = {"s3": "s3://", "gcs": "gs://", "hdfs": "hdfs://"}
# Short reasons for the AWS SDK's error codes pyarrow reports ("AWS Error NO_SUCH_BUCKET during ...").
AWS_REASONS = {
    "NO_SUCH_BUCKET": "the bucket does not exist",
    "ACCESS_DENIED": "access denied (check the credentials and the bucket's policy)",
    "INVALID_ACCESS_KEY_ID": "invalid credentials (AWS_ACCESS_KEY_ID is not known to the endpoint)",
    "SIGNATURE_DOES_NOT_MATCH": "invalid credentials (AWS_SECRET_ACCESS_KEY does not match)",
    "NETWORK_CONNECTION": "cannot reach the storage endpoint",
    "UNKNOWN": "the storage endpoint refused the request",
}
MAX_REASON = 300  # characters of a reason echoed in an error line


class StorageError(OSError):
    """A location cannot be read or written; the message is one line naming it."""


def has_scheme(uri: str) -> bool:
    return "://" in uri


def is_local(uri: str) -> bool:
    return not has_scheme(uri) or uri.startswith(FILE_SCHEME)


def normalize_uri(uri: str) -> str:
    """Local paths become absolute (``~`` expanded); ``file://`` and remote URIs are kept as typed."""
    return uri if has_scheme(uri) else str(Path(uri).expanduser().resolve())


def local_path(uri: str) -> Path:
    """The local path of a local location (a plain path or ``file://``)."""
    if not is_local(uri):
        raise ValueError(f"{uri}: not a local location")
    return Path(uri[len(FILE_SCHEME) :] if uri.startswith(FILE_SCHEME) else normalize_uri(uri))


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)``; ``StorageError`` when the URI names no usable filesystem."""
    if is_local(uri):
        return pafs.LocalFileSystem(), str(local_path(uri))
    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as err:  # pyarrow.ArrowInvalid is a ValueError
        raise StorageError(f"{uri}: {reason(err)}") from None
    return filesystem, path.rstrip("/") or "/"


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def uri_of(filesystem: pafs.FileSystem, path: str) -> str:
    """The full location of ``path`` in ``filesystem`` (e.g. a Ray checkpoint's): ``s3://bucket/key``, or the
    absolute local path."""
    scheme = SCHEMES.get(filesystem.type_name)
    if scheme is None or has_scheme(path):
        return path
    return scheme + path.lstrip("/")


def is_outage(err: BaseException) -> bool:
    """Whether ``err`` is storage failing to answer (the AWS SDK's errors that pyarrow raises, or one of ours
    other than not-found) rather than the bytes it returned being wrong: an outage ends a run as a storage
    failure that a rerun resumes from, a damaged file as bad input."""
    if isinstance(err, StorageError):
        return not isinstance(err, FileNotFoundError)
    return "AWS Error" in str(err)


def reason(err: BaseException) -> str:
    """A short, one-line cause for a storage failure (the AWS SDK's codes get plain words)."""
    raw = str(err)
    text = " ".join(raw.split())
    code = re.search(r"AWS Error ([A-Z_]+)", text)
    if code and code.group(1) in AWS_REASONS:
        said = AWS_REASONS[code.group(1)]
        if code.group(1) == "NETWORK_CONNECTION" and os.environ.get("AWS_ENDPOINT_URL"):
            said += f" AWS_ENDPOINT_URL={os.environ['AWS_ENDPOINT_URL']}"
        return said
    if isinstance(err, FileNotFoundError):
        return "not found"
    ours = re.search(r"StorageError: (.+)", raw)  # one of ours, rebuilt by Ray inside a longer traceback
    if ours:
        text = ours.group(1).strip()
    text = text or type(err).__name__
    return text if len(text) <= MAX_REASON else text[:MAX_REASON] + "..."


def _info(uri: str) -> pafs.FileInfo:
    filesystem, path = resolve(uri)
    try:
        return filesystem.get_file_info(path)
    except OSError as err:
        raise StorageError(f"{uri}: {reason(err)}") from None


def exists(uri: str) -> bool:
    return _info(uri).type != pafs.FileType.NotFound


def is_file(uri: str) -> bool:
    return _info(uri).type == pafs.FileType.File


def is_dir(uri: str) -> bool:
    # An object store has no empty folders: a "folder" exists when objects live under it.
    return _info(uri).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    """The whole file; ``FileNotFoundError`` (a ``StorageError``) when it does not exist."""
    filesystem, path = resolve(uri)
    try:
        if filesystem.get_file_info(path).type != pafs.FileType.File:
            raise _NotFound(f"{uri}: file not found")
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except _NotFound:
        raise
    except OSError as err:
        raise StorageError(f"{uri}: cannot read ({reason(err)})") from None


class _NotFound(StorageError, FileNotFoundError):
    """A file that does not exist: both a ``StorageError`` and a ``FileNotFoundError``."""


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def read_json(uri: str) -> Any:
    try:
        return json.loads(read_bytes(uri))
    except (ValueError, RecursionError) as err:
        raise StorageError(f"{uri}: invalid JSON ({reason(err)})") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic for local paths (temp + rename); object stores replace whole objects anyway."""
    try:
        if is_local(uri):
            atomic_write(local_path(uri), lambda tmp: tmp.write_bytes(data))
            return
        filesystem, path = resolve(uri)
        with filesystem.open_output_stream(path) as stream:
            stream.write(data)
    except StorageError:
        raise
    except OSError as err:
        if getattr(err, "errno", None) is not None and is_local(uri):
            raise  # errno kept: callers tell a full disk from other failures
        raise StorageError(f"{uri}: cannot write ({reason(err)})") from None


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def write_json(uri: str, data: Any) -> None:
    write_text(uri, json.dumps(data, indent=2, default=str) + "\n")


def delete(uri: str) -> None:
    """Remove a file or a whole folder; nothing there is fine."""
    filesystem, path = resolve(uri)
    try:
        kind = filesystem.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            filesystem.delete_dir(path)
        elif kind == pafs.FileType.File:
            filesystem.delete_file(path)
    except OSError as err:
        raise StorageError(f"{uri}: cannot delete ({reason(err)})") from None


def publish_dir(staging: str | Path, uri: str, marker: str) -> str:
    """Replace the folder ``uri`` by the local folder ``staging``, so a reader never sees it half-written.

    Local: the staged copy is renamed into place. Object store: the old ``marker`` file goes first (the old
    folder stops counting as complete), then the other files, then the new ``marker``. Readers treat a folder
    without ``marker`` as incomplete. ``staging`` is left as it was.
    """
    staging = Path(staging)
    if not (staging / marker).is_file():
        raise ValueError(f"{staging}: no {marker} to publish")
    if is_local(uri):
        _publish_local(staging, local_path(uri))
        return uri
    delete(join(uri, marker))
    delete(uri)
    for file in sorted(p for p in staging.rglob("*") if p.is_file() and p != staging / marker):
        write_bytes(join(uri, file.relative_to(staging).as_posix()), file.read_bytes())
    write_bytes(join(uri, marker), (staging / marker).read_bytes())
    return uri


def _publish_local(staging: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    copy = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.staging")
    shutil.copytree(staging, copy)
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
    try:
        if target.exists():
            target.rename(old)
        copy.rename(target)
    except BaseException:
        shutil.rmtree(copy, ignore_errors=True)
        if old.exists() and not target.exists():
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def staging_dir(prefix: str = "gankd-") -> tempfile.TemporaryDirectory:
    """A local scratch folder for files that :func:`publish_dir` then publishes."""
    return tempfile.TemporaryDirectory(prefix=prefix)


# --------------------------------------------------------------------------------------------
# torch files through streams (still weights-only on load)


def save_torch(obj: Any, uri: str) -> None:
    import torch

    if is_local(uri):  # straight to disk: no in-memory copy of a large checkpoint
        atomic_write(local_path(uri), lambda tmp: torch.save(obj, tmp))
        return
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(uri, buffer.getvalue())


def open_for_torch(uri: str) -> Any:
    """What ``torch.load``/``torch.jit.load`` read: a local path, or the object's bytes in memory."""
    if is_local(uri):
        path = local_path(uri)
        if not path.is_file():
            raise _NotFound(f"{uri}: file not found")
        return str(path)
    return io.BytesIO(read_bytes(uri))


# --------------------------------------------------------------------------------------------
# checks made before any Ray work


def check_readable(uri: str) -> None:
    """``StorageError`` when the location's filesystem cannot be reached or listed (endpoint, bucket,
    credentials); a missing file under a reachable location is the caller's to report."""
    if is_local(uri):
        return
    filesystem, path = resolve(uri)
    bucket = path.split("/", 1)[0]
    try:
        if filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageError(f"{uri}: {AWS_REASONS['NO_SUCH_BUCKET']} ({bucket})")
        filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except StorageError:
        raise
    except OSError as err:
        raise StorageError(f"{uri}: {reason(err)}") from None


def check_writable(uri: str) -> None:
    """Raise ``StorageError`` with a clear message when ``uri`` cannot hold new files.

    Leaves nothing behind: a local path is probed in its nearest existing folder (so a refused run
    does not leave empty run folders), an object store with a probe object that is deleted again.
    """
    try:
        if is_local(uri):
            _probe_local_folder(local_path(uri))
        else:
            check_readable(uri)
            probe = join(uri, f".gankd_write_probe.{uuid.uuid4().hex[:8]}")
            write_bytes(probe, b"ok")
            delete(probe)
    except OSError as err:
        detail = str(err).split(": ", 1)[-1] if isinstance(err, StorageError) else (err.strerror or str(err))
        raise StorageError(f"{uri}: storage is not writable ({detail})") from None


def _probe_local_folder(path: Path) -> None:
    import errno

    folder = path
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".gankd_write_probe.", dir=folder)
        try:
            os.write(fd, b"ok")  # a full file system fails here (ENOSPC), not at mkstemp
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise OSError(err.errno, f"cannot write in {folder}: {err.strerror or err}") from None
