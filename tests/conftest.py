"""Shared fixtures: small generated datasets, reusable by every test module."""

from __future__ import annotations

from pathlib import Path

import pytest

from gankd_ray.data.records import Rejections
from gankd_ray.data.sources.synthetic import SyntheticSpec, synthetic_source_data
from gankd_ray.data.writer import write_dataset

SYNTHETIC_TEST_SPEC = SyntheticSpec(seed=0, image_size=160, num_train=48, num_val=16, num_test=16)
SYNTHETIC_ROWS_PER_SHARD = 20  # train splits into files of 20, 20 and 8 rows: readers see several shards


def make_synthetic_dataset(
    out: Path, spec: SyntheticSpec = SYNTHETIC_TEST_SPEC, rows_per_shard: int = SYNTHETIC_ROWS_PER_SHARD
) -> Path:
    """Write a synthetic prepared dataset at ``out`` quietly; returns ``out``."""
    write_dataset(out, synthetic_source_data(spec), Rejections(), rows_per_shard=rows_per_shard, log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a prepared synthetic dataset: 160 px, 48 train / 16 val / 16 test images, 5 classes.

    Session-scoped and shared: treat it as read-only.
    """
    return str(make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "data"))


def write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A small noisy RGB image (format from the suffix: .png, .jpg)."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_untrained_teacher(data: str, path: Path, backbone: str = "mobilenet_v2_0.5") -> str:
    """A randomly initialised teacher saved as a gankd-ray model file for ``data``'s classes: tests of
    faults and orchestration need a valid teacher, not a good one."""
    import torch

    from gankd_ray.config import RunConfig
    from gankd_ray.data import read_dataset_info
    from gankd_ray.models import build_detector
    from gankd_ray.train.checkpoint import model_payload, save_torch

    cfg = RunConfig(role="teacher")
    cfg.detector.backbone = backbone
    cfg.detector.num_classes = len(read_dataset_info(data)["classes"])
    torch.manual_seed(0)
    save_torch(model_payload(build_detector(cfg.detector), cfg), path)
    return str(path)


@pytest.fixture(scope="session")
def untrained_teacher(synthetic_data, tmp_path_factory) -> str:
    """Path of an untrained mobilenet_v2_0.5 teacher for ``synthetic_data`` (read-only, shared)."""
    return write_untrained_teacher(synthetic_data, tmp_path_factory.mktemp("teacher") / "model.pt")


def read_trials_metrics(trials_dir: Path) -> dict[str, list[dict]]:
    """Every run under ``trials_dir`` that has a metrics log: ``{run folder name: records}``."""
    from gankd_ray.train.run import METRICS_FILE, read_metrics

    return {path.parent.name: read_metrics(str(path.parent)) for path in sorted(trials_dir.glob(f"*/{METRICS_FILE}"))}
