"""Detections of an export on image files: ``detections.json`` (COCO results) and one PNG per image.

``student.pt`` (the default) and ``student.ts`` take the decoded picture at any size (torchvision's own
resize inside); ``student.onnx`` takes the picture resized to ``S x S`` as the eval loader resizes it.
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_convert

from gankd_ray import storage
from gankd_ray.data.validate import DEFAULT_MAX_PIXELS
from gankd_ray.export.card import class_names
from gankd_ray.export.model import InferenceError, load_export, read_input
from gankd_ray.export.onnx_graph import OnnxDetector
from gankd_ray.utils import first_line


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
    """:func:`predict_pictures` of the export at ``model_dir`` (``load_export``'s choice of model) on the image
    files ``image_paths`` (:func:`read_pictures`)."""
    export = load_export(model_dir, torchscript=torchscript, onnx=onnx)
    return predict_pictures(export, read_pictures(image_paths, max_pixels), out_dir, score_thresh)


def read_pictures(image_paths: Sequence[str | Path], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[tuple[str, Any]]:
    """``(location, RGB PIL image)`` of each file, every one read and checked (:func:`read_picture`) before
    any is run."""
    paths = [storage.normalize_uri(str(p)) for p in image_paths]
    return [(path, read_picture(path, max_pixels)) for path in paths]


def predict_pictures(
    export, pictures: Sequence[tuple[str, Any]], out_dir: str | Path, score_thresh: float = 0.3
) -> dict[str, Any]:
    """Detections of a ``LoadedExport`` on ``(location, picture)`` pairs: ``out_dir/detections.json`` and one
    annotated PNG per picture (``<file stem>.png``). Image ids are 1.. in the order given.

    Returns ``{"detections": path, "images": [png paths], "count": detections kept}``.
    """
    names = class_names(export.card, export.config)
    out_dir = storage.normalize_uri(str(out_dir))
    detections: list[dict[str, Any]] = []
    written: list[str] = []
    used: set[str] = set()
    for image_id, (path, picture) in enumerate(pictures, start=1):
        output = _detect_picture(export.model, picture)
        keep = output["scores"] >= score_thresh
        # float64 before converting: the width is the difference of the float32 corners, unrounded.
        boxes = output["boxes"][keep].double()
        categories = [int(label) for label in output["labels"][keep].tolist()]
        labels = [_name(names, category) for category in categories]
        scores = output["scores"][keep].tolist()
        xywh = box_convert(boxes, "xyxy", "xywh").tolist()
        for bbox, category, label, score in zip(xywh, categories, labels, scores):
            detections.append(
                {
                    "image_id": image_id,
                    "file_name": str(path),
                    "category_id": category,
                    "category_name": label,
                    "bbox": bbox,
                    "score": float(score),
                }
            )
        png = storage.join(out_dir, _unique_png(Path(path), used))
        buffer = io.BytesIO()
        draw_detections(picture, boxes, labels, scores).save(buffer, format="PNG")
        storage.write_bytes(png, buffer.getvalue())
        written.append(png)
    detections_file = storage.join(out_dir, "detections.json")
    storage.write_text(detections_file, json.dumps(detections, indent=1) + "\n")
    return {"detections": detections_file, "images": written, "count": len(detections)}


def read_picture(path: str, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The image file at ``path`` (any storage location) as an RGB PIL image; its header is checked (pixel
    limit, 8-bit pixels) before it is decoded, as ``prepare_data`` checks a dataset's images."""
    from gankd_ray.data.validate import image_header_problem, open_image

    data = read_input(path, "image not found")
    try:
        with open_image(data) as image:
            problem = image_header_problem(image, max_pixels)
            if not problem:
                return image.convert("RGB")
    except Exception as err:  # PIL raises many kinds for a bad file
        raise InferenceError(f"{path}: not a readable image ({first_line(err)})") from None
    raise InferenceError(f"{path}: {problem}")


def draw_detections(picture, boxes: torch.Tensor, labels: Sequence[str], scores: Sequence[float]):
    """A copy of the PIL image with each box (``Tensor[N, 4]`` xyxy in its pixels) outlined and ``label score``
    written in its corner (``torchvision.utils.draw_bounding_boxes``), one colour per label."""
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image
    from torchvision.utils import draw_bounding_boxes

    if len(boxes) == 0:
        return picture.copy()
    colours = [_PALETTE[zlib.crc32(label.encode()) % len(_PALETTE)] for label in labels]
    texts = [f"{label} {score:.2f}" for label, score in zip(labels, scores)]
    drawn = draw_bounding_boxes(pil_to_tensor(picture), boxes.reshape(-1, 4), texts, colours, width=2, fill_labels=True)
    return to_pil_image(drawn)


_PALETTE = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255), (0, 220, 220)]


def run_scripted(model, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """``student.ts`` (or the eager detector in eval mode) on images ``[3, H, W]`` in [0, 1], any size."""
    with torch.no_grad():
        out = model(images)
    if isinstance(out, tuple):  # scripted torchvision SSD returns (losses, detections)
        out = out[1]
    return out


def to_tensor(picture) -> torch.Tensor:
    """An RGB PIL image as ``FloatTensor[3, H, W]`` in [0, 1] (the loader's conversion)."""
    array = np.asarray(picture, dtype=np.float32) / np.float32(255.0)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _detect_picture(model, picture) -> dict[str, torch.Tensor]:
    """One picture's detections: the ONNX graph wants the resized ``S x S`` input, the others any size."""
    if isinstance(model, OnnxDetector):
        from gankd_ray.data.transforms import resize_square

        size = model.detector.image_size
        resized = to_tensor(resize_square(picture, size))[None]
        return model.predict_resized(resized, [(picture.height, picture.width)])[0]
    return run_scripted(model, [to_tensor(picture)])[0]


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
