"""COCO box mAP with pycocotools, from detections in original image coordinates.

Distributed evaluation: each rank runs the model on its disjoint share of the val split (see
``gankd_ray.data.read_split``), turns its detections into COCO result dicts with ``coco_results``,
``gather_results`` collects them on every rank, and ``evaluate_coco`` scores them against all images
of the split, so every image is counted exactly once (an image with no detection counts as missed).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

from gankd_ray.data.reader import read_dataset_json
from gankd_ray.records import QUALITY_KEYS

# COCOeval.stats order (bbox): AP@[.5:.95], AP50, AP75, AP small/medium/large, AR@1, AR@10, AR@100, AR s/m/l.
# Named once, in gankd_ray.records (an epoch record's quality), which imports neither torch nor pycocotools.
STAT_NAMES = QUALITY_KEYS


def load_coco(uri: str, split: str) -> COCO:
    """Ground truth ``annotations/<split>.json`` of the prepared dataset at ``uri`` (any pyarrow URI)."""
    return coco_from_dict(read_dataset_json(uri, "annotations", f"{split}.json"))


def coco_from_dict(dataset: dict[str, Any]) -> COCO:
    """A ``COCO`` index over an in-memory COCO dict, without pycocotools' prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_results(outputs: Sequence[dict[str, Any]], metas: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Detections as COCO result dicts.

    Args:
        outputs: per image ``{"boxes": FloatTensor[N, 4] xyxy in original pixels, "labels":
            Int64Tensor[N] category ids 1..K, "scores": FloatTensor[N]}`` (tensors or arrays).
        metas: per image, at least ``{"image_id": int}``, in the same order.

    Returns:
        ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` per detection.
    """
    if len(outputs) != len(metas):
        raise ValueError(f"{len(outputs)} outputs for {len(metas)} images")
    results = []
    for output, meta in zip(outputs, metas):
        # float64 before converting: the width is the difference of the float32 corners, unrounded.
        boxes = torch.from_numpy(_numpy(output["boxes"]).reshape(-1, 4).astype(np.float64))
        labels = _numpy(output["labels"]).reshape(-1)
        scores = _numpy(output["scores"]).reshape(-1)
        for bbox, label, score in zip(box_convert(boxes, "xyxy", "xywh").tolist(), labels.tolist(), scores.tolist()):
            results.append(
                {
                    "image_id": int(meta["image_id"]),
                    "category_id": int(label),
                    "bbox": bbox,
                    "score": float(score),
                }
            )
    return results


def gather_results(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ranks' results, concatenated in rank order, on every rank.

    Uses ``torch.distributed.all_gather_object`` when a process group is initialised (a collective:
    every rank must call it; with NCCL the current CUDA device must be set, as Ray Train does);
    otherwise returns ``results`` unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(results)
    parts: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, results)
    return [result for part in parts for result in (part or [])]


def evaluate_coco(
    coco_gt: COCO, results: list[dict[str, Any]], image_ids: Iterable[int] | None = None
) -> dict[str, float]:
    """COCO box metrics of ``results`` against ``coco_gt``.

    Args:
        coco_gt: ground truth (``load_coco``).
        results: COCO result dicts of all ranks (``gather_results``); may be empty.
        image_ids: images to score (default: every image of ``coco_gt``, so an image without
            detections counts as missed).

    Returns:
        ``STAT_NAMES`` -> float (``map`` is AP@[.5:.95]); a metric with no ground truth in its range
        (e.g. ``ap_large`` without large objects) is NaN. Also ``num_images`` and ``num_detections``.
        Zero detections give 0.0 for every defined metric.

    Raises:
        ValueError: a result names an image that is not in ``coco_gt``.
    """
    ids = sorted(coco_gt.getImgIds() if image_ids is None else set(image_ids))
    unknown = {r["image_id"] for r in results} - set(coco_gt.imgs)
    if unknown:
        raise ValueError(f"detections for image ids not in the ground truth, e.g. {min(unknown)}")
    detections = _results_coco(coco_gt, results)
    evaluator = COCOeval(coco_gt, detections, iouType="bbox")
    evaluator.params.imgIds = ids
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the table
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: _defined(value) for name, value in zip(STAT_NAMES, evaluator.stats)}
    metrics["num_images"] = float(len(ids))
    metrics["num_detections"] = float(len(results))
    return metrics


def _results_coco(coco_gt: COCO, results: list[dict[str, Any]]) -> COCO:
    """Results as a ``COCO`` index. Built directly: ``COCO.loadRes`` fails on an empty list and prints."""
    annotations = []
    for index, result in enumerate(results, start=1):
        x, y, w, h = result["bbox"]
        annotations.append({**result, "id": index, "area": w * h, "iscrowd": 0})
    return coco_from_dict(
        {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"], "annotations": annotations}
    )


def _defined(value: float) -> float:
    # COCOeval writes -1 where a metric has no ground truth (e.g. no large objects).
    return float("nan") if value < 0 else float(value)


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
