"""Export a trained student for inference: ``student.pt``, ``student.ts``, ``student.onnx`` and ``card.json``.

- ``student.pt``: the model file format of ``gankd_ray.train.checkpoint`` (weights-only state dict plus
  the resolved config), loadable with ``torch.load(..., weights_only=True)``.
- ``student.ts``: TorchScript; a list of image tensors ([3,H,W] in [0,1], any size) in, torchvision-style
  detections (boxes xyxy in original coordinates, labels, scores) out. TorchScript is code (it can read and
  write files), so our own tools load it only on request (``--torchscript``), for trusted files.
- ``student.onnx``: the network (normalisation, backbone, head) as an ONNX graph with a dynamic batch axis,
  ``images [B,3,S,S]`` in [0,1] -> per-anchor ``cls_logits``, ``bbox_regression`` and the ``anchors``;
  decoding and NMS stay outside (``SSDDetector.decode``). Inputs, outputs and post-processing are spelled
  out in ``gankd_ray.tune.onnx_graph``. Written when the ``export`` extra (onnx, onnxscript) is installed,
  and then an ONNX export that fails fails the export; without the extra the other three files are
  written and a warning says why ``student.onnx`` is not.
- ``card.json``: hyperparameters, val metrics, teacher, dataset, parameter count, date.

Files are staged locally and published through ``gankd_ray.storage.publish_dir`` (``card.json`` last), so an
export on any storage is whole or absent.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import torch

from gankd_ray import storage
from gankd_ray.train import checkpoint as ckpt
from gankd_ray.tune.onnx_graph import ONNX_FILE, OnnxDetector, OnnxUnavailable, export_onnx, onnx_export_available

# What every export has; student.onnx is added when the ``export`` extra is installed (see above).
EXPORT_FILES = ("student.pt", "student.ts", "card.json")
# Written last: a folder without it is an incomplete export (object stores have no atomic folder rename).
COMPLETE_MARKER = "card.json"


log = logging.getLogger(__name__)


class ExportError(ValueError):
    """An export directory is incomplete or unreadable."""


def export_model(model_file: str | Path, out_dir: str | Path, card: dict[str, Any]) -> str:
    """Write the export files for the model in ``model_file`` into ``out_dir`` (any storage location,
    replaced whole: readers see the old export, no export, or the new one, never a mix)."""
    detector, config = ckpt.load_detector(model_file)
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
    with storage.staging_dir("gankd-export-") as staging:
        folder = Path(staging)
        torch.save(ckpt.model_payload(detector, config), folder / "student.pt")
        torch.jit.save(torch.jit.script(detector.eval()), str(folder / "student.ts"))
        if onnx_export_available():
            export_onnx(detector, folder / ONNX_FILE)
        else:
            log.warning("onnx / onnxscript not installed: no %s in the export (pip install 'gankd-ray[export]')", ONNX_FILE)
        (folder / COMPLETE_MARKER).write_text(json.dumps(full_card, indent=2, default=str) + "\n")
        return storage.publish_dir(folder, str(out_dir), COMPLETE_MARKER)


def check_export(model_dir: str | Path, files: tuple[str, ...] = EXPORT_FILES) -> str:
    """Raise ``ExportError`` naming the first of ``files`` missing from an export directory (any storage
    location); returns the directory's normalised location."""
    location = storage.normalize_uri(str(model_dir))
    try:
        if not storage.is_dir(location):
            raise ExportError(f"{model_dir}: exported model directory not found")
        for name in files:
            if not storage.is_file(storage.join(location, name)):
                raise ExportError(f"{model_dir}: missing {name} (not a complete gankd-ray export)")
    except OSError as err:
        raise ExportError(str(err)) from None
    return location


def read_card(model_dir: str) -> dict[str, Any]:
    try:
        return storage.read_json(storage.join(model_dir, COMPLETE_MARKER))
    except OSError as err:
        raise ExportError(str(err)) from None


def load_torchscript(model_dir: str, device: str | torch.device = "cpu"):
    """``student.ts`` of an export. TorchScript is code: only for files from a trusted source."""
    import torchvision  # noqa: F401 - registers the torchvision ops (nms, box_iou) the script calls

    file = storage.join(model_dir, "student.ts")
    source = storage.open_for_torch(file)
    try:
        return torch.jit.load(source, map_location=device).eval()
    except RuntimeError as err:
        raise ExportError(f"{file}: unreadable TorchScript ({str(err).splitlines()[0]})") from None


def load_onnx(model_dir: str, detector) -> OnnxDetector:
    """``student.onnx`` of an export in onnxruntime (CPU), post-processed by ``detector`` (its ``student.pt``).

    ONNX is a graph, not code, but onnxruntime's parsers are native code: only for trusted files.
    """
    file = storage.join(model_dir, ONNX_FILE)
    data = storage.read_bytes(file)
    try:
        return OnnxDetector(data, detector)
    except OnnxUnavailable as err:
        raise ExportError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types for a bad file
        raise ExportError(f"{file}: unreadable ONNX model ({str(err).strip().splitlines()[0][:300]})") from None

