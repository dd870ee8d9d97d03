"""``detector.weights`` of torchvision's families: a whole-detector state dict, or torchvision's COCO weights.

- A file: a torchvision-layout state dict of the whole detector (``model.state_dict()`` of the
  family's builder, what torchvision's ``*_Weights.COCO_V1`` download is), read with
  ``torch.load(..., weights_only=True)``.
- ``COCO_V1`` / ``DEFAULT``: torchvision's weight enum of the arch's builder, through torch's hub cache
  (``$TORCH_HOME/hub/checkpoints/<file name of the URL>``): read from the cache when there, downloaded
  into it where a hub is reachable, else a one-line error naming the expected cache file.

When the checkpoint's classes differ from the run's, the classification head's class-dependent
tensors (shape mismatches under ``head.classification_head.``) keep the fresh model's initialisation and
everything else is loaded. Any other missing, extra or reshaped key is a ``ConfigError`` naming the file
and the first mismatching key. ``num_batches_tracked`` may be absent (torchvision's COCO checkpoints
use FrozenBatchNorm, which has none): the model's own counter is kept.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from gankd_ray.config import ConfigError
from gankd_ray.models.weights import read_state_dict
from gankd_ray.utils import first_line

NAMED_WEIGHTS = ("COCO_V1", "DEFAULT")
CLASSIFICATION_HEAD = "head.classification_head."
DOWNLOAD_TIMEOUT_S = 30  # a hub that does not answer is "not reachable", not a hang

log = logging.getLogger(__name__)


def load_detection_weights(model: nn.Module, weights: str, family) -> None:
    """Load ``weights`` (a file, ``COCO_V1`` or ``DEFAULT``) into ``model``, a torchvision model of ``family``."""
    path = resolve_weights(weights, family)
    state = read_state_dict(path, what="detector weights file")
    merged, reinitialised = merge_state(model.state_dict(), state, path, family.name)
    model.load_state_dict(merged)
    if reinitialised:
        log.info("%s: classes differ, %d classification-head tensors re-initialised", path, len(reinitialised))


def check_detection_weights(cfg, family) -> None:
    """Check ``cfg.weights`` against ``family``'s layout without building real tensors (before any Ray work).

    The model is built on the ``meta`` device (no memory, no initialisation cost); a named weight set
    is resolved (downloaded into the hub cache if need be) so the workers find it there.
    """
    with torch.device("meta"):
        model = family.build_model(cfg)
    path = resolve_weights(cfg.weights, family)
    merge_state(model.state_dict(), read_state_dict(path, what="detector weights file"), path, family.name)


def resolve_weights(weights: str, family) -> Path:
    """The local file ``weights`` names: itself, or the hub-cache file of torchvision's named weights."""
    if weights.upper() not in NAMED_WEIGHTS:
        return Path(weights)
    if family.torchvision_weights is None:
        raise ConfigError(
            f"detector.weights={weights}: torchvision has no detection weights for arch {family.name}; "
            "give a state dict file"
        )
    enum = torchvision.models.get_model_weights(family.torchvision_weights)
    entry = enum.DEFAULT if weights.upper() == "DEFAULT" else enum["COCO_V1"]
    cache = hub_cache_file(entry.url)
    if not cache.is_file():
        _download(entry.url, cache, weights)
    return cache


def hub_cache_file(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps ``url``: ``<hub dir>/checkpoints/<file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _download(url: str, cache: Path, weights: str) -> None:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cache), progress=False)  # writes a temporary file, then renames
    except Exception as err:  # URLError, HTTPError, timeouts, OSError: all mean "not reachable here"
        raise ConfigError(
            f"detector.weights={weights}: {url} not reachable ({first_line(err)}) and no cached file {cache}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def merge_state(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], path: Path | str, arch: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``given`` completed to ``expected``'s keys; returns ``(state, re-initialised keys)``.

    Raises:
        ConfigError: ``{path}: not a {arch} state dict: first mismatching key 'KEY' (why)``.
    """
    merged: dict[str, torch.Tensor] = {}
    reinitialised: list[str] = []
    for key, value in expected.items():
        if key not in given:
            if not key.endswith("num_batches_tracked"):
                raise _mismatch(path, arch, key, "missing from the file")
            merged[key] = value
        elif given[key].shape != value.shape:
            if not key.startswith(CLASSIFICATION_HEAD):
                shapes = f"shape {tuple(given[key].shape)} in the file, {tuple(value.shape)} in {arch}"
                raise _mismatch(path, arch, key, shapes)
            reinitialised.append(key)
            merged[key] = value
        else:
            merged[key] = given[key]
    unexpected = [key for key in given if key not in expected]
    if unexpected:
        raise _mismatch(path, arch, unexpected[0], f"not a key of {arch}")
    return merged, reinitialised


def _mismatch(path: Path | str, arch: str, key: str, why: str) -> ConfigError:
    return ConfigError(f"{path}: not a {arch} state dict: first mismatching key {key!r} ({why})")
