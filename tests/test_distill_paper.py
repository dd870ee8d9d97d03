"""search_spaces/paper.yaml is the paper's recipe: the trial config a search builds from it carries exactly
the published hyperparameters, and its critics stride down to one score per image from a 1x1 map."""

from __future__ import annotations

from pathlib import Path

import optuna
import torch

from gankd_ray.config import DetectorConfig, RunConfig
from gankd_ray.distill import build_step
from gankd_ray.models import build_detector
from gankd_ray.tune.request import SearchRequest
from gankd_ray.tune.search import SearchJob
from gankd_ray.tune.space import load_space

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES, SIZE = 5, 160
TEACHER, STUDENT = "mobilenet_v2_0.5", "mobilenet_v2_0.35"


def paper_trial_config(tmp_path: Path) -> RunConfig:
    """What the search's trial driver builds for one trial of paper.yaml (Optuna's define-by-run call)."""
    base = RunConfig(
        detector=DetectorConfig(backbone=STUDENT, num_classes=NUM_CLASSES, image_size=SIZE),
        teacher=DetectorConfig(backbone=TEACHER, num_classes=NUM_CLASSES, image_size=SIZE),
    )
    space = load_space(ROOT / "search_spaces" / "paper.yaml", base)
    request = SearchRequest(storage=str(tmp_path), name="paper", max_epochs=2)
    job = SearchJob(base=base, space=space, teacher="unused", request=request)
    trial = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0)).ask()
    constants = space.sample(trial)
    assert trial.params == {}  # nothing is searched: the recipe is one point
    return job.trial_config({**trial.params, **(constants or {})})


def test_paper_trial_config_has_the_published_values(tmp_path: Path) -> None:
    cfg = paper_trial_config(tmp_path)
    distill, optim, disc = cfg.distill, cfg.optim, cfg.discriminator
    assert (cfg.role, distill.adv_loss, distill.clip, distill.adv_weight, distill.adv_warmup_epochs) == (
        "gankd",
        "wgan",
        0.03,
        1.0,
        0.0,
    )
    assert (distill.levels, distill.head_mode, distill.feat_weight, distill.n_critic) == ([], "teacher", 0.0, 1)
    # lr_D = lr_G = 5e-4, Adam with beta1 0.5 for the critics AND the student, weight decay 5e-4.
    assert (optim.optimizer, optim.lr, distill.lr_ratio, optim.weight_decay) == ("adam", 5e-4, 1.0, 5e-4)
    assert optim.betas == (0.5, 0.999) and optim.disc_betas == (0.5, 0.999)
    assert (disc.output, disc.norm) == ("strided", "none")
    assert (distill.instance_noise, distill.r1_weight, distill.standardize, distill.update) == (
        0.0,
        0.0,
        False,
        "simultaneous",
    )


def test_paper_critics_score_each_image_once_from_a_1x1_map(tmp_path: Path, synthetic_data: str) -> None:
    from gankd_ray.data.loader import DetectionBatchLoader

    cfg = paper_trial_config(tmp_path)
    torch.manual_seed(0)
    teacher = build_detector(cfg.teacher)
    step = build_step(cfg, teacher, student=build_detector(cfg.detector))
    assert all(g["betas"] == (0.5, 0.999) for g in step.student_optimizer.param_groups)
    assert all(g["betas"] == (0.5, 0.999) for g in step.disc_optimizer.param_groups)
    score_maps: dict[str, list[torch.Size]] = {}
    for level, disc in step.critics.discriminators.items():
        disc.score.register_forward_hook(
            lambda module, args, out, level=level: score_maps.setdefault(level, []).append(out.shape)
        )
    loader = DetectionBatchLoader.from_dataset(synthetic_data, "train", SIZE, 2, train=False, num_workers=0)
    images, targets, _ = next(iter(loader))
    metrics = step.train_step(images, targets, 0.0)
    assert set(score_maps) == {f"level{i}" for i in range(5)}
    assert all(shape == (2 * 2, 1, 1, 1) or shape == (2, 1, 1, 1) for shapes in score_maps.values() for shape in shapes)
    with torch.no_grad():
        _, fake = step.student(images, targets)
    for level, disc in step.critics.discriminators.items():
        assert disc(fake[level]).shape == (2, 1)
    assert all(f"disc/wdist/level{i}" in metrics for i in range(5))
    assert max(p.abs().max().item() for p in step.critics.parameters()) <= 0.03 + 1e-9  # clipped
