"""The step under real torch DDP (gloo, one process): DDP's reducer rejects a second forward before
a backward and parameters that get no gradient, so this checks the one-forward-per-backward design."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gankd_ray.config import DetectorConfig, DiscriminatorConfig, DistillConfig, RunConfig
from gankd_ray.distill import build_step
from gankd_ray.models import build_detector

torch.set_num_threads(1)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")


@pytest.fixture()
def process_group(tmp_path: Path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# The regularised, alternating game: critic-only steps (student forward without a graph) and
# student-only steps (critic terms from the unwrapped critics), R1 inside the critics' DDP forward.
REGULARISED = {"update": "alternating", "r1_weight": 1.0, "instance_noise": 0.1, "standardize": True}


@pytest.mark.parametrize(
    ("head_mode", "adv_loss", "norm", "output", "extra"),
    [
        ("own", "wgan-gp", "spectral", "global", {}),
        ("teacher", "lsgan", "batch", "global", {}),
        ("teacher", "wgan", "instance", "global", {}),
        ("own", "lsgan", "spectral", "strided", REGULARISED),
    ],
)
def test_step_under_ddp(
    process_group: None, head_mode: str, adv_loss: str, norm: str, output: str, extra: dict
) -> None:
    cfg = RunConfig(
        detector=DetectorConfig(backbone="mobilenet_v2_0.35", num_classes=3),
        teacher=DetectorConfig(backbone="mobilenet_v2_0.5", num_classes=3),
        distill=DistillConfig(head_mode=head_mode, adv_loss=adv_loss, n_critic=2, feat_weight=0.1, **extra),
        discriminator=DiscriminatorConfig(norm=norm, output=output),
    )
    torch.manual_seed(0)
    wrapped: list[DistributedDataParallel] = []

    def ddp(module: torch.nn.Module) -> torch.nn.Module:
        wrapped.append(DistributedDataParallel(module))
        return wrapped[-1]

    step = build_step(cfg, build_detector(cfg.teacher), wrap=ddp)
    images = torch.rand(2, 3, 160, 160)
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 100.0]]), "labels": torch.tensor([2])}] * 2
    for progress in (0.0, 0.1, 0.2):  # the reducer's unused-parameter check fires on the next forward
        metrics = step.train_step(images, targets, progress)
    assert len(wrapped) == 2 and all(v == v for v in metrics.values())
