"""Typed run configuration: one dataclass per component, one resolved ``RunConfig``.

YAML gives defaults, ``key=value`` overrides (dotted paths such as ``distill.adv_weight=0.1``) come
from the CLI or a search trial, and the resolved config is written next to every checkpoint so a
checkpoint alone can rebuild its model. Values are parsed by the declared field type, never
evaluated as code. YAML is read by ``load_yaml`` (``yaml.SafeLoader`` that refuses aliases expanding
beyond ``MAX_YAML_NODES`` values, "billion laughs"), and every value an error echoes is cut short.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gankd_ray.errors import ConfigError, InputError  # ConfigError: imported from here too
from gankd_ray.utils import first_line, short_repr

# A config or space file has a few hundred values; aliases that multiply them past this are an attack
# (nested aliases of a few hundred bytes expand to gigabytes when anything walks or prints the value).
MAX_YAML_NODES = 10_000
ROLES = ("teacher", "student", "gankd")
HEAD_MODES = ("own", "teacher")
ADV_LOSSES = ("wgan", "wgan-gp", "lsgan", "bce", "hinge")
DISC_NORMS = ("none", "batch", "instance", "spectral")
DISC_OUTPUTS = ("global", "patch", "strided")
UPDATE_MODES = ("simultaneous", "alternating")
OPTIMIZERS = ("sgd", "adam", "adamw")


class YamlBombError(InputError, yaml.YAMLError):
    """A YAML document whose aliases expand beyond ``MAX_YAML_NODES`` values, or refer to themselves."""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain data only) that checks the size of each document with aliases expanded."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _expanded_size(node, {}, set())
        return node


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with bounds; every failure is a ``yaml.YAMLError`` with a one-line message."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
    except ValueError as err:  # an integer of over 4300 digits
        raise yaml.YAMLError(first_line(err)) from None


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Values under ``node`` counting each alias as a copy; each distinct node is visited once."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise YamlBombError(f"line {node.start_mark.line + 1}: an alias refers to the value that contains it")
    open_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = []
    total = 1 + sum(_expanded_size(child, sizes, open_nodes) for child in children)
    if total > MAX_YAML_NODES:
        raise YamlBombError(f"line {node.start_mark.line + 1}: aliases expand to more than {MAX_YAML_NODES} values")
    open_nodes.discard(id(node))
    sizes[id(node)] = total
    return total


SSD_ARCH = "ssd"  # the default family: our SSD over a registered backbone


@dataclass
class DetectorConfig:
    """A one-stage detector: the SSD family over a registered backbone (``arch=ssd``) or a torchvision builder.

    Attributes:
        arch: detector family, see ``gankd_ray.models.available_archs()``: ``ssd`` (the default, over
            ``backbone``) or a torchvision one-stage builder such as ``retinanet_resnet50_fpn``.
        backbone: registry name, see ``gankd_ray.models.available_backbones()`` (``arch=ssd`` only).
        num_classes: foreground classes (background is added internally); 0 = take from the dataset.
        image_size: square model input in pixels (``arch=ssd``: 160..512; other families 64..1024 and
            their own minimum, see ``gankd_ray.models.families``).
        weights: ``arch=ssd``: optional local torchvision-layout backbone state dict (ImageNet weights).
            Other families: a torchvision-layout state dict of the whole detector, or ``COCO_V1`` /
            ``DEFAULT`` for torchvision's weights of that builder (through torch's hub cache).
        score_thresh / nms_thresh / detections_per_img: post-processing.
    """

    arch: str = "ssd"
    backbone: str = "mobilenet_v3_small"
    num_classes: int = 0
    image_size: int = 160
    weights: str | None = None
    score_thresh: float = 0.01
    nms_thresh: float = 0.45
    detections_per_img: int = 100

    def validate(self, where: str = "detector") -> None:
        # The SSD family's fixed anchor layout is tuned for 160..512 (see gankd_ray.models.detector);
        # torchvision's families bring their own anchors and run from 64 px (ssd300_vgg16 needs more,
        # checked with the family in gankd_ray.models.check_detector_config).
        low, high = (160, 512) if self.arch == SSD_ARCH else (64, 1024)
        if not low <= self.image_size <= high:
            raise ConfigError(f"{where}.image_size={self.image_size}: must be in {low}..{high} for arch {self.arch}")
        if self.num_classes < 0:
            raise ConfigError(f"{where}.num_classes={self.num_classes}: must be >= 0")
        _check_unit_interval(f"{where}.score_thresh", self.score_thresh)
        _check_unit_interval(f"{where}.nms_thresh", self.nms_thresh)
        if self.detections_per_img < 1:
            raise ConfigError(f"{where}.detections_per_img={self.detections_per_img}: must be >= 1")
        # The backbone name is checked against the registry by gankd_ray.models.check_detector_config: the
        # registry is the models' business, and config stays free of torch.


@dataclass
class DiscriminatorConfig:
    """One discriminator per distilled level: ``depth`` strided conv blocks of ``width`` channels.

    ``output``: ``global`` (the mean of the score map), ``patch`` (the map) or ``strided`` (the
    paper's critic: strided blocks continue, at least ``depth`` of them, until the level's map is
    1x1, whose one value is the image's score).
    """

    depth: int = 2
    width: int = 64
    norm: str = "spectral"
    output: str = "global"

    def validate(self) -> None:
        if not 1 <= self.depth <= 6:
            raise ConfigError(f"discriminator.depth={self.depth}: must be in 1..6")
        if self.width < 1:
            raise ConfigError(f"discriminator.width={self.width}: must be >= 1")
        _check_choice("discriminator.norm", self.norm, DISC_NORMS)
        _check_choice("discriminator.output", self.output, DISC_OUTPUTS)


@dataclass
class DistillConfig:
    """GAN-KD settings (ignored unless role is ``gankd``).

    Attributes:
        levels: distilled level names (``level0``...); empty list = every level of the detector.
        head_mode: ``own`` (student keeps its head) or ``teacher`` (student features go through the
            teacher's head, the paper's setting).
        finetune_teacher_head: in ``teacher`` head mode, train the inherited head too.
        adv_loss: one of ``ADV_LOSSES``.
        adv_weight: weight of the adversarial term in the student loss.
        adv_warmup_epochs: adv_weight ramps linearly from 0 over this many epochs (0 = no ramp).
        feat_weight: weight of an L2 feature-imitation term (0 = off).
        clip: critic weight clipping bound for ``wgan``.
        gp_weight: gradient-penalty weight for ``wgan-gp``.
        n_critic: discriminator steps per student step.
        lr_ratio: lr_D / lr_G.
        match_activation: each adapter ends in its teacher tap's own activation (ReLU after a
            post-ReLU tap), so adapted student maps have the kind of the teacher's.
        standardize: standardise teacher and student maps per channel (batch and spatial
            statistics, each side its own) before the critics and the imitation term.
        instance_noise: std of Gaussian noise added to every critic input (both sides), annealed
            linearly to 0 over ``instance_noise_epochs`` (0 = off).
        instance_noise_epochs: the annealing span, in epochs of progress (> 0).
        r1_weight: gamma of the R1 penalty ``gamma / 2 * E||grad_x D(teacher)||^2`` (0 = off).
        update: ``simultaneous`` (critic and student gradients at the same point, one step each,
            ``n_critic - 1`` extra critic updates on the same maps) or ``alternating``
            (``n_critic`` steps that update only the critics, each on its own batch, then one
            that updates only the student).
    """

    levels: list[str] = field(default_factory=list)
    head_mode: str = "own"
    finetune_teacher_head: bool = False
    adv_loss: str = "lsgan"
    adv_weight: float = 0.1
    adv_warmup_epochs: float = 0.0
    feat_weight: float = 0.0
    clip: float = 0.03
    gp_weight: float = 10.0
    n_critic: int = 1
    lr_ratio: float = 1.0
    match_activation: bool = True
    standardize: bool = False
    instance_noise: float = 0.0
    instance_noise_epochs: float = 1.0
    r1_weight: float = 0.0
    update: str = "simultaneous"

    def validate(self) -> None:
        _check_choice("distill.head_mode", self.head_mode, HEAD_MODES)
        _check_choice("distill.adv_loss", self.adv_loss, ADV_LOSSES)
        _check_choice("distill.update", self.update, UPDATE_MODES)
        for name in ("adv_weight", "feat_weight", "adv_warmup_epochs", "gp_weight", "instance_noise", "r1_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"distill.{name}={getattr(self, name)}: must be >= 0")
        for name in ("clip", "lr_ratio", "instance_noise_epochs"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"distill.{name}={getattr(self, name)}: must be > 0")
        if self.n_critic < 1:
            raise ConfigError(f"distill.n_critic={self.n_critic}: must be >= 1")
        if len(set(self.levels)) != len(self.levels):
            raise ConfigError(f"distill.levels={short_repr(self.levels)}: duplicate level")


@dataclass
class OptimConfig:
    """Student (generator) optimisation; the discriminators use Adam at lr * distill.lr_ratio.

    ``betas`` are the student's Adam/AdamW betas, ``disc_betas`` the critics' Adam betas.
    """

    optimizer: str = "adamw"
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 8
    epochs: int = 4
    warmup_epochs: float = 0.5
    betas: tuple[float, float] = (0.9, 0.999)
    disc_betas: tuple[float, float] = (0.5, 0.999)
    grad_clip: float = 10.0
    bf16: bool = False

    def validate(self) -> None:
        _check_choice("optim.optimizer", self.optimizer, OPTIMIZERS)
        if not self.lr > 0:
            raise ConfigError(f"optim.lr={self.lr}: must be > 0")
        if self.batch_size < 1:
            raise ConfigError(f"optim.batch_size={self.batch_size}: must be >= 1")
        if self.epochs < 1:
            raise ConfigError(f"optim.epochs={self.epochs}: must be >= 1")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or self.grad_clip < 0:
            raise ConfigError("optim.weight_decay, warmup_epochs and grad_clip must be >= 0")
        for name in ("betas", "disc_betas"):
            if not all(0.0 <= beta < 1.0 for beta in getattr(self, name)):
                raise ConfigError(f"optim.{name}={list(getattr(self, name))}: each beta must be in [0, 1)")


@dataclass
class DataConfig:
    """Where the prepared dataset lives (local path or pyarrow URI) and how it is loaded.

    ``cache_dir``: the node-local folder where a remote dataset and teacher are downloaded once per node
    (``gankd_ray.node_cache``); empty = ``$GANKD_RAY_CACHE``, else ``~/.cache/gankd-ray``, resolved on each
    node. ``cache_reserve_mb``: free space a cached copy must leave on that disk; a copy that does not fit is
    not made and the run reads from storage.
    """

    path: str = ""
    train_split: str = "train"
    val_split: str = "val"
    loader_workers: int = 1
    # Rows held to shuffle the streamed training share: the loader's memory is this, not the split.
    shuffle_buffer: int = 1024
    hflip: bool = True
    jitter: float = 0.2
    cache_dir: str = ""
    cache_reserve_mb: float = 1024.0

    def validate(self) -> None:
        # Workers run on other nodes in other working directories: only an absolute folder (or one under
        # the node's home, ~) means the same place there.
        if self.cache_dir and not self.cache_dir.startswith(("/", "~")):
            raise ConfigError(
                f"data.cache_dir={short_repr(self.cache_dir)}: must be an absolute local folder (or start with ~)"
            )
        if not self.cache_reserve_mb >= 0:
            raise ConfigError(f"data.cache_reserve_mb={self.cache_reserve_mb}: must be >= 0")
        if self.loader_workers < 0:
            raise ConfigError(f"data.loader_workers={self.loader_workers}: must be >= 0")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer={self.shuffle_buffer}: must be >= 1")


@dataclass
class RunConfig:
    """Everything needed to rebuild a run (or a checkpoint's model) from one file."""

    role: str = "gankd"
    seed: int = 0
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    teacher: DetectorConfig | None = None
    distill: DistillConfig = field(default_factory=DistillConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        _check_choice("role", self.role, ROLES)
        self.detector.validate("detector")
        if self.teacher is not None:
            self.teacher.validate("teacher")
        self.distill.validate()
        self.discriminator.validate()
        self.optim.validate()
        self.data.validate()

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> RunConfig:
        return _from_dict(cls, data, where)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            from gankd_ray.utils import atomic_write_text

            atomic_write_text(path, text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        try:
            data = load_yaml(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read the config file ({first_line(err)})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {first_line(err)}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        return cls.from_dict(data, where=str(path))

    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> RunConfig:
        """A copy with dotted-key overrides applied (``["distill.adv_weight=0.1"]`` or a dict)."""
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides)
        data = self.to_dict()
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                if key == "teacher" and node.get(key) is None:
                    node[key] = _to_plain(dataclasses.asdict(DetectorConfig()))
                if not isinstance(node.get(key), dict):
                    raise ConfigError(f"override {short_repr(dotted)}: unknown key {short_repr(key)}")
                node = node[key]
            if leaf not in node:
                raise ConfigError(f"override {short_repr(dotted)}: unknown key {short_repr(leaf)}")
            node[leaf] = value
        return RunConfig.from_dict(data, where="overrides")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` -> ``{"a.b": 1, "c": ["x", "y"]}``; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {short_repr(item)}: expected key=value")
        try:
            out[key.strip()] = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {short_repr(item)}: value is not valid YAML ({first_line(err)})") from None
    return out


def from_plain(cls: type, data: Any, where: str) -> Any:
    """A dataclass ``cls`` from plain data (parsed YAML), each value checked against its field's type."""
    return _from_dict(cls, data, where)


# --------------------------------------------------------------------------------------------
# helpers


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={short_repr(value)}: must be one of {', '.join(choices)}")


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}={value}: must be in [0, 1]")


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)  # keys may be of any YAML type
    if unknown:
        raise ConfigError(f"{where}: unknown key {short_repr(unknown[0])}")
    kwargs = {key: _coerce(hints[key], value, f"{where}.{key}" if where else key) for key, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; a clear error names the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, name)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, name)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}={short_repr(value)}: expected a list")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item_tp, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={short_repr(value)}: expected a list")
        item_tps = typing.get_args(tp)
        if len(value) != len(item_tps):
            raise ConfigError(f"{name}={short_repr(value)}: expected {len(item_tps)} values")
        return tuple(_coerce(t, v, f"{name}[{i}]") for i, (t, v) in enumerate(zip(item_tps, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={short_repr(value)}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name}={short_repr(value)}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML 1.1 reads "1e-3" as a string
                except ValueError:
                    pass
            raise ConfigError(f"{name}={short_repr(value)}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={short_repr(value)}: expected a string")
        return value
    raise ConfigError(f"{name}: unsupported type {tp}")  # pragma: no cover - programming error
