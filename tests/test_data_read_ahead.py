"""Read-ahead of row groups (``reader.read_ahead``): the rows, their order and the errors of the serial read, a
thread that stops when the iterator is abandoned, and reads that really overlap the caller's work."""

from __future__ import annotations

import dataclasses
import gc
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import S3_BUCKET, corrupt_image, corrupt_row_group, make_synthetic_dataset, split_row_groups, upload

from gankd_ray.data import DatasetError
from gankd_ray.data.loader import DetectionBatchLoader
from gankd_ray.data.reader import READ_AHEAD_ROW_GROUPS, READ_AHEAD_THREAD, SplitShare, read_ahead, split_share

ROWS_PER_GROUP = 4  # train: files of 20, 20 and 8 rows become 5 + 5 + 2 row groups


@pytest.fixture(scope="module")
def grouped_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic dataset whose train split has 12 row groups of at most 4 rows (read-only)."""
    data = make_synthetic_dataset(tmp_path_factory.mktemp("read_ahead") / "data")
    split_row_groups(data, "train", ROWS_PER_GROUP)
    return data


@pytest.fixture(scope="module")
def corrupt_data(grouped_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``grouped_data`` with row group 2 of the first train file unreadable (rows 8-11 of the split)."""
    data = tmp_path_factory.mktemp("read_ahead_corrupt") / "data"
    shutil.copytree(grouped_data, data)
    corrupt_row_group(data / "parquet" / "train" / "part-00000.parquet", group=2)
    return data


def serial(share: SplitShare) -> SplitShare:
    return dataclasses.replace(share, read_ahead=0)


def read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(READ_AHEAD_THREAD)]


def assert_no_read_ahead_thread() -> None:
    for thread in read_ahead_threads():
        thread.join(timeout=5)
    assert not [t for t in read_ahead_threads() if t.is_alive()], "a read-ahead thread outlived its iterator"


def rows_until_failure(share: SplitShare, seed: int) -> tuple[list[int], BaseException]:
    ids: list[int] = []
    with pytest.raises(Exception) as raised:
        for row in share.rows(np.random.default_rng(seed)):
            ids.append(row["image_id"])
    return ids, raised.value


@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (1, 3)])
def test_rows_order_and_rng_are_those_of_the_serial_read(grouped_data: Path, rank: int, world_size: int) -> None:
    share = split_share(str(grouped_data), "train", rank, world_size)
    assert share.read_ahead == READ_AHEAD_ROW_GROUPS and len(share.slices) > READ_AHEAD_ROW_GROUPS + 1
    assert [r["image_id"] for r in share.rows()] == [r["image_id"] for r in serial(share).rows()]
    ahead_rng, serial_rng = np.random.default_rng([7, 1]), np.random.default_rng([7, 1])
    ahead, in_order = list(share.rows(ahead_rng)), list(serial(share).rows(serial_rng))
    assert [r["image_id"] for r in ahead] == [r["image_id"] for r in in_order]
    assert [r["image"] for r in ahead] == [r["image"] for r in in_order]
    # The shuffle buffer draws from the same generator next: the reader thread must not have touched it.
    assert ahead_rng.bit_generator.state == serial_rng.bit_generator.state


def test_training_batches_do_not_depend_on_read_ahead(grouped_data: Path) -> None:
    def epoch(share: SplitShare) -> tuple[list[int], torch.Tensor]:
        loader = DetectionBatchLoader(share, 96, 5, train=True, seed=3, jitter=0.2, num_workers=0, shuffle_buffer=8)
        loader.set_epoch(2)
        batches = list(loader)
        return [m["image_id"] for _, _, metas in batches for m in metas], torch.cat([b[0] for b in batches])

    share = split_share(str(grouped_data), "train")
    (ids, images), (serial_ids, serial_images) = epoch(share), epoch(serial(share))
    assert ids == serial_ids and len(ids) == 45
    assert torch.equal(images, serial_images)
    assert_no_read_ahead_thread()  # the sampler stopped at its last batch, two row groups before the end


def test_a_failing_row_group_raises_what_the_serial_read_raises(corrupt_data: Path) -> None:
    share = split_share(str(corrupt_data), "train")
    ids, error = rows_until_failure(share, seed=0)
    serial_ids, serial_error = rows_until_failure(serial(share), seed=0)
    assert ids == serial_ids and len(ids) < share.num_rows  # the rows before the bad row group, then the error
    assert type(error) is type(serial_error) is OSError
    assert str(error) == str(serial_error) and "thrift" in str(error)
    where = f"{corrupt_data / 'parquet' / 'train' / 'part-00000.parquet'}: row group 2"
    assert error.__notes__ == serial_error.__notes__ == [where]
    assert_no_read_ahead_thread()


def test_abandoning_the_rows_stops_the_read_ahead_thread(grouped_data: Path) -> None:
    share = split_share(str(grouped_data), "train")
    rows = share.rows()
    next(rows)
    assert read_ahead_threads(), "no read-ahead thread while iterating: the checks below would be vacuous"
    rows.close()
    assert_no_read_ahead_thread()

    for index, _ in enumerate(share.rows(np.random.default_rng(0))):
        if index == 5:
            break
    assert_no_read_ahead_thread()

    rows = share.rows()
    next(rows)
    del rows  # garbage collection closes the generator
    gc.collect()
    assert_no_read_ahead_thread()

    for _ in DetectionBatchLoader(share, 96, 5, train=True, num_workers=0):
        break
    assert_no_read_ahead_thread()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_loader_pass_that_stops_early_or_fails_stops_the_read_ahead_thread(
    grouped_data: Path, tmp_path: Path, num_workers: int
) -> None:
    """torch's loader iterator persists across epochs (workers) and an error's traceback holds the pass: neither
    may keep the reads open. Garbage collection is off, so only closing the pass can end the thread."""
    data = tmp_path / "data"
    shutil.copytree(grouped_data, data)
    corrupt_image(data / "parquet" / "train" / "part-00001.parquet", row=2)
    share = split_share(str(data), "train")
    gc.disable()
    try:
        loader = DetectionBatchLoader(share, 96, 5, train=False, num_workers=num_workers)
        for _ in loader:
            assert read_ahead_threads(), "no read-ahead thread while iterating: the check below would be vacuous"
            break
        assert_no_read_ahead_thread()
        with pytest.raises(DatasetError, match="corrupt or unsupported image file"):
            list(loader)
        assert_no_read_ahead_thread()
    finally:
        gc.enable()


def test_reads_overlap_with_the_callers_work() -> None:
    """Reads and the caller's work both sleep ``STEP``: the serial sum is ``2 * STEP`` an item; overlapped it is
    about ``STEP`` an item plus one read. The bound asks for a third of the reads hidden: sleeps only get
    longer on a loaded machine, never shorter, so only a read-ahead that does not overlap fails it."""
    step, items = 0.2, 8
    reads: list[str] = []

    def slow_read(item: int) -> int:
        time.sleep(step)
        reads.append(threading.current_thread().name)
        return item * item

    def consume(depth: int) -> tuple[list[int], float]:
        started = time.monotonic()
        results = []
        for result in read_ahead(slow_read, range(items), depth):
            time.sleep(step)  # the caller's work on the item
            results.append(result)
        return results, time.monotonic() - started

    in_order, serial_seconds = consume(depth=0)
    ahead, ahead_seconds = consume(depth=READ_AHEAD_ROW_GROUPS)
    assert ahead == in_order == [i * i for i in range(items)]
    assert serial_seconds >= 2 * step * items
    assert ahead_seconds < 2 * step * items - step * items / 3, (ahead_seconds, serial_seconds)
    assert all(name.startswith(READ_AHEAD_THREAD) for name in reads[items:])
    assert_no_read_ahead_thread()


def test_a_share_on_s3_reads_ahead_the_rows_and_errors_of_the_serial_read(
    s3, grouped_data: Path, corrupt_data: Path
) -> None:
    remote = upload(grouped_data, f"s3://{S3_BUCKET}/read_ahead/data")
    share = split_share(remote, "train", rank=1, world_size=2)
    local = split_share(str(grouped_data), "train", rank=1, world_size=2)
    ids = [r["image_id"] for r in share.rows(np.random.default_rng(5))]
    assert ids == [r["image_id"] for r in serial(share).rows(np.random.default_rng(5))]
    assert ids == [r["image_id"] for r in local.rows(np.random.default_rng(5))] and len(ids) == 24
    assert_no_read_ahead_thread()

    remote_corrupt = upload(corrupt_data, f"s3://{S3_BUCKET}/read_ahead/corrupt")
    share = split_share(remote_corrupt, "train")
    (ids, error), (serial_ids, serial_error) = rows_until_failure(share, 1), rows_until_failure(serial(share), 1)
    assert ids == serial_ids and type(error) is type(serial_error) and str(error) == str(serial_error)
    assert error.__notes__ == [f"{S3_BUCKET}/read_ahead/corrupt/parquet/train/part-00000.parquet: row group 2"]
    assert_no_read_ahead_thread()
