"""RunConfig YAML round trip, typed overrides with clear errors, the paper recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import paper_recipe

from gankd_ray.config import (
    ConfigError,
    DetectorConfig,
    DiscriminatorConfig,
    DistillConfig,
    OptimConfig,
    RunConfig,
)


def _non_default_config() -> RunConfig:
    # Every section away from its defaults, with each field type: str, int, float, bool, list,
    # tuple, optional nested dataclass.
    return RunConfig(
        role="gankd",
        seed=7,
        detector=DetectorConfig(backbone="mobilenet_v2", num_classes=3, image_size=192),
        teacher=DetectorConfig(backbone="resnet50", num_classes=3, image_size=256, weights="/w/r50.pt"),
        distill=DistillConfig(
            levels=["level0", "level2"],
            head_mode="teacher",
            finetune_teacher_head=True,
            adv_loss="wgan-gp",
            adv_weight=0.5,
            adv_warmup_epochs=1.5,
            feat_weight=0.25,
            gp_weight=5.0,
            n_critic=3,
            lr_ratio=2.0,
            match_activation=False,
            standardize=True,
            instance_noise=0.2,
            instance_noise_epochs=3.0,
            r1_weight=5.0,
            update="alternating",
        ),
        discriminator=DiscriminatorConfig(depth=3, width=32, norm="instance", output="strided"),
        optim=OptimConfig(optimizer="sgd", lr=1e-3, betas=(0.5, 0.99), disc_betas=(0.0, 0.9), bf16=True),
    )


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = _non_default_config()
    path = tmp_path / "config.yaml"
    text = cfg.to_yaml(path)
    assert path.read_text() == text
    loaded = RunConfig.from_yaml(path)
    assert loaded == cfg
    assert isinstance(loaded.optim.disc_betas, tuple) and isinstance(loaded.teacher, DetectorConfig)


def test_overrides_parse_by_declared_type() -> None:
    cfg = RunConfig().with_overrides(
        [
            "distill.adv_weight=1",
            "optim.lr=1e-3",
            "distill.levels=[level1, level3]",
            "optim.bf16=true",
            "teacher.backbone=resnet18",
            "discriminator.depth=4.0",
        ]
    )
    assert cfg.distill.adv_weight == 1.0 and isinstance(cfg.distill.adv_weight, float)
    assert cfg.optim.lr == pytest.approx(1e-3)  # YAML 1.1 reads "1e-3" as a string
    assert cfg.distill.levels == ["level1", "level3"]
    assert cfg.optim.bf16 is True
    assert cfg.teacher is not None and cfg.teacher.backbone == "resnet18"
    assert cfg.discriminator.depth == 4 and isinstance(cfg.discriminator.depth, int)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("distill.adv_wieght=0.1", "unknown key 'adv_wieght'"),
        ("distil.adv_weight=0.1", "unknown key 'distil'"),
        ("distill.n_critic=two", r"distill.n_critic='two': expected an integer"),
        ("distill.n_critic=1.5", "expected an integer"),
        ("optim.bf16=1", "expected true or false"),
        ("distill.levels=level1", "expected a list"),
        ("optim.disc_betas=[0.5]", "expected 2 values"),
        ("distill.adv_weight", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_culprit(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig().with_overrides([override])


def test_distill_validation_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="distill.adv_loss"):
        DistillConfig(adv_loss="wgan-clip").validate()
    with pytest.raises(ConfigError, match="distill.n_critic"):
        DistillConfig(n_critic=0).validate()
    with pytest.raises(ConfigError, match="discriminator.norm"):
        DiscriminatorConfig(norm="layer").validate()


@pytest.mark.parametrize(
    "config, message",
    [
        (DistillConfig(update="sequential"), "distill.update='sequential'"),
        (DistillConfig(instance_noise=-0.1), "distill.instance_noise=-0.1"),
        (DistillConfig(instance_noise_epochs=0.0), "distill.instance_noise_epochs=0.0"),
        (DistillConfig(r1_weight=-1.0), "distill.r1_weight=-1.0"),
        (DiscriminatorConfig(output="pooled"), "discriminator.output='pooled'"),
        (OptimConfig(betas=(0.5, 1.0)), r"optim.betas=\[0.5, 1.0\]"),
        (OptimConfig(disc_betas=(-0.1, 0.9)), r"optim.disc_betas=\[-0.1, 0.9\]"),
    ],
)
def test_new_knobs_are_validated(config: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_paper_recipe() -> None:
    cfg = paper_recipe(RunConfig(role="gankd"))
    recipe = cfg.distill
    recipe.validate()
    assert (recipe.adv_loss, recipe.clip, recipe.levels, recipe.lr_ratio, recipe.adv_weight, recipe.head_mode) == (
        "wgan",
        0.03,
        [],
        1.0,
        1.0,
        "teacher",
    )
    assert RunConfig.from_dict(cfg.to_dict()).distill == recipe
