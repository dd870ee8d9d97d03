"""Batches for training and evaluation from one rank's share of a prepared split.

The share streams from storage row group by row group (``SplitShare``, which reads the next two in a
background thread while the sampler consumes one): memory is bounded by the shuffle buffer, those row groups
and the batches in flight, not by the split. The batch sampler runs in the calling process and reads the
encoded rows; decoding and transforms run in background ``torch.utils.data.DataLoader`` workers, which
receive the encoded rows themselves as the sampler's keys.

Training visits the share's row groups in a seeded order per epoch through a seeded shuffle buffer and gives
every rank the same number of batches, ``floor(floor(N / W) / B)`` (drop_last), so DDP ranks step in
lockstep; evaluation yields each of the rank's rows exactly once, in order. Shuffles are seeded by
``(seed, epoch)`` and augmentations by ``(seed, epoch, image_id)``: for a given world size a run is
reproducible whatever the number of loader workers.

An image that does not decode (a prepared file damaged since) ends the pass with one ``DatasetError`` line
naming the split's parquet folder, the image id and its file name, the same with or without workers: a
worker hands the message back as the batch instead of raising, because torch re-raises a worker's exception
with its traceback folded into the message. Rows that cannot be read (a damaged row group) end it with one
``UnreadableRows`` line naming the parquet file, the row group and why; storage that stops answering is
raised unchanged, for the run to end as a storage failure that a rerun resumes from.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from gankd_ray import storage
from gankd_ray.data.reader import read_failure, split_share
from gankd_ray.data.records import DatasetError, UnreadableRows
from gankd_ray.data.transforms import DetectionTransform, decode_rgb, undecodable_image

Batch = tuple[torch.Tensor, list[dict[str, torch.Tensor]], list[dict[str, Any]]]
Sample = tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]
# (image_id, file name, encoded image, boxes without ignore regions, their labels): what a batch needs of a row.
EncodedRow = tuple[int, str, bytes, np.ndarray, np.ndarray]
SHUFFLE_BUFFER_ROWS = 1024  # DataConfig.shuffle_buffer's default


class RowSource(Protocol):
    """A rank's share of a split that can be iterated again each epoch (``SplitShare`` is one)."""

    num_rows: int  # rows of this share
    total_rows: int  # rows of the split over all ranks

    def rows(self, rng: np.random.Generator | None = None) -> Iterator[dict[str, Any]]: ...


class DetectionBatchLoader:
    """Iterable of ``(images, targets, metas)`` batches over a rank's share of a split.

    Yields:
        images: FloatTensor[B, 3, S, S] in [0, 1] (resized, not normalised).
        targets: per image ``{"boxes": FloatTensor[N, 4] xyxy in S-space, "labels": Int64Tensor[N]}``,
            ignore regions (``iscrowd``) removed.
        metas: per image ``{"image_id": int, "orig_size": (h, w)}``.

    Args:
        rows: this rank's share: a ``RowSource`` such as a streamed ``SplitShare``, or rows as returned by
            ``read_split``.
        image_size: S.
        batch_size: B (the last eval batch may be smaller).
        train: shuffle per epoch, augment, and drop the rest so every rank yields
            ``floor(floor(total_rows / world_size) / B)`` batches.
        total_rows: N, rows of the split over all ranks (default: the share's own ``total_rows``, or
            ``len(rows)`` for a list, right for one rank).
        world_size: W.
        seed: shuffling and augmentation seed.
        hflip / jitter: training augmentations (see ``DetectionTransform``).
        num_workers: background decoding processes (0 = decode in the caller).
        pin_memory: page-locked batches for faster host-to-GPU copies.
        shuffle_buffer: rows held for shuffling while training (bounds the loader's memory).
        where: what error messages call the rows (``from_dataset``: the split's parquet folder).

    Raises (while iterating):
        DatasetError: an image does not decode.
        UnreadableRows: rows cannot be read (a damaged row group).
    """

    def __init__(
        self,
        rows: RowSource | list[dict[str, Any]],
        image_size: int,
        batch_size: int,
        *,
        train: bool,
        total_rows: int | None = None,
        world_size: int = 1,
        seed: int = 0,
        hflip: bool = True,
        jitter: float = 0.0,
        num_workers: int = 1,
        pin_memory: bool = False,
        shuffle_buffer: int = SHUFFLE_BUFFER_ROWS,
        where: str = "rows",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        source = _RowsInMemory(rows) if isinstance(rows, list) else rows
        total = total_rows if total_rows is not None else source.total_rows
        if train:
            num_batches = _training_batches(total, world_size, batch_size)
        else:
            num_batches = math.ceil(source.num_rows / batch_size)
        self._where = where
        transform = DetectionTransform(image_size, hflip=hflip and train, jitter=jitter if train else 0.0)
        self._sampler = _EpochBatches(source, batch_size, num_batches, train, seed, shuffle_buffer)
        self._loader = DataLoader(
            _DecodeRows(transform, seed, augment=train, where=where),
            batch_sampler=self._sampler,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
        )

    @classmethod
    def from_dataset(
        cls,
        uri: str,
        split: str,
        image_size: int,
        batch_size: int,
        *,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        **kwargs: Any,
    ) -> DetectionBatchLoader:
        """Stream rank ``rank``'s share of ``split`` at ``uri`` (``kwargs`` as in ``__init__``)."""
        share = split_share(uri, split, rank=rank, world_size=world_size)
        where = storage.join(uri, "parquet", split)
        return cls(share, image_size, batch_size, train=train, world_size=world_size, where=where, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle and augmentations of the next pass (call before iterating)."""
        self._sampler.epoch = epoch

    def __len__(self) -> int:
        return len(self._sampler)

    def __iter__(self) -> Iterator[Batch]:
        try:
            yield from self._checked_batches()
        finally:  # an error or an early stop leaves the pass's reads open (torch's iterator persists): end them now
            self._sampler.end_pass()

    def _checked_batches(self) -> Iterator[Batch]:
        batches: Iterator[Batch] | None = None
        while True:
            try:  # the sampler reads the rows, in this process: workers get their first batches' rows in iter()
                batches = batches or iter(self._loader)
                batch = next(batches, None)
            except (OSError, pa.ArrowException) as err:
                if storage.is_outage(err):
                    raise
                reason = read_failure(err)
                raise UnreadableRows(f"{self._where}: cannot read ({reason})", reason=reason) from None
            if batch is None:
                return
            if isinstance(batch, _CorruptImage):
                raise DatasetError(batch.message)
            yield batch


def _training_batches(total_rows: int, world_size: int, batch_size: int) -> int:
    num_batches = (total_rows // world_size) // batch_size
    if num_batches == 0:
        raise ValueError(
            f"optim.batch_size={batch_size}: {total_rows} training rows over {world_size} ranks give no full batch; "
            "lower the batch size"
        )
    return num_batches


class _RowsInMemory:
    """A share already in memory (tools and tests), iterated like a ``SplitShare``."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self._rows = rows
        self.num_rows = self.total_rows = len(rows)

    def rows(self, rng: np.random.Generator | None = None) -> Iterator[dict[str, Any]]:
        order = rng.permutation(len(self._rows)) if rng is not None else range(len(self._rows))
        return (self._rows[i] for i in order)


def _encoded(row: dict[str, Any]) -> EncodedRow:
    keep = ~row["iscrowd"]  # ignore regions are not targets
    return int(row["image_id"]), row["file_name"], row["image"], row["boxes"][keep], row["labels"][keep]


def shuffled(rows: Iterable[Any], buffer_size: int, rng: np.random.Generator) -> Iterator[Any]:
    """``rows`` in an order drawn through a buffer of ``buffer_size``: each row out is a uniform pick among the
    buffered ones, so rows move up to about ``buffer_size`` places while memory holds ``buffer_size`` rows."""
    buffer: list[Any] = []
    for row in rows:
        if len(buffer) < buffer_size:
            buffer.append(row)
            continue
        pick = int(rng.integers(buffer_size))
        buffer[pick], row = row, buffer[pick]
        yield row
    rng.shuffle(buffer)
    yield from buffer


@dataclass(frozen=True)
class _CorruptImage:
    """A sample, or a batch, whose image did not decode: the one-line message, carried back from a worker as
    data (torch would fold a raised exception's traceback into its message)."""

    message: str


class _DecodeRows(Dataset):
    """Item ``(encoded row, epoch)`` decodes and transforms one row (in a loader worker)."""

    def __init__(self, transform: DetectionTransform, seed: int, augment: bool, where: str) -> None:
        self.transform = transform
        self.seed = seed
        self.augment = augment
        self.where = where

    def __getitem__(self, key: tuple[EncodedRow, int]) -> Sample | _CorruptImage:
        (image_id, file_name, data, boxes, labels), epoch = key
        try:
            picture = decode_rgb(data)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for corrupt files
            return _CorruptImage(undecodable_image(self.where, image_id, file_name, err))
        rng = np.random.default_rng([self.seed, epoch, image_id]) if self.augment else None
        image, boxes_s, orig_size = self.transform.apply(picture, boxes, rng)
        target = {"boxes": boxes_s, "labels": torch.as_tensor(labels, dtype=torch.int64)}
        return image, target, {"image_id": image_id, "orig_size": orig_size}


class _EpochBatches(Sampler):
    """Batches of ``(encoded row, epoch)`` keys streamed from the share: shuffled per epoch, or in order."""

    def __init__(
        self, source: RowSource, batch_size: int, num_batches: int, shuffle: bool, seed: int, buffer_size: int
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"data.shuffle_buffer={buffer_size}: must be >= 1")
        self.source = source
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.shuffle = shuffle
        self.seed = seed
        self.buffer_size = buffer_size
        self.epoch = 0
        self._pass: Generator[list[tuple[EncodedRow, int]], None, None] | None = None

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[tuple[EncodedRow, int]]]:
        self.end_pass()
        self._pass = self._batches()
        return self._pass

    def end_pass(self) -> None:
        """Close the current pass: its row reads (and their read-ahead thread) stop even while torch's loader
        iterator, which persists across epochs, still holds it."""
        if self._pass is not None:
            self._pass.close()
            self._pass = None

    def _batches(self) -> Iterator[list[tuple[EncodedRow, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        rows = (_encoded(row) for row in self.source.rows(rng))
        if rng is not None:
            rows = shuffled(rows, self.buffer_size, rng)
        batch: list[tuple[EncodedRow, int]] = []
        batches = 0
        for row in rows:
            batch.append((row, self.epoch))
            if len(batch) == self.batch_size:
                yield batch
                batch, batches = [], batches + 1
                if batches == self.num_batches:  # drop_last: every rank stops at the same step
                    return
        if batch and not self.shuffle:
            yield batch


def _collate(samples: list[Sample | _CorruptImage]) -> Batch | _CorruptImage:
    corrupt = [sample for sample in samples if isinstance(sample, _CorruptImage)]
    if corrupt:
        return corrupt[0]
    images, targets, metas = zip(*samples)
    return torch.stack(images), list(targets), list(metas)
