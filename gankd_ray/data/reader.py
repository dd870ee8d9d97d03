"""Read a prepared dataset from any pyarrow filesystem URI, sharded by rank.

Rank ``r`` of ``W`` gets the contiguous block of global rows ``[floor(r*N/W), floor((r+1)*N/W))``
(files sorted by name, rows in file order): shares are disjoint, cover the split once, differ in
size by at most one, and a rank reads only the row groups that hold its block, not the whole split.
The writer shuffled images before sharding (or they are i.i.d.), so a block is a fair sample.

Iterating a share reads the next row groups in a background thread while the caller consumes the current
one (``read_ahead``), so a remote store's latency overlaps training instead of stalling it; the rows, their
order and the errors raised are those of reading one row group at a time on the caller's thread.
"""

from __future__ import annotations

import itertools
import posixpath
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gankd_ray import storage
from gankd_ray.data.records import FORMAT_VERSION, DatasetError
from gankd_ray.utils import first_line

# Row groups read ahead of the one being consumed: one hides a steady store's latency, the second a slow
# request now and then; each costs a row group of memory (64 rows of encoded images).
READ_AHEAD_ROW_GROUPS = 2
READ_AHEAD_THREAD = "gankd-read-ahead"  # name prefix of the background reader thread
T = TypeVar("T")
R = TypeVar("R")


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
        location = storage.join(uri, "dataset.json")
        raise DatasetError(f"{location}: not a format_version {FORMAT_VERSION} prepared dataset")
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


@dataclass(frozen=True)
class RowGroupSlice:
    """Rows ``[lo, hi)`` of row group ``group`` of the parquet file at ``path``."""

    path: str
    group: int
    lo: int
    hi: int


@dataclass(frozen=True)
class SplitShare:
    """One rank's share of a split as row-group slices: only parquet footers are read until it is iterated, and
    iterating holds one row group at a time, so memory does not grow with the split."""

    uri: str
    slices: tuple[RowGroupSlice, ...]
    total_rows: int  # rows of the split over all ranks
    read_ahead: int = READ_AHEAD_ROW_GROUPS  # row groups read in the background (0: on the caller's thread)

    @property
    def num_rows(self) -> int:
        return sum(piece.hi - piece.lo for piece in self.slices)

    def rows(self, rng: np.random.Generator | None = None) -> Iterator[dict[str, Any]]:
        """The share's rows (see ``read_split``), slice by slice: in file order, or in an ``rng``-drawn order of
        slices (rows within a slice stay in order; the loader's shuffle buffer mixes them)."""
        filesystem, _ = open_location(self.uri)
        order = rng.permutation(len(self.slices)) if rng is not None else range(len(self.slices))
        pieces = (self.slices[index] for index in order)
        for rows in read_ahead(lambda piece: _rows(_read_slice(filesystem, piece)), pieces, self.read_ahead):
            yield from rows


def read_ahead(read: Callable[[T], R], items: Iterable[T], depth: int) -> Iterator[R]:
    """``map(read, items)`` with the next ``depth`` items read in a background thread while the caller consumes
    the current result (``depth`` 0: ``map`` itself). Results come in ``items`` order; an exception of ``read``
    is raised to the caller unchanged, at the item where ``map`` would raise it. Closing the iterator (a
    ``break``, ``close()``, garbage collection) cancels the reads not started and joins the thread, which
    finishes the read under way first."""
    if depth < 1:
        yield from map(read, items)
        return
    items = iter(items)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=READ_AHEAD_THREAD)
    pending: deque[Future[R]] = deque()
    try:
        for item in itertools.islice(items, depth):
            pending.append(executor.submit(read, item))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(items, 1):
                pending.append(executor.submit(read, item))
            yield result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def read_failure(err: BaseException) -> str:
    """One line for a failed read: where it failed (the parquet file and row group, when the reader noted
    them) and why."""
    return ": ".join([*getattr(err, "__notes__", ()), first_line(err)])


def split_share(uri: str, split: str, rank: int = 0, world_size: int = 1) -> SplitShare:
    """Rank ``rank``'s share of ``split`` at ``uri`` (see the module docstring), without reading any rows."""
    filesystem, root = open_location(uri)
    shards = _shard_metadata(filesystem, root, split)
    total = sum(meta.num_rows for _, meta in shards)
    start, stop = rank_range(total, rank, world_size)
    slices = []
    offset = 0  # global index of the current row group's first row
    for path, meta in shards:
        for group in range(meta.num_row_groups):
            group_rows = meta.row_group(group).num_rows
            lo, hi = max(start - offset, 0), min(stop - offset, group_rows)
            if lo < hi:
                slices.append(RowGroupSlice(path, group, lo, hi))
            offset += group_rows
    return SplitShare(uri, tuple(slices), total)


def read_split(uri: str, split: str, rank: int = 0, world_size: int = 1) -> list[dict[str, Any]]:
    """This rank's share of ``split``, all in memory (small splits and tools; training streams ``split_share``).

    Returns:
        One dict per image: ``image_id`` int, ``file_name`` str, ``width``/``height`` int,
        ``image`` bytes (encoded file), ``boxes`` float32[N, 4] xyxy in original pixels,
        ``labels`` int64[N] category ids ``1..K``, ``iscrowd`` bool[N].
    """
    return list(split_share(uri, split, rank, world_size).rows())


def _shard_metadata(filesystem: pafs.FileSystem, root: str, split: str) -> list[tuple[str, pq.FileMetaData]]:
    folder = posixpath.join(root, "parquet", split)
    infos = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    paths = sorted(info.path for info in infos if info.type == pafs.FileType.File and info.path.endswith(".parquet"))
    if not paths:
        raise DatasetError(f"{folder}: no parquet shards for split {split!r}")
    shards = []
    for path in paths:
        with _noted(f"{path}: footer"), filesystem.open_input_file(path) as handle:
            shards.append((path, pq.ParquetFile(handle).metadata))
    return shards


@contextmanager
def _noted(where: str) -> Iterator[None]:
    """An exception raised inside gets the note ``where`` (pyarrow's messages do not name the file); its type
    and message stay as they are, so callers that classify storage failures see what they always saw."""
    try:
        yield
    except Exception as err:
        err.add_note(where)
        raise


def _read_slice(filesystem: pafs.FileSystem, piece: RowGroupSlice) -> pa.Table:
    with _noted(f"{piece.path}: row group {piece.group}"), filesystem.open_input_file(piece.path) as handle:
        table = pq.ParquetFile(handle).read_row_group(piece.group)
    return table.slice(piece.lo, piece.hi - piece.lo)


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
