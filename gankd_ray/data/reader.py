"""Read a prepared dataset from any pyarrow filesystem URI, sharded by rank.

Rank ``r`` of ``W`` gets the contiguous block of global rows ``[floor(r*N/W), floor((r+1)*N/W))``
(files sorted by name, rows in file order): shares are disjoint, cover the split once, differ in
size by at most one, and a rank reads only the row groups that hold its block, not the whole split.
The writer shuffled images before sharding (or they are i.i.d.), so a block is a fair sample.
"""

from __future__ import annotations

import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gankd_ray import storage
from gankd_ray.data.records import FORMAT_VERSION, DatasetError


def open_location(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, root path inside it)`` of a dataset location; ``DatasetError`` when unreachable."""
    try:
        storage.check_readable(uri)
        return storage.resolve(uri)
    except OSError as err:
        raise DatasetError(f"cannot open dataset location: {err}") from None


def read_dataset_json(uri: str, *parts: str) -> Any:
    """A JSON file of the prepared dataset at ``uri``; ``DatasetError`` naming it when missing or invalid."""
    location = storage.join(uri, *parts)
    try:
        return storage.read_json(location)
    except FileNotFoundError:
        raise DatasetError(f"{location}: file not found (is this a prepared dataset?)") from None
    except OSError as err:
        raise DatasetError(str(err)) from None


def read_dataset_info(uri: str) -> dict[str, Any]:
    """``dataset.json`` of the prepared dataset at ``uri`` (classes, per-split counts, source...)."""
    open_location(uri)  # an unreachable endpoint, a missing bucket or bad credentials say so, not "not found"
    info = read_dataset_json(uri, "dataset.json")
    if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{storage.join(uri, 'dataset.json')}: not a format_version {FORMAT_VERSION} prepared dataset")
    return info


def count_rows(uri: str, split: str) -> int:
    """Rows (images) in ``split``, from the parquet footers only."""
    filesystem, root = open_location(uri)
    return sum(meta.num_rows for _, meta in _shard_metadata(filesystem, root, split))


def rank_range(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s global rows; the ranges of all ranks tile ``[0, num_rows)``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    return rank * num_rows // world_size, (rank + 1) * num_rows // world_size


def read_split(uri: str, split: str, rank: int = 0, world_size: int = 1) -> list[dict[str, Any]]:
    """This rank's share of ``split``.

    Returns:
        One dict per image: ``image_id`` int, ``file_name`` str, ``width``/``height`` int,
        ``image`` bytes (encoded file), ``boxes`` float32[N, 4] xyxy in original pixels,
        ``labels`` int64[N] category ids ``1..K``, ``iscrowd`` bool[N].
    """
    filesystem, root = open_location(uri)
    shards = _shard_metadata(filesystem, root, split)
    start, stop = rank_range(sum(meta.num_rows for _, meta in shards), rank, world_size)
    tables = []
    offset = 0  # global index of the current row group's first row
    for path, meta in shards:
        groups = []
        first_row = offset
        for group in range(meta.num_row_groups):
            group_rows = meta.row_group(group).num_rows
            if offset < stop and offset + group_rows > start:
                groups.append(group)
            offset += group_rows
        if groups:
            tables.append(_read_row_groups(filesystem, path, groups, first_row, meta, start, stop))
    return [row for table in tables for row in _rows(table)]


def _shard_metadata(filesystem: pafs.FileSystem, root: str, split: str) -> list[tuple[str, pq.FileMetaData]]:
    folder = posixpath.join(root, "parquet", split)
    infos = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    paths = sorted(info.path for info in infos if info.type == pafs.FileType.File and info.path.endswith(".parquet"))
    if not paths:
        raise DatasetError(f"{folder}: no parquet shards for split {split!r}")
    shards = []
    for path in paths:
        with filesystem.open_input_file(path) as handle:
            shards.append((path, pq.ParquetFile(handle).metadata))
    return shards


def _read_row_groups(
    filesystem: pafs.FileSystem,
    path: str,
    groups: list[int],
    first_row: int,
    meta: pq.FileMetaData,
    start: int,
    stop: int,
) -> pa.Table:
    """Rows ``[start, stop)`` (global indices) found in row groups ``groups`` of the file at ``path``."""
    with filesystem.open_input_file(path) as handle:
        table = pq.ParquetFile(handle).read_row_groups(groups)
    table_start = first_row + sum(meta.row_group(g).num_rows for g in range(groups[0]))
    lo = max(start - table_start, 0)
    hi = min(stop - table_start, table.num_rows)
    return table.slice(lo, hi - lo)


def _rows(table: pa.Table) -> list[dict[str, Any]]:
    rows = []
    for row in table.to_pylist():
        rows.append(
            {
                "image_id": int(row["image_id"]),
                "file_name": row["file_name"],
                "width": int(row["width"]),
                "height": int(row["height"]),
                "image": row["image"],
                "boxes": np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4),
                "labels": np.asarray(row["labels"], dtype=np.int64),
                "iscrowd": np.asarray(row["iscrowd"], dtype=bool),
            }
        )
    return rows
