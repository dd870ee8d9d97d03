"""Dataset locations as pyarrow filesystems: a plain local path, ``file://``, ``s3://``, ``gs://``...

Every worker of a cluster opens the same URI on shared storage, so nothing is copied per node.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow.fs as pafs

from gankd_ray import storage
from gankd_ray.data.records import DatasetError


def open_location(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, root path inside it)`` for a dataset URI or a local (possibly relative) path."""
    try:
        filesystem, root = storage.resolve(uri)
    except (ValueError, OSError) as err:  # pyarrow.ArrowInvalid is a ValueError
        raise DatasetError(f"{uri}: cannot open dataset location: {err}") from None
    return filesystem, root.rstrip("/") or "/"


def read_bytes(filesystem: pafs.FileSystem, path: str) -> bytes:
    """The whole file, or ``DatasetError`` naming it when it is missing."""
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found (is this a prepared dataset?)") from None


def read_json(filesystem: pafs.FileSystem, path: str) -> Any:
    try:
        return json.loads(read_bytes(filesystem, path))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: invalid JSON: {err}") from None
