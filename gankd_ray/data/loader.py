"""Batches for training and evaluation from one rank's share of a prepared split.

The share is read once and kept as encoded bytes in memory; decoding and transforms run in
background ``torch.utils.data.DataLoader`` workers. Training gives every rank the same number of
batches, ``floor(floor(N / W) / B)`` (drop_last), so DDP ranks step in lockstep; evaluation yields
each of the rank's rows exactly once, in order.

Augmentations are seeded by ``(seed, epoch, image_id)``: a run is reproducible whatever the number
of loader workers or ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from gankd_ray.data.reader import count_rows, read_split
from gankd_ray.data.transforms import DetectionTransform

Batch = tuple[torch.Tensor, list[dict[str, torch.Tensor]], list[dict[str, Any]]]


class DetectionBatchLoader:
    """Iterable of ``(images, targets, metas)`` batches over ``rows``.

    Yields:
        images: FloatTensor[B, 3, S, S] in [0, 1] (resized, not normalised).
        targets: per image ``{"boxes": FloatTensor[N, 4] xyxy in S-space, "labels": Int64Tensor[N]}``,
            ignore regions (``iscrowd``) removed.
        metas: per image ``{"image_id": int, "orig_size": (h, w)}``.

    Args:
        rows: this rank's rows as returned by ``read_split``.
        image_size: S.
        batch_size: B (the last eval batch may be smaller).
        train: shuffle per epoch, augment, and drop the rest so every rank yields
            ``floor(floor(total_rows / world_size) / B)`` batches.
        total_rows: N, rows of the split over all ranks (default ``len(rows)``, right for one rank).
        world_size: W.
        seed: shuffling and augmentation seed.
        hflip / jitter: training augmentations (see ``DetectionTransform``).
        num_workers: background decoding processes (0 = decode in the caller).
        pin_memory: page-locked batches for faster host-to-GPU copies.
    """

    def __init__(
        self,
        rows: list[dict[str, Any]],
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
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        self.train = train
        if train:
            total = len(rows) if total_rows is None else total_rows
            num_batches = (total // world_size) // batch_size
            if num_batches == 0:
                raise ValueError(
                    f"optim.batch_size={batch_size}: {total} training rows over {world_size} ranks give no "
                    "full batch; lower the batch size"
                )
        else:
            num_batches = math.ceil(len(rows) / batch_size)
        transform = DetectionTransform(image_size, hflip=hflip and train, jitter=jitter if train else 0.0)
        self._sampler = _EpochBatches(len(rows), batch_size, num_batches, shuffle=train, seed=seed)
        self._loader = DataLoader(
            _RowDataset(rows, transform, seed, augment=train),
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
        """Read rank ``rank``'s share of ``split`` at ``uri`` and wrap it (``kwargs`` as in ``__init__``)."""
        rows = read_split(uri, split, rank=rank, world_size=world_size)
        return cls(
            rows,
            image_size,
            batch_size,
            train=train,
            total_rows=count_rows(uri, split),
            world_size=world_size,
            **kwargs,
        )

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle and augmentations of the next pass (call before iterating)."""
        self._sampler.epoch = epoch

    def __len__(self) -> int:
        return len(self._sampler)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._loader)


class _RowDataset(Dataset):
    """Encoded rows; item ``(index, epoch)`` decodes and transforms one row."""

    def __init__(self, rows: list[dict[str, Any]], transform: DetectionTransform, seed: int, augment: bool) -> None:
        # Keep only what batches need: image bytes and positive boxes (ignore regions dropped here).
        self.rows = [
            (int(r["image_id"]), r["image"], r["boxes"][~r["iscrowd"]], r["labels"][~r["iscrowd"]]) for r in rows
        ]
        self.transform = transform
        self.seed = seed
        self.augment = augment

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        index, epoch = key
        image_id, data, boxes, labels = self.rows[index]
        rng = np.random.default_rng([self.seed, epoch, image_id]) if self.augment else None
        image, boxes_s, orig_size = self.transform(data, boxes, rng)
        target = {"boxes": boxes_s, "labels": torch.as_tensor(labels, dtype=torch.int64)}
        return image, target, {"image_id": image_id, "orig_size": orig_size}


class _EpochBatches(Sampler):
    """Batches of ``(row index, epoch)`` keys: a seeded permutation per epoch, or the rows in order."""

    def __init__(self, num_rows: int, batch_size: int, num_batches: int, shuffle: bool, seed: int) -> None:
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
        else:
            order = np.arange(self.num_rows)
        for start in range(0, self.num_batches * self.batch_size, self.batch_size):
            yield [(int(i), self.epoch) for i in order[start : start + self.batch_size]]


def _collate(samples: list[tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]]) -> Batch:
    images, targets, metas = zip(*samples)
    return torch.stack(images), list(targets), list(metas)
