"""Export a trained student for inference: ``student.pt``, ``student.ts`` and ``card.json``.

- ``student.pt``: the model file format of ``gankd_ray.train.checkpoint`` (weights-only state dict plus
  the resolved config), loadable with ``torch.load(..., weights_only=True)``.
- ``student.ts``: TorchScript; a list of image tensors ([3,H,W] in [0,1], any size) in, torchvision-style
  detections (boxes xyxy in original coordinates, labels, scores) out. TorchScript is code (it can read and
  write files), so our own tools load it only on request (``--torchscript``), for trusted files.
- ``card.json``: hyperparameters, val metrics, teacher, dataset, parameter count, date.

Files are written to a staging folder and renamed into place, so an export is whole or absent.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from gankd_ray.train import checkpoint as ckpt

EXPORT_FILES = ("student.pt", "student.ts", "card.json")


class ExportError(ValueError):
    """An export directory is incomplete or unreadable."""


def export_model(model_file: str | Path, out_dir: str | Path, card: dict[str, Any]) -> Path:
    """Write the three export files for the model in ``model_file`` into ``out_dir`` (replaced whole)."""
    detector, config = ckpt.load_detector(model_file)
    out_dir = Path(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        torch.save(ckpt.model_payload(detector, config), staging / "student.pt")
        torch.jit.save(torch.jit.script(detector.eval()), str(staging / "student.ts"))
        full_card = {
            **card,
            "backbone": config.detector.backbone,
            "image_size": config.detector.image_size,
            "num_classes": config.detector.num_classes,
            "head_mode": config.distill.head_mode if config.role == "gankd" else "own",
            "dataset": config.data.path,
            "parameters": sum(p.numel() for p in detector.parameters()),
            "exported": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (staging / "card.json").write_text(json.dumps(full_card, indent=2, default=str) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def check_export(model_dir: str | Path, files: tuple[str, ...] = EXPORT_FILES) -> Path:
    """Raise ``ExportError`` naming the first of ``files`` missing from an export directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ExportError(f"{model_dir}: exported model directory not found")
    for name in files:
        if not (model_dir / name).is_file():
            raise ExportError(f"{model_dir}: missing {name} (not a complete gankd-ray export)")
    return model_dir
