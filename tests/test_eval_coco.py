"""COCO evaluation: perfect detections score 1, none score 0, ranks' detections count once."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gankd_ray.data import read_split
from gankd_ray.eval import coco_results, evaluate_coco, gather_results, load_coco


def ground_truth_outputs(rows: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """The rows' positive boxes as detections of score 1 (original coordinates)."""
    outputs = []
    for row in rows:
        keep = torch.as_tensor(~row["iscrowd"])
        outputs.append(
            {
                "boxes": torch.as_tensor(row["boxes"])[keep],
                "labels": torch.as_tensor(row["labels"])[keep],
                "scores": torch.ones(int(keep.sum())),
            }
        )
    return outputs


def test_ground_truth_fed_back_as_detections_scores_1(synthetic_data: str) -> None:
    rows = read_split(synthetic_data, "val")
    metrics = evaluate_coco(load_coco(synthetic_data, "val"), coco_results(ground_truth_outputs(rows), rows))
    assert (
        metrics["map"] == pytest.approx(1.0)
        and metrics["ap50"] == pytest.approx(1.0)
        and metrics["ap75"] == pytest.approx(1.0)
    )
    assert metrics["num_images"] == 16 and metrics["num_detections"] == sum(len(r["boxes"]) for r in rows)


def test_zero_detections_score_0_without_crashing(synthetic_data: str, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = evaluate_coco(load_coco(synthetic_data, "val"), [])
    assert metrics["map"] == 0.0 and metrics["ap50"] == 0.0 and metrics["num_detections"] == 0
    assert math.isnan(metrics["ap_large"])  # no object of the synthetic set is COCO-large
    assert capsys.readouterr().out == ""  # pycocotools' prints are swallowed


def test_worse_detections_score_lower(synthetic_data: str) -> None:
    rows = read_split(synthetic_data, "val")
    outputs = ground_truth_outputs(rows)
    for output in outputs:
        output["boxes"] = output["boxes"] + torch.tensor([4.0, 4.0, 4.0, 4.0])  # shifted: fails the strict IoUs
    metrics = evaluate_coco(load_coco(synthetic_data, "val"), coco_results(outputs, rows))
    assert 0.0 < metrics["map"] < 0.9 and metrics["map"] < metrics["ap50"]


def test_half_of_the_images_without_detections_count_as_missed(synthetic_data: str) -> None:
    rows = read_split(synthetic_data, "val")
    half = rows[: len(rows) // 2]
    metrics = evaluate_coco(load_coco(synthetic_data, "val"), coco_results(ground_truth_outputs(half), half))
    assert metrics["map"] < 0.75
    only_those = evaluate_coco(
        load_coco(synthetic_data, "val"),
        coco_results(ground_truth_outputs(half), half),
        image_ids=[r["image_id"] for r in half],
    )
    assert only_those["map"] == pytest.approx(1.0)


def test_coco_results_convert_xyxy_to_xywh_and_reject_unknown_images(synthetic_data: str) -> None:
    outputs = [
        {"boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0]]), "labels": torch.tensor([3]), "scores": torch.tensor([0.5])}
    ]
    results = coco_results(outputs, [{"image_id": 49}])
    assert results == [{"image_id": 49, "category_id": 3, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.5}]
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_coco(load_coco(synthetic_data, "val"), coco_results(outputs, [{"image_id": 123456}]))


def test_gather_without_a_process_group_is_the_identity() -> None:
    results = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}]
    assert gather_results(results) == results


def _evaluate_on_rank(rank: int, world_size: int, init_file: str, data: str, out_dir: str) -> None:
    """One rank: evaluate its own share, gather everyone's detections, score them; write what it saw."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        rows = read_split(data, "val", rank=rank, world_size=world_size)
        local = coco_results(ground_truth_outputs(rows), rows)
        gathered = gather_results(local)
        coco_gt = load_coco(data, "val")
        report = {
            "own_images": [r["image_id"] for r in rows],
            "gathered": [[r["image_id"], r["category_id"], r["bbox"]] for r in gathered],
            "map": evaluate_coco(coco_gt, gathered)["map"],
            "map_without_gather": evaluate_coco(coco_gt, local)["map"],
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def test_gather_over_two_gloo_ranks_counts_each_image_once(synthetic_data: str, tmp_path: Path) -> None:
    # fork, where there is one, spares each rank a fresh torch import (seconds on a busy machine).
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    args = (2, str(tmp_path / "init"), synthetic_data, str(tmp_path))
    mp.start_processes(_evaluate_on_rank, args=args, nprocs=2, join=True, start_method=start_method)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    rows = read_split(synthetic_data, "val")
    all_boxes = sorted(
        [r["image_id"], int(label), box] for r in rows for label, box in zip(r["labels"], r["boxes"].tolist())
    )
    assert sorted(reports[0]["own_images"] + reports[1]["own_images"]) == sorted(r["image_id"] for r in rows)
    for report in reports:
        # Every ground-truth box exactly once (as xywh), from both ranks, on every rank.
        gathered = sorted([i, c, [x, y, x + w, y + h]] for i, c, (x, y, w, h) in report["gathered"])
        assert [g[:2] for g in gathered] == [b[:2] for b in all_boxes]
        assert all(g[2] == pytest.approx(b[2], abs=1e-4) for g, b in zip(gathered, all_boxes))
        assert report["map"] == pytest.approx(1.0)
        assert report["map_without_gather"] < 0.75  # one rank alone misses the other half
