"""The batch loader: equal step counts across ranks, seeded epochs, contract of the batches."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import corrupt_image, corrupt_row_group, split_row_groups

from gankd_ray.config import DataConfig
from gankd_ray.data import DatasetError, read_split
from gankd_ray.data.loader import DetectionBatchLoader, UnreadableRows

S, B = 160, 5


def _ids(loader: DetectionBatchLoader) -> list[int]:
    return [meta["image_id"] for _, _, metas in loader for meta in metas]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_rank_gets_the_same_number_of_training_batches(synthetic_data: str, world_size: int) -> None:
    # 16 val rows over 3 ranks are shares of 5, 5 and 6: the rank with 6 must still stop at floor(5 / 2).
    batch_size = 2
    loaders = [
        DetectionBatchLoader.from_dataset(
            synthetic_data, "val", S, batch_size, train=True, rank=r, world_size=world_size, num_workers=0
        )
        for r in range(world_size)
    ]
    expected = (16 // world_size) // batch_size
    assert [len(loader) for loader in loaders] == [expected] * world_size
    for loader in loaders:
        batches = list(loader)
        assert len(batches) == expected and all(images.shape[0] == batch_size for images, _, _ in batches)


def test_evaluation_yields_every_row_once_over_all_ranks(synthetic_data: str) -> None:
    ids = []
    for rank in range(3):
        loader = DetectionBatchLoader.from_dataset(
            synthetic_data, "val", S, B, train=False, rank=rank, world_size=3, num_workers=0
        )
        ids += _ids(loader)
    assert sorted(ids) == sorted(r["image_id"] for r in read_split(synthetic_data, "val"))
    assert len(ids) == 16


def test_batches_follow_the_documented_contract(synthetic_data: str) -> None:
    loader = DetectionBatchLoader.from_dataset(synthetic_data, "train", S, B, train=True, jitter=0.2, num_workers=1)
    images, targets, metas = next(iter(loader))
    assert images.shape == (B, 3, S, S) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    for target, meta in zip(targets, metas):
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
        assert target["labels"].dtype == torch.int64 and len(target["labels"]) == len(target["boxes"])
        assert ((target["labels"] >= 1) & (target["labels"] <= 5)).all()
        assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all() and target["boxes"].max() <= S
        assert isinstance(meta["image_id"], int) and meta["orig_size"] == (160, 160)


def test_epochs_are_seeded_shuffles_and_workers_do_not_change_the_batches(synthetic_data: str) -> None:
    def epoch_batches(num_workers: int, epoch: int) -> tuple[list[int], torch.Tensor]:
        loader = DetectionBatchLoader.from_dataset(
            synthetic_data, "train", S, B, train=True, seed=7, jitter=0.3, num_workers=num_workers
        )
        loader.set_epoch(epoch)
        batches = list(loader)
        return [m["image_id"] for _, _, metas in batches for m in metas], torch.cat(
            [images for images, _, _ in batches]
        )

    ids0, images0 = epoch_batches(0, epoch=0)
    ids0_again, images0_again = epoch_batches(1, epoch=0)
    ids1, _ = epoch_batches(0, epoch=1)
    assert ids0 == ids0_again and torch.equal(images0, images0_again)
    assert ids0 != ids1 and len(set(ids0)) == len(ids0) == 45


def test_ignore_regions_are_removed_from_targets() -> None:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (80, 40)).save(buffer, format="PNG")
    row = {
        "image_id": 5,
        "file_name": "x.png",
        "width": 80,
        "height": 40,
        "image": buffer.getvalue(),
        "boxes": np.array([[0, 0, 40, 20], [40, 20, 80, 40]], dtype=np.float32),
        "labels": np.array([1, 2]),
        "iscrowd": np.array([True, False]),
    }
    loader = DetectionBatchLoader([row], S, 1, train=False, num_workers=0)
    _, targets, metas = next(iter(loader))
    assert targets[0]["labels"].tolist() == [2]
    assert targets[0]["boxes"].tolist() == [[80.0, 80.0, 160.0, 160.0]]
    assert metas == [{"image_id": 5, "orig_size": (40, 80)}]


def test_too_few_rows_for_one_batch_per_rank_is_an_error(synthetic_data: str) -> None:
    with pytest.raises(ValueError, match="no full batch"):
        DetectionBatchLoader.from_dataset(synthetic_data, "val", S, 9, train=True, rank=0, world_size=2, num_workers=0)


def _loader_for(config: DataConfig, train: bool) -> DetectionBatchLoader:
    """The train or val loader a ``DataConfig`` describes, as the training loop builds it."""
    return DetectionBatchLoader.from_dataset(
        config.path,
        config.train_split if train else config.val_split,
        S,
        B,
        train=train,
        hflip=config.hflip and train,
        jitter=config.jitter if train else 0.0,
        num_workers=config.loader_workers,
    )


def test_built_from_the_data_config(synthetic_data: str) -> None:
    config = DataConfig(path=synthetic_data, loader_workers=0)
    assert len(_loader_for(config, train=True)) == 48 // B
    assert len(_loader_for(config, train=False)) == 4  # ceil(16 / 5)


def test_the_shuffle_buffer_keeps_every_row_and_moves_none_earlier_than_its_size() -> None:
    import numpy as np

    from gankd_ray.data.loader import shuffled

    rows = list(range(200))
    out = list(shuffled(rows, 8, np.random.default_rng(0)))
    assert sorted(out) == rows and out != rows
    # Row i can leave only once rows up to i + 8 have been read: memory holds 8 rows, never the split.
    assert all(row <= position + 8 for position, row in enumerate(out))
    assert list(shuffled(rows, 1, np.random.default_rng(0))) == rows


class _CountedShare:
    """A real streamed share that counts the rows it has read from storage so far."""

    def __init__(self, share) -> None:
        self.share, self.num_rows, self.total_rows, self.read = share, share.num_rows, share.total_rows, 0

    def rows(self, rng=None):
        for row in self.share.rows(rng):
            self.read += 1
            yield row


def test_training_streams_the_share_with_memory_bounded_by_the_buffer(synthetic_data: str) -> None:
    from gankd_ray.data.reader import split_share

    share = _CountedShare(split_share(synthetic_data, "train"))  # 3 files of 20, 20 and 8 rows
    batch_size, buffer = 2, 4
    loader = DetectionBatchLoader(share, S, batch_size, train=True, shuffle_buffer=buffer, num_workers=0)
    held = []
    for step, _ in enumerate(loader, start=1):
        held.append(share.read - step * batch_size)  # rows read but not yet handed out
    # Read all at once, 48 - 2 rows would be held after the first batch; streamed, at most the buffer plus the
    # row group being read (20 rows here) plus a batch.
    assert len(held) == 48 // batch_size and max(held) <= buffer + 20 + batch_size
    assert share.read == 48


def test_a_missing_split_fails_when_the_loader_is_built(synthetic_data: str) -> None:
    with pytest.raises(DatasetError, match="no parquet shards for split 'nope'"):
        DetectionBatchLoader.from_dataset(synthetic_data, "nope", S, B, train=True, num_workers=0)


def test_an_undecodable_image_is_one_line_naming_it_with_or_without_workers(
    synthetic_data: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    image_id, file_name = corrupt_image(data / "parquet" / "val" / "part-00000.parquet", row=3)

    def error(num_workers: int) -> str:
        loader = DetectionBatchLoader.from_dataset(str(data), "val", S, B, train=False, num_workers=num_workers)
        with pytest.raises(DatasetError) as caught:
            list(loader)
        return str(caught.value)

    in_caller = error(num_workers=0)
    assert in_caller == (
        f"{data}/parquet/val: image {image_id} ({file_name!r}): "
        "corrupt or unsupported image file: not in an image format PIL recognises"
    )
    # A worker's exception would come back as torch's "Caught OSError in DataLoader worker process 0." and
    # its traceback: the message must be the caller's own line.
    assert error(num_workers=1) == in_caller


def test_an_unreadable_row_group_is_one_line_naming_the_file_and_group_with_or_without_workers(
    synthetic_data: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    split_row_groups(data, "train", rows_per_group=8)
    shard = data / "parquet" / "train" / "part-00000.parquet"
    corrupt_row_group(shard, group=1)

    def error(num_workers: int) -> UnreadableRows:
        loader = DetectionBatchLoader.from_dataset(str(data), "train", S, B, train=True, num_workers=num_workers)
        with pytest.raises(UnreadableRows) as caught:
            list(loader)
        return caught.value

    in_caller = error(num_workers=0)
    message = str(in_caller)
    assert message.startswith(f"{data}/parquet/train: cannot read ({shard}: row group 1: "), message
    assert "\n" not in message and "Traceback" not in message, message
    assert str(error(num_workers=1)) == message
    # A Ray Train worker's error reaches the driver pickled: the reason (evaluate's wording) must survive.
    rebuilt = pickle.loads(pickle.dumps(in_caller))
    assert isinstance(rebuilt, DatasetError) and rebuilt.reason == in_caller.reason and str(rebuilt) == message
