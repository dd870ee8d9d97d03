"""Helpers shared by sources: deterministic splits, input digests, common CLI options."""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from gankd_ray.data.records import DatasetError

T = TypeVar("T")


def add_fraction_arguments(parser: argparse.ArgumentParser, val: float = 0.15, test: float = 0.15) -> None:
    parser.add_argument("--val-fraction", type=float, default=val, help=f"share of images for val (default {val})")
    parser.add_argument("--test-fraction", type=float, default=test, help=f"share of images for test (default {test})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split assignment (default 0)")


def split_by_fraction(items: Sequence[T], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[T]]:
    """Shuffle ``items`` with ``seed`` and cut test, val, then train off the front.

    A positive fraction gets at least one item, so small sets still have every split. Each split keeps
    the shuffled order, which makes the reader's contiguous rank blocks fair samples.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise DatasetError(f"val fraction {val_fraction} and test fraction {test_fraction}: need >= 0 and sum < 1")
    order = np.random.default_rng(seed).permutation(len(items))
    shuffled = [items[i] for i in order]
    num_test = _share(len(items), test_fraction)
    num_val = _share(len(items), val_fraction)
    return {
        "test": shuffled[:num_test],
        "val": shuffled[num_test : num_test + num_val],
        "train": shuffled[num_test + num_val :],
    }


def _share(total: int, fraction: float) -> int:
    return max(1, round(total * fraction)) if fraction > 0 else 0


def files_digest(paths: Sequence[Path], root: Path) -> str:
    """sha256 over (path relative to ``root``, contents) of ``paths`` in sorted order.

    Paths and ``root`` may each be relative (to the working folder) or absolute.
    """
    total = hashlib.sha256()
    root = root.absolute()
    for path in sorted(paths):
        total.update(f"{path.absolute().relative_to(root).as_posix()}\n".encode())
        total.update(hashlib.sha256(path.read_bytes()).digest())
    return total.hexdigest()
