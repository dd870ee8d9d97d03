"""Use an exported student: export any trial of a search, evaluate an export, predict on image files.

The library side of ``launch/export.py``, ``launch/evaluate.py`` and ``launch/predict.py`` (the CLIs only
parse arguments and turn ``InferenceError`` into a one-line message and exit code 2).

- :func:`export_trial`: a row of ``<experiment>/trials.parquet`` (the best healthy one by default) ->
  ``export_model`` with the same card the search writes for its best trial.
- :func:`evaluate_export`: COCO mAP / AP50 of an export on a prepared split. ``student.pt`` goes through
  exactly the path of the training loop's validation (``TrainStep.predict``): images resized to ``S x S`` by
  the eval ``DetectionBatchLoader``, then ``detect(extract(normalize(x)), S, orig_sizes)`` in float32, so
  the val figure equals the search's ``best_map``. ``student.ts`` (only on request: TorchScript is code, so
  a crafted file can touch the disk; trusted files only) is evaluated as a user would run it: the
  decoded original images in, TorchScript's own resize inside (tensor bilinear instead of PIL's), so
  its numbers are close to, not identical with, the ``student.pt`` ones. ``student.onnx`` (on request:
  onnxruntime parses it with native code; trusted files only) runs on the ``student.pt`` path's resized
  batches, its network in onnxruntime and the post-processing the detector's own (``SSDDetector.decode``,
  settings from ``student.pt``), so its figure matches ``student.pt``'s to float rounding.
- :func:`predict_images`: detections on image files, ``detections.json`` (COCO results) and one PNG per
  image with the boxes drawn.
"""

from __future__ import annotations

from gankd_ray.utils import first_line, plain_value

import io
import json
import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gankd_ray import storage
from gankd_ray.data.validate import DEFAULT_MAX_PIXELS
from gankd_ray.tune import results as res
from gankd_ray.tune.export import (
    COMPLETE_MARKER,
    ExportError,
    check_export,
    export_model,
    load_onnx,
    load_torchscript,
    read_card,
)
from gankd_ray.tune.onnx_graph import ONNX_FILE, OnnxDetector

# trials.parquet columns that are results, not hyperparameters.
RESULT_COLUMNS = frozenset(res.TRIAL_COLUMNS) | {"best_epoch", "best_checkpoint"}


class InferenceError(ValueError):
    """Bad input for export / evaluate / predict: the message is one line, meant for the user."""


# --------------------------------------------------------------------------------------------
# export a trial


def read_trials(experiment_dir: str) -> Any:
    """``<experiment_dir>/trials.parquet`` as a DataFrame."""
    import pandas as pd

    path = storage.join(storage.normalize_uri(experiment_dir), "trials.parquet")
    data = _read_input(path, "not found (not a finished search experiment directory)")
    try:
        return pd.read_parquet(io.BytesIO(data))
    except Exception as err:  # noqa: BLE001 - any unreadable table is a user error here
        raise InferenceError(f"{path}: unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def select_trial(trials: Any, trial_id: str | None = None) -> Any:
    """The row of ``trial_id``, or the best healthy trial (``results.best_trial``) when it is ``None``."""
    if "trial_id" not in trials or "best_checkpoint" not in trials:
        raise InferenceError("trials.parquet lacks the trial_id / best_checkpoint columns")
    if trial_id is None:
        for column in ("status", "best_map"):
            if column not in trials:
                raise InferenceError(f"trials.parquet lacks the {column} column")
        row = res.best_trial(trials)
        if row is None:
            raise InferenceError("no healthy trial with a val mAP in trials.parquet (all diverged or failed)")
    else:
        matches = trials[trials["trial_id"].astype(str) == str(trial_id)]
        if matches.empty:
            known = ", ".join(map(str, trials["trial_id"].tolist()[:10]))
            raise InferenceError(f"unknown trial id {trial_id!r} (trials: {known})")
        row = matches.iloc[0]
    if not plain_value(row.get("best_checkpoint")):
        raise InferenceError(f"trial {row['trial_id']} has no checkpoint (it never finished an epoch)")
    return row


def trial_card(row: Any, trials_columns: Sequence[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card ``pipeline.finish`` writes: trial id, hyperparameter columns, val metrics (+ ``extra``)."""
    keys = [c for c in trials_columns if c not in RESULT_COLUMNS]
    card = {
        "trial_id": str(row["trial_id"]),
        "hyperparameters": {k: plain_value(row.get(k)) for k in keys},
        "val_map": plain_value(row.get("best_map")),
        "val_ap50": plain_value(row.get("best_ap50")),
        "best_epoch": plain_value(row.get("best_epoch")),
        "status": plain_value(row.get("status")),
    }
    card.update(extra or {})
    return card


def model_file_of(checkpoint: str, experiment_dir: str) -> str:
    """``<checkpoint>/model.pt``; a relative checkpoint path is tried against the experiment dir too."""
    file = storage.join(checkpoint, "model.pt")
    if storage.exists(file) or storage.has_scheme(checkpoint) or Path(checkpoint).is_absolute():
        return file
    other = storage.join(experiment_dir, checkpoint, "model.pt")
    return other if storage.exists(other) else file


def export_trial(experiment_dir: str, out_dir: str, trial_id: str | None = None) -> tuple[str, dict[str, Any]]:
    """Export a trial of a search exactly as the search exports its best; returns (out dir, card)."""
    from gankd_ray.train.checkpoint import CheckpointError, read_model_file

    experiment_dir, out_dir = storage.normalize_uri(experiment_dir), storage.normalize_uri(out_dir)
    trials = read_trials(experiment_dir)
    row = select_trial(trials, trial_id)
    model_file = model_file_of(str(row["best_checkpoint"]), experiment_dir)
    extra: dict[str, Any] = {}
    # Teacher / baseline figures of the search, when its own export recorded them.
    best_card = storage.join(experiment_dir, "best", "card.json")
    if storage.exists(best_card):
        try:
            previous = json.loads(storage.read_text(best_card))
            extra.update({k: previous[k] for k in ("teacher", "baseline_val_map", "teacher_val_map") if k in previous})
        except (ValueError, OSError):
            pass
    try:
        config, _ = read_model_file(model_file)
        classes = dataset_classes(config.data.path)
        if classes:
            extra["classes"] = classes
        out = export_model(model_file, out_dir, trial_card(row, list(trials.columns), extra))
        return out, read_card(out)
    except (CheckpointError, ExportError, OSError) as err:
        raise InferenceError(str(err)) from None


# --------------------------------------------------------------------------------------------
# load an export


def load_export(model_dir: str | Path, torchscript: bool = False, device: str | torch.device = "cpu", *, onnx: bool = False):
    """``(model, config or None, card)`` of an export; ``model`` is the eager detector (``student.pt``,
    weights-only: the default, safe with a folder from anyone), or when ``torchscript`` the TorchScript
    module (``student.ts``: code that runs with the user's rights, so trusted files only), or when ``onnx``
    an ``OnnxDetector`` (``student.onnx`` in onnxruntime on the CPU, post-processed by the ``student.pt``
    detector; trusted files only). Only the files the chosen model needs must be present."""
    from gankd_ray.train.checkpoint import CheckpointError, load_detector

    if torchscript and onnx:
        raise InferenceError("choose one of --torchscript and --onnx")
    model_files = ("student.ts",) if torchscript else (ONNX_FILE, "student.pt") if onnx else ("student.pt",)
    try:
        model_dir = check_export(model_dir, (*model_files, COMPLETE_MARKER))
        card = read_card(model_dir)
        if torchscript:
            return load_torchscript(model_dir, device), None, card
        # The ONNX graph runs on onnxruntime's CPU provider, so its post-processing does too.
        detector, config = load_detector(storage.join(model_dir, "student.pt"), device="cpu" if onnx else device)
        if onnx:
            return load_onnx(model_dir, detector), config, card
    except (ExportError, CheckpointError, OSError) as err:
        raise InferenceError(str(err)) from None
    return detector, config, card


def run_scripted(model, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """``student.ts`` (or the eager detector in eval mode) on images ``[3, H, W]`` in [0, 1], any size."""
    with torch.no_grad():
        out = model(images)
    if isinstance(out, tuple):  # scripted torchvision SSD returns (losses, detections)
        out = out[1]
    return out


def predict_resized(detector, images: torch.Tensor, orig_sizes: Sequence[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    """``TrainStep.predict`` for a loaded detector (float32, no autocast): images ``[B, 3, S, S]`` in [0, 1].

    ``detector`` may be an ``OnnxDetector``: the network then runs in onnxruntime, the post-processing is
    the same ``SSDDetector.decode``."""
    if isinstance(detector, OnnxDetector):
        return detector.detect(images, orig_sizes)
    with torch.no_grad():
        features = detector.extract(detector.normalize(images))
        features = {level: feature.float() for level, feature in features.items()}
        return detector.detect(features, images.shape[-2:], orig_sizes)


# --------------------------------------------------------------------------------------------
# evaluate


def evaluate_export(
    model_dir: str | Path,
    data: str,
    split: str = "test",
    *,
    torchscript: bool = False,
    onnx: bool = False,
    batch_size: int = 16,
    num_workers: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """COCO metrics (``STAT_NAMES``, ``num_images``, ``num_detections``) of an export on ``split`` of ``data``."""
    from gankd_ray.data import DatasetError, read_split
    from gankd_ray.data.loader import DetectionBatchLoader
    from gankd_ray.data.transforms import decode_rgb
    from gankd_ray.eval import coco_results, evaluate_coco, load_coco

    model, config, card = load_export(model_dir, torchscript=torchscript, device=device, onnx=onnx)
    image_size = int(config.detector.image_size if config is not None else card["image_size"])
    try:
        coco_gt = load_coco(data, split)
        if torchscript:
            rows = read_split(data, split)
        else:
            loader = DetectionBatchLoader.from_dataset(
                data, split, image_size, batch_size, train=False, hflip=False, jitter=0.0, num_workers=num_workers
            )
    except (DatasetError, OSError, ValueError, KeyError) as err:
        raise InferenceError(f"{data}: cannot read split {split!r} ({first_line(err)})") from None
    results: list[dict[str, Any]] = []
    if torchscript:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            images = [_to_tensor(decode_rgb(r["image"])).to(device) for r in chunk]
            outputs = run_scripted(model, images)
            results.extend(coco_results(outputs, [{"image_id": int(r["image_id"])} for r in chunk]))
    else:
        for images, _, metas in loader:
            outputs = predict_resized(model, images.to("cpu" if onnx else device), [m["orig_size"] for m in metas])
            results.extend(coco_results(outputs, metas))
    metrics: dict[str, Any] = evaluate_coco(coco_gt, results)
    file = "student.ts" if torchscript else ONNX_FILE if onnx else "student.pt"
    metrics.update({"split": split, "model": str(model_dir), "file": file})
    return metrics


# --------------------------------------------------------------------------------------------
# predict


def predict_images(
    model_dir: str | Path,
    image_paths: Sequence[str | Path],
    out_dir: str | Path,
    score_thresh: float = 0.3,
    *,
    torchscript: bool = False,
    onnx: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Detections on image files: ``out_dir/detections.json`` and one annotated PNG per image.

    The weights-only ``student.pt`` by default; ``torchscript=True`` runs ``student.ts`` instead (trusted
    files only: TorchScript is code), ``onnx=True`` runs ``student.onnx`` in onnxruntime on the picture resized
    to ``S x S`` as the eval loader resizes it (trusted files only). Image ids are 1.. in the order given. Images of more than
    ``max_pixels`` pixels or of more than 8 bits per channel are refused before decoding.

    Returns ``{"detections": path, "images": [png paths], "count": detections kept}``.
    """
    model, config, card = load_export(model_dir, torchscript=torchscript, onnx=onnx)
    names = class_names(card, config)
    paths = [storage.normalize_uri(str(p)) for p in image_paths]
    pictures = [read_picture(path, max_pixels) for path in paths]
    out_dir = storage.normalize_uri(str(out_dir))
    detections: list[dict[str, Any]] = []
    written: list[str] = []
    used: set[str] = set()
    for image_id, (path, picture) in enumerate(zip(paths, pictures), start=1):
        output = _detect_picture(model, picture)
        keep = output["scores"] >= score_thresh
        boxes = output["boxes"][keep].tolist()
        labels = output["labels"][keep].tolist()
        scores = output["scores"][keep].tolist()
        for (x1, y1, x2, y2), label, score in zip(boxes, labels, scores):
            detections.append(
                {
                    "image_id": image_id,
                    "file_name": str(path),
                    "category_id": int(label),
                    "category_name": _name(names, int(label)),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
        png = storage.join(out_dir, _unique_png(Path(path), used))
        buffer = io.BytesIO()
        draw_detections(picture, boxes, [_name(names, int(l)) for l in labels], scores).save(buffer, format="PNG")
        storage.write_bytes(png, buffer.getvalue())
        written.append(png)
    detections_file = storage.join(out_dir, "detections.json")
    storage.write_text(detections_file, json.dumps(detections, indent=1) + "\n")
    return {"detections": detections_file, "images": written, "count": len(detections)}


def read_picture(path: str, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The image file at ``path`` (any storage location) as an RGB PIL image; its header is checked (pixel
    limit, 8-bit pixels) before it is decoded, as ``prepare_data`` checks a dataset's images."""
    from gankd_ray.data.validate import image_header_problem, open_image

    data = _read_input(path, "image not found")
    try:
        with open_image(data) as image:
            problem = image_header_problem(image, max_pixels)
            if not problem:
                return image.convert("RGB")
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds for a bad file
        raise InferenceError(f"{path}: not a readable image ({first_line(err)})") from None
    raise InferenceError(f"{path}: {problem}")


def draw_detections(picture, boxes: Sequence[Sequence[float]], labels: Sequence[str], scores: Sequence[float]):
    """A copy of the PIL image with each box outlined and ``label score`` written above it."""
    from PIL import ImageDraw

    canvas = picture.copy()
    draw = ImageDraw.Draw(canvas)
    for (x1, y1, x2, y2), label, score in zip(boxes, labels, scores):
        colour = _PALETTE[zlib.crc32(label.encode()) % len(_PALETTE)]
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        text = f"{label} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text)
        ty = max(0.0, y1 - (bottom - top) - 2)
        draw.rectangle([x1, ty, x1 + (right - left) + 2, ty + (bottom - top) + 2], fill=colour)
        draw.text((x1 + 1, ty), text, fill=(0, 0, 0))
    return canvas


_PALETTE = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255), (0, 220, 220)]


def class_names(card: dict[str, Any], config=None) -> list[str] | None:
    """Class names (category id k -> names[k-1]): the card's ``classes``, else the training dataset's."""
    if isinstance(card.get("classes"), list):
        return [str(c) for c in card["classes"]]
    path = card.get("dataset") or (config.data.path if config is not None else None)
    return dataset_classes(path) if path else None


def dataset_classes(path: str | None) -> list[str] | None:
    """``classes`` of the prepared dataset at ``path``, or ``None`` when it is not reachable."""
    if not path:
        return None
    from gankd_ray.data import read_dataset_info

    try:
        classes = read_dataset_info(path).get("classes")
    except Exception:  # noqa: BLE001 - the names are a nicety; the dataset may live elsewhere
        return None
    return [str(c) for c in classes] if isinstance(classes, list) else None


# --------------------------------------------------------------------------------------------
# helpers


def json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN -> None so the line is valid JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def _read_input(path: str, missing: str) -> bytes:
    """The file at ``path`` (any storage location); ``InferenceError`` saying ``missing`` when it is absent."""
    try:
        return storage.read_bytes(path)
    except FileNotFoundError:
        raise InferenceError(f"{path}: {missing}") from None
    except OSError as err:
        raise InferenceError(str(err)) from None


def _detect_picture(model, picture) -> dict[str, torch.Tensor]:
    """One picture's detections: the ONNX graph wants the resized ``S x S`` input, the others any size."""
    if isinstance(model, OnnxDetector):
        from gankd_ray.data.transforms import resize_square

        size = model.detector.image_size
        return model.detect(_to_tensor(resize_square(picture, size))[None], [(picture.height, picture.width)])[0]
    return run_scripted(model, [_to_tensor(picture)])[0]


def _to_tensor(picture) -> torch.Tensor:
    array = np.asarray(picture, dtype=np.float32) / np.float32(255.0)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _name(names: list[str] | None, label: int) -> str:
    if names and 1 <= label <= len(names):
        return names[label - 1]
    return f"class {label}"


def _unique_png(path: Path, used: set[str]) -> str:
    name = f"{path.stem}.png"
    index = 1
    while name in used:
        name = f"{path.stem}_{index}.png"
        index += 1
    used.add(name)
    return name



__all__ = [
    "InferenceError",
    "class_names",
    "draw_detections",
    "evaluate_export",
    "export_trial",
    "json_safe",
    "load_export",
    "predict_images",
    "predict_resized",
    "read_picture",
    "read_trials",
    "run_scripted",
    "select_trial",
    "trial_card",
]
