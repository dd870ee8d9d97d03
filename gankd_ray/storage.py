"""Paths that may be local folders or pyarrow filesystem URIs (s3://, gs://, file://)."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


def has_scheme(uri: str) -> bool:
    return "://" in uri


def normalize_uri(uri: str) -> str:
    """Local paths become absolute (Ray workers do not share the driver's working directory)."""
    return uri if has_scheme(uri) else str(Path(uri).expanduser().resolve())


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(normalize_uri(uri))


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(uri: str) -> str:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def write_text(uri: str, text: str) -> None:
    """Atomic for local paths (temp + rename); object stores replace whole objects anyway."""
    if not has_scheme(uri):
        from gankd_ray.utils import atomic_write_text

        atomic_write_text(uri, text)
        return
    fs, path = resolve(uri)
    fs.create_dir(os.path.dirname(path), recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode())


def check_writable(uri: str) -> None:
    """Raise ``OSError`` with a clear message when ``uri`` cannot hold new files.

    Leaves nothing behind: a local path is probed in its nearest existing folder (so a refused run
    does not leave empty run folders), an object store with a probe object that is deleted again.
    """
    try:
        if has_scheme(uri):
            _probe_object(join(uri, ".gankd_write_probe"))
        else:
            _probe_local_folder(Path(normalize_uri(uri)))
    except OSError as err:
        raise OSError(f"{uri}: storage is not writable ({err.strerror or err})") from None


def _probe_object(uri: str) -> None:
    write_text(uri, "ok")
    fs, path = resolve(uri)
    fs.delete_file(path)


def _probe_local_folder(path: Path) -> None:
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
