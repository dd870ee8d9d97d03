"""What one training run is (``TrainJob``): config, locations, resources, who runs it. Ray-free plain data.

A job is built once where the user's input arrives (a command, a search trial), checked by ``resolve_job``
before any Ray work, and handed as it is to every worker (``gankd_ray.train.engine.fit``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gankd_ray import storage
from gankd_ray.config import SSD_ARCH, RunConfig
from gankd_ray.errors import InputError
from gankd_ray.records import RunContext

RESOLVED_CONFIG_FILE = "resolved_config.yaml"


@dataclass
class Resources:
    """What each data-parallel worker of a run gets (a search gives every trial the same)."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def backend(self) -> str:
        return "nccl" if self.use_gpu else "gloo"

    def per_worker(self) -> dict[str, float]:
        """Ray's resource request of one worker."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.use_gpu else {})}

    def total(self) -> dict[str, float]:
        """What the whole run holds while it trains."""
        return {"CPU": self.workers * self.cpus_per_worker, "GPU": self.workers * self.gpus_per_worker}

    def validate(self) -> None:
        if self.workers < 1 or self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise InputError("--workers must be >= 1, --cpus-per-worker > 0, --gpus-per-worker >= 0")


@dataclass
class TrainJob:
    """One TorchTrainer run: what to train, where it lives, its resources, and who runs it."""

    config: RunConfig
    storage: str
    name: str
    teacher: str | None = None
    resources: Resources = field(default_factory=Resources)
    max_failures: int = 2
    context: RunContext = field(default_factory=RunContext)
    measure_cost: bool = False  # the student's latency, parameters and FLOPs on every record (rank 0)

    def __post_init__(self) -> None:
        # Workers run in other working directories (and on other nodes): only absolute locations travel.
        self.storage = storage.normalize_uri(self.storage)
        if self.teacher:
            self.teacher = storage.normalize_uri(self.teacher)

    @property
    def run_dir(self) -> str:
        return storage.join(self.storage, self.name)


def resolve_job(job: TrainJob) -> TrainJob:
    """Check every input and fill what the dataset and teacher imply. Raises ``InputError`` (or a subclass).

    Runs before Ray starts so that bad input costs seconds: data path and format, teacher file,
    teacher/dataset/student compatibility, config values, storage writability.
    """
    from gankd_ray.data import DatasetError, read_dataset_info

    cfg = job.config
    if not cfg.data.path:
        raise InputError("--data: no dataset given")
    cfg.data.path = storage.normalize_uri(cfg.data.path)
    try:
        info = read_dataset_info(cfg.data.path)
    except DatasetError as err:
        raise err.under("--data") from None
    except OSError as err:
        raise InputError(str(err), flag="--data") from None
    num_classes = len(info["classes"])
    if cfg.detector.num_classes not in (0, num_classes):
        raise InputError(
            f"detector.num_classes={cfg.detector.num_classes} but dataset {cfg.data.path} has {num_classes} classes"
        )
    cfg.detector.num_classes = num_classes
    if cfg.role == "gankd":
        cfg.teacher = _check_teacher(job.teacher, cfg, info)
    elif job.teacher:
        raise InputError(f"--teacher is only used with --role gankd (role is {cfg.role})")
    cfg.validate()
    from gankd_ray.models import check_detector_config

    check_detector_config(cfg.detector, "detector")
    _check_detector_weights(cfg)
    _check_levels(cfg)
    if cfg.role == "gankd":
        distilled_level_pairs(cfg)  # a pair with no common stride fails here, before Ray
    job.resources.validate()
    try:
        storage.check_writable(job.run_dir)
    except OSError as err:
        raise InputError(str(err), flag="--storage") from None
    return job


def _check_teacher(teacher: str | None, cfg: RunConfig, info: dict[str, Any]):
    from gankd_ray.train.checkpoint import CheckpointError, load_detector

    if not teacher:
        raise InputError("--role gankd needs --teacher CKPT (a checkpoint of a teacher run)")
    try:
        # Build it and load its weights now: a file whose weights belong to another architecture than
        # its config names would otherwise only fail inside the Ray workers.
        _, teacher_cfg = load_detector(teacher)
    except CheckpointError as err:
        raise err.under("--teacher") from None
    tdet = teacher_cfg.detector
    if tdet.num_classes != len(info["classes"]):
        raise InputError(
            f"--teacher {teacher}: teacher has {tdet.num_classes} classes, dataset {cfg.data.path} has "
            f"{len(info['classes'])}"
        )
    # The SSD family keeps one input size for both sides; across families the teacher sees its own input
    # size (FrozenTeacher resizes the batch) and the adapters interpolate each level to the teacher's map.
    same_family = tdet.arch == cfg.detector.arch == SSD_ARCH
    if same_family and tdet.image_size != cfg.detector.image_size:
        raise InputError(
            f"--teacher {teacher}: teacher input size {tdet.image_size} != student input size "
            f"{cfg.detector.image_size} (set detector.image_size={tdet.image_size})"
        )
    return dataclasses.replace(tdet, weights=None)


def _check_detector_weights(cfg: RunConfig) -> None:
    """A whole-detector weights file (or named weight set) of a torchvision family must fit the arch: checked
    on a meta-device model now, not in the workers (the SSD family's ImageNet file is read when built)."""
    if cfg.detector.arch == SSD_ARCH or not cfg.detector.weights:
        return
    from gankd_ray.models import family_of
    from gankd_ray.models.detection_weights import check_detection_weights

    check_detection_weights(cfg.detector, family_of(cfg.detector.arch))


def distilled_level_pairs(cfg: RunConfig) -> dict[str, str]:
    """``{student level: teacher level}`` a GAN-KD run of ``cfg`` distils (``cfg.teacher`` resolved), from the
    configs alone; ``InputError`` when the pair has no common stride or the teacher head mode spans families."""
    from gankd_ray.distill.pairs import level_pairs
    from gankd_ray.distill.teacher_head import check_teacher_head_archs
    from gankd_ray.models import level_strides_for

    if cfg.distill.head_mode == "teacher":
        check_teacher_head_archs(cfg.detector.arch, cfg.teacher.arch)
    student = level_strides_for(cfg.detector, "detector")
    teacher = level_strides_for(cfg.teacher, "teacher")
    return level_pairs(student, teacher, cfg.distill.levels)


def _check_levels(cfg: RunConfig) -> None:
    # Every role: a search builds its GAN-KD trials from the baseline's config, levels included.
    if not cfg.distill.levels:
        return
    from gankd_ray.models import level_names_for

    known = level_names_for(cfg.detector)
    unknown = [lvl for lvl in cfg.distill.levels if lvl not in known]
    if unknown:
        raise InputError(f"distill.levels: {unknown[0]!r} is not a level of {_detector_name(cfg)} ({', '.join(known)})")


def _detector_name(cfg: RunConfig) -> str:
    """The SSD family is known by its backbone, the others by their arch."""
    return cfg.detector.backbone if cfg.detector.arch == SSD_ARCH else cfg.detector.arch
