"""An export folder: ``student.pt``, ``student.ts``, ``student.onnx`` and ``card.json``; writing and loading it.

- ``student.pt``: the model file format of ``gankd_ray.train.checkpoint`` (weights-only state dict plus
  the resolved config), loadable with ``torch.load(..., weights_only=True)``.
- ``student.ts``: TorchScript; a list of image tensors ([3,H,W] in [0,1], any size) in, torchvision-style
  detections (boxes xyxy in original coordinates, labels, scores) out. TorchScript is code (it can read and
  write files), so our own tools load it only on request (``--torchscript``), for trusted files.
- ``student.onnx``: the network (normalisation, backbone, head) as an ONNX graph with a dynamic batch axis,
  ``images [B,3,S,S]`` in [0,1] -> per-anchor ``cls_logits``, ``bbox_regression`` and the ``anchors``;
  decoding and NMS stay outside (``SSDDetector.decode``). Inputs, outputs and post-processing are spelled
  out in ``gankd_ray.export.onnx_graph``. Written when the ``export`` extra (onnx, onnxscript) is installed,
  and then an ONNX export that fails fails the export; without the extra the other three files are
  written and a warning says why ``student.onnx`` is not.
- ``card.json``: ``gankd_ray.export.card``.

Files are staged locally and published through ``gankd_ray.storage.publish_dir`` (``card.json`` last), so an
export on any storage is whole or absent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gankd_ray import storage
from gankd_ray.config import SSD_ARCH
from gankd_ray.errors import InputError, UserError
from gankd_ray.export.card import model_card
from gankd_ray.export.onnx_graph import ONNX_FILE, OnnxDetector, export_onnx, onnx_export_available
from gankd_ray.train import checkpoint as ckpt
from gankd_ray.utils import first_line

# What every export has; student.onnx is added when the ``export`` extra is installed (see above).
EXPORT_FILES = ("student.pt", "student.ts", "card.json")
# Written last: a folder without it is an incomplete export (object stores have no atomic folder rename).
COMPLETE_MARKER = "card.json"

log = logging.getLogger(__name__)


class ExportError(InputError):
    """An export folder (or the model file to export) is missing, incomplete or unreadable."""


class InferenceError(InputError):
    """Bad input for export / evaluate / predict besides the export itself: a search table, a trial id, a
    dataset split, an image."""


@contextlib.contextmanager
def export_errors() -> Iterator[None]:
    """``CheckpointError`` and plain ``OSError`` (a storage read) as ``ExportError``; user errors pass as they are.

    The one place that translates: ``CheckpointError`` is not a ``UserError`` yet.
    """
    try:
        yield
    except UserError:
        raise
    except (ckpt.CheckpointError, OSError) as err:
        raise ExportError(first_line(err)) from None


def _save_torchscript(detector: torch.nn.Module, path: Path) -> None:
    """``student.ts``: TorchScript stays in the export for LibTorch (C++) users and ``evaluate --torchscript``,
    although torch 2.14 deprecates it (ONNX is the export's forward path). Its two FutureWarnings would print at
    every export, so they are silenced here, and only here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.\w+` is deprecated")
        torch.jit.save(torch.jit.script(detector.eval()), str(path))


def export_model(model_file: str | Path, out_dir: str | Path, fields: dict[str, Any]) -> str:
    """Write the export files for the model in ``model_file`` into ``out_dir`` (any storage location,
    replaced whole: readers see the old export, no export, or the new one, never a mix); its card is
    ``model_card(detector, config, fields)``. Returns the normalised ``out_dir``."""
    with export_errors():
        detector, config = ckpt.load_detector(model_file)
    card = model_card(detector, config, fields)
    with storage.staging_dir("gankd-export-") as staging:
        folder = Path(staging)
        torch.save(ckpt.model_payload(detector, config), folder / "student.pt")
        _save_torchscript(detector, folder / "student.ts")
        if config.detector.arch != SSD_ARCH:
            # The ONNX graph's outputs and decoding are the SSD family's (cls_logits, bbox_regression, anchors).
            log.warning("no %s for arch %s: ONNX export covers the ssd family only", ONNX_FILE, config.detector.arch)
        elif onnx_export_available():
            export_onnx(detector, folder / ONNX_FILE)
        else:
            log.warning(
                "onnx / onnxscript not installed: no %s in the export (pip install 'gankd-ray[export]')", ONNX_FILE
            )
        (folder / COMPLETE_MARKER).write_text(json.dumps(card, indent=2, default=str) + "\n")
        return storage.publish_dir(folder, str(out_dir), COMPLETE_MARKER)


def check_export(model_dir: str | Path, files: tuple[str, ...] = EXPORT_FILES) -> str:
    """Raise ``ExportError`` naming the first of ``files`` missing from an export directory (any storage
    location); returns the directory's normalised location."""
    location = storage.normalize_uri(str(model_dir))
    with export_errors():
        if not storage.is_dir(location):
            raise ExportError(f"{model_dir}: exported model directory not found")
        for name in files:
            if not storage.is_file(storage.join(location, name)):
                raise ExportError(f"{model_dir}: missing {name} (not a complete gankd-ray export)")
    return location


def read_card(model_dir: str) -> dict[str, Any]:
    with export_errors():
        return storage.read_json(storage.join(model_dir, COMPLETE_MARKER))


@dataclass
class LoadedExport:
    """One model of an export, ready to run.

    ``model`` is the eager ``SSDDetector`` (``student.pt``), the TorchScript module (``student.ts``) or an
    ``OnnxDetector`` (``student.onnx``); ``config`` is ``student.pt``'s (``None`` for TorchScript)."""

    model: Any
    config: Any
    card: dict[str, Any]
    file: str  # which of the export's files ``model`` is
    location: str

    @property
    def image_size(self) -> int:
        return int(self.config.detector.image_size if self.config is not None else self.card["image_size"])


def load_export(
    model_dir: str | Path, torchscript: bool = False, device: str | torch.device = "cpu", *, onnx: bool = False
) -> LoadedExport:
    """The eager detector (``student.pt``, weights-only: the default, safe with a folder from anyone), or when
    ``torchscript`` the TorchScript module (``student.ts``: code that runs with the user's rights, so trusted
    files only), or when ``onnx`` an ``OnnxDetector`` (``student.onnx`` in onnxruntime on the CPU,
    post-processed by the ``student.pt`` detector; trusted files only). Only the files the chosen model
    needs must be present."""
    if torchscript and onnx:
        raise InputError("choose one of --torchscript and --onnx")
    model_files = ("student.ts",) if torchscript else (ONNX_FILE, "student.pt") if onnx else ("student.pt",)
    location = check_export(model_dir, (*model_files, COMPLETE_MARKER))
    card = read_card(location)
    if torchscript:
        return LoadedExport(load_torchscript(location, device), None, card, "student.ts", location)
    with export_errors():  # the ONNX graph runs on onnxruntime's CPU provider, so its post-processing does too
        detector, config = ckpt.load_detector(storage.join(location, "student.pt"), device="cpu" if onnx else device)
    if onnx:
        return LoadedExport(load_onnx(location, detector), config, card, ONNX_FILE, location)
    return LoadedExport(detector, config, card, "student.pt", location)


def load_torchscript(model_dir: str, device: str | torch.device = "cpu"):
    """``student.ts`` of an export. TorchScript is code: only for files from a trusted source."""
    import torchvision  # noqa: F401 - registers the torchvision ops (nms, box_iou) the script calls

    file = storage.join(model_dir, "student.ts")
    with export_errors():
        source = storage.open_for_torch(file)
    try:
        return torch.jit.load(source, map_location=device).eval()
    except RuntimeError as err:
        raise ExportError(f"{file}: unreadable TorchScript ({first_line(err)})") from None


def load_onnx(model_dir: str, detector) -> OnnxDetector:
    """``student.onnx`` of an export in onnxruntime (CPU), post-processed by ``detector`` (its ``student.pt``).

    ONNX is a graph, not code, but onnxruntime's parsers are native code: only for trusted files.
    """
    file = storage.join(model_dir, ONNX_FILE)
    with export_errors():
        data = storage.read_bytes(file)
    try:
        return OnnxDetector(data, detector)
    except UserError:  # OnnxUnavailable: the extra is not installed
        raise
    except Exception as err:  # onnxruntime raises its own exception types for a bad file
        raise ExportError(f"{file}: unreadable ONNX model ({first_line(err)[:300]})") from None


def read_input(path: str, missing: str) -> bytes:
    """The file at ``path`` (any storage location); ``InferenceError`` saying ``missing`` when it is absent."""
    try:
        return storage.read_bytes(path)
    except FileNotFoundError:
        raise InferenceError(f"{path}: {missing}") from None
    except UserError:
        raise
    except OSError as err:
        raise InferenceError(first_line(err)) from None
