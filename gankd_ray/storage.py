"""Paths that may be local folders or pyarrow filesystem URIs (s3://, gs://, file://)."""

from __future__ import annotations

import os
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
    """Raise ``OSError`` with a clear message when ``uri`` cannot hold new files."""
    probe = join(uri, ".gankd_write_probe")
    try:
        write_text(probe, "ok")
        fs, path = resolve(probe)
        fs.delete_file(path)
    except OSError as err:
        raise OSError(f"{uri}: storage is not writable ({err.strerror or err})") from None
