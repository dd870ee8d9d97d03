"""gankd-ray checkpoints: weights-only files that carry their resolved config.

A training checkpoint is a directory (what Ray Train persists per report) holding:

- ``model.pt``: ``{"format": "gankd-ray-model", "version": 1, "config": RunConfig dict,
  "state_dict": detector state dict}``. This alone rebuilds the detector (a teacher for a ``gankd``
  run, or an exported student).
- ``train_state.pt``: everything else resume needs (step state: optimizers, schedulers,
  discriminators, adapters; epoch; RNG states; history of best metrics).

Every file is loaded with ``torch.load(..., weights_only=True)``: a file carrying a pickled code payload
is refused and its payload never runs.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gankd_ray import storage
from gankd_ray.config import ConfigError, RunConfig
from gankd_ray.errors import InputError
from gankd_ray.utils import first_line

MODEL_FILE = "model.pt"
TRAIN_STATE_FILE = "train_state.pt"
MODEL_FORMAT = "gankd-ray-model"
FORMAT_VERSION = 1


class CheckpointError(InputError):
    """A checkpoint file is missing, unsafe, or not a gankd-ray checkpoint."""


def save_torch(obj: Any, location: str | Path) -> str:
    """``torch.save`` to any storage location, whole or not at all (``gankd_ray.storage``)."""
    storage.save_torch(obj, str(location))
    return str(location)


def load_torch(location: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load with ``weights_only=True`` from any storage location; anything that needs arbitrary unpickling
    is refused."""
    path = str(location)
    try:
        source = storage.open_for_torch(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found") from None
    except OSError as err:
        raise CheckpointError(str(err)) from None
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = first_line(err) if str(err).strip() else "unsafe content"
        raise CheckpointError(f"{path}: refused, not a weights-only checkpoint ({detail})") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({first_line(err)})") from None


def model_payload(detector: torch.nn.Module, config: RunConfig) -> dict[str, Any]:
    return {
        "format": MODEL_FORMAT,
        "version": FORMAT_VERSION,
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in detector.state_dict().items()},
    }


def resolve_model_file(location: str | Path) -> str:
    """A checkpoint directory, an export directory or a ``.pt`` file (any storage location) -> the model file."""
    path = str(location)
    try:
        if storage.is_dir(path):
            for name in (MODEL_FILE, "student.pt"):
                if storage.is_file(storage.join(path, name)):
                    return storage.join(path, name)
            raise CheckpointError(f"{path}: no {MODEL_FILE} or student.pt in this directory")
        if not storage.exists(path):
            raise CheckpointError(f"{path}: checkpoint not found")
    except CheckpointError:
        raise
    except OSError as err:
        raise CheckpointError(str(err)) from None
    return path


def read_model_file(path: str | Path) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """Load and check a model file: returns its resolved config and detector state dict."""
    file = resolve_model_file(path)
    payload = load_torch(file)
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{file}: not a gankd-ray model checkpoint (no format tag {MODEL_FORMAT!r})")
    try:
        config = RunConfig.from_dict(payload["config"], where=f"{file}:config")
    except (ConfigError, KeyError) as err:
        raise CheckpointError(f"{file}: invalid embedded config ({err})") from None
    return config, payload["state_dict"]


def load_detector(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the detector a model file describes and load its weights (eval mode)."""
    from gankd_ray.distill import build_student

    config, state = read_model_file(path)
    config.detector = _without_weights(config.detector)
    detector = build_student(config)  # the architecture this config trains (teacher head mode included)
    try:
        detector.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"{resolve_model_file(path)}: weights do not match {_architecture(config.detector)} ({first_line(err)})"
        ) from None
    return detector.to(device).eval(), config


def _architecture(detector_cfg) -> str:
    """``backbone 'NAME'`` for the SSD family (the message tests and users know), ``arch 'NAME'`` otherwise."""
    if detector_cfg.arch == "ssd":
        return f"backbone {detector_cfg.backbone!r}"
    return f"arch {detector_cfg.arch!r}"


def _without_weights(detector_cfg):
    """The ImageNet file is only an initialisation: a checkpoint's own weights replace it."""
    import dataclasses

    return dataclasses.replace(detector_cfg, weights=None)


# --------------------------------------------------------------------------------------------
# RNG state (kept weights-only safe: tensors, ints, lists)


def rng_state() -> dict[str, Any]:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
