"""Cross-family GAN-KD through the real train command: ``--dry-run`` pairs, bad input (exit 2, before Ray), and
one Ray Train epoch per required pair (run under the shared Ray lock: these start Ray or the launch scripts).

The Ray epochs are small (two 8-image batches per epoch on one worker); the ResNet50 teachers make them
the slowest tests of this file (about a minute each on a loaded 2-core CPU).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import flags

from gankd_ray.cli import train as train_cli
from gankd_ray.config import RunConfig
from gankd_ray.data import read_dataset_info
from gankd_ray.models import build_detector, family_of
from gankd_ray.records import read_metrics
from gankd_ray.train.checkpoint import model_payload, save_torch
from gankd_ray.train.run import run_training

REPO = Path(__file__).resolve().parents[1]
TRAIN_CLI = REPO / "launch" / "train.py"
VGG_SIZE = family_of("ssd300_vgg16").min_image_size
FAST = ["optim.batch_size=8", "data.loader_workers=0", "optim.bf16=false"]


def write_teacher(data: str, path: Path, arch: str, image_size: int) -> str:
    """A random-initialised teacher of ``arch`` saved as a gankd-ray model file for ``data``'s classes."""
    cfg = RunConfig(role="teacher")
    cfg.data.path = data
    cfg.detector.arch = arch
    cfg.detector.image_size = image_size
    cfg.detector.num_classes = len(read_dataset_info(data)["classes"])
    torch.manual_seed(0)
    return save_torch(model_payload(build_detector(cfg.detector), cfg), path)


@pytest.fixture(scope="module")
def fcos18_teacher(synthetic_data, tmp_path_factory) -> str:
    return write_teacher(synthetic_data, tmp_path_factory.mktemp("fcos18") / "model.pt", "fcos_resnet18_fpn", 128)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TRAIN_CLI), *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )


def _gankd_args(data: str, teacher: str, storage: Path, *overrides: str) -> list[str]:
    return [*flags(role="gankd", data=data, teacher=teacher, storage=storage, name="kd"), *overrides]


def test_dry_run_prints_the_distilled_level_pairs_and_exits_0(synthetic_data, fcos18_teacher, tmp_path):
    proc = _cli(
        *_gankd_args(synthetic_data, fcos18_teacher, tmp_path / "runs"),
        "--dry-run",
        "detector.arch=ssdlite320_mobilenet_v3_large",
        "detector.image_size=128",
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "teacher arch fcos_resnet18_fpn at 128 px" in out
    assert "level0 (stride 16) <- teacher level1 (stride 16)" in out
    assert "level3 (stride 128) <- teacher level4 (stride 128)" in out
    assert "level4 (stride 256) not distilled" in out and "level5 (stride 512) not distilled" in out
    assert not (tmp_path / "runs" / "kd").exists() or not any((tmp_path / "runs" / "kd").iterdir())


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["detector.arch=yolo"], "detector.arch='yolo': unknown arch"),
        (
            ["detector.arch=ssdlite320_mobilenet_v3_large", "detector.image_size=128", "distill.levels=[level5]"],
            "distill.levels: level5 (stride 512) has no teacher level of that stride",
        ),
        (["detector.arch=fcos_resnet18_fpn", "detector.image_size=128", "detector.weights={retina}"], "{retina}"),
    ],
    ids=["unknown-arch", "no-common-stride", "weights-of-another-arch"],
)
def test_bad_family_input_is_one_line_exit_2_before_ray(overrides, expected, synthetic_data, fcos18_teacher, tmp_path):
    retina = tmp_path / "retina.pth"
    torch.manual_seed(0)
    cfg = RunConfig().detector
    cfg.arch, cfg.num_classes, cfg.image_size = "retinanet_resnet18_fpn", 2, 128
    torch.save(build_detector(cfg).state_dict(), retina)
    overrides = [item.format(retina=retina) for item in overrides]
    proc = _cli(*_gankd_args(synthetic_data, fcos18_teacher, tmp_path / "runs"), *overrides)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    expected = expected.format(retina=retina)
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    if str(retina) in expected:
        assert "not a fcos_resnet18_fpn state dict: first mismatching key" in lines[0]
    assert "ray" not in proc.stderr.lower()


RAY_PAIRS = [
    ("retinanet_resnet50_fpn", 128, ["detector.backbone=mobilenet_v3_small", "detector.image_size=160"]),
    ("ssd300_vgg16", VGG_SIZE, ["detector.arch=ssdlite320_mobilenet_v3_large", "detector.image_size=128"]),
    ("fcos_resnet50_fpn", 128, ["detector.arch=fcos_mobilenet_v3_large_fpn", "detector.image_size=128"]),
]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from gankd_ray.cluster import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.mark.parametrize(("teacher_arch", "teacher_size", "student"), RAY_PAIRS, ids=[p[0] for p in RAY_PAIRS])
def test_one_ray_train_epoch_across_families(teacher_arch, teacher_size, student, local_ray, synthetic_data, tmp_path):
    teacher = write_teacher(synthetic_data, tmp_path / "teacher.pt", teacher_arch, teacher_size)
    argv = [*_gankd_args(synthetic_data, teacher, tmp_path / "runs"), "--epochs", "1", *FAST, *student]
    job = train_cli.build_job(train_cli.parse_args(argv))
    summary = run_training(job)
    assert summary.status == "completed", summary
    records = read_metrics(job.run_dir)
    assert len(records) == 1 and any(key.startswith("disc/") for key in records[-1]), sorted(records[-1])
