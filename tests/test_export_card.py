"""card.json is built in one place: the search's best/ and gankd-export give the same card for a trial."""

from __future__ import annotations

import pandas as pd

from gankd_ray.export.card import REFERENCE_KEYS, model_card, trial_card
from gankd_ray.export.trial import hyperparameter_columns
from gankd_ray.records import EpochRecord
from gankd_ray.tune import results as res

SPACE_KEYS = ["adv_weight", "levels"]


def _trials() -> pd.DataFrame:
    """A trials.parquet table as the search writes it (``results.trial_row``), two trials."""
    records = [
        EpochRecord.from_dict(flat)
        for flat in (
            {"epoch": 1, "epochs": 2, "map": 0.2, "ap50": 0.4, "checkpoint": "/c/1", "status": "running"},
            {"epoch": 2, "epochs": 2, "map": 0.3, "ap50": 0.5, "checkpoint": "/c/2", "status": "completed"},
        )
    ]
    rows = [
        res.trial_row("t1", {"adv_weight": 0.1, "levels": "all"}, records, None, 2, SPACE_KEYS),
        res.trial_row("t2", {"adv_weight": 1.0, "levels": "level0"}, records[:1], None, 2, SPACE_KEYS),
    ]
    return pd.DataFrame(rows)


def test_the_search_and_gankd_export_build_the_same_card() -> None:
    trials = _trials()
    best = res.best_trial(trials)
    references = {"teacher": "/runs/teacher/best", "baseline_val_map": 0.25, "teacher_val_map": 0.5, "other": 1}
    # pipeline.finish passes the space's keys; gankd-export only has the table's columns.
    assert hyperparameter_columns(list(trials.columns)) == SPACE_KEYS
    from_search = trial_card(best, SPACE_KEYS, references)
    from_export = trial_card(best, hyperparameter_columns(list(trials.columns)), references)
    assert from_search == from_export
    assert from_search == {
        "trial_id": "t1",
        "hyperparameters": {"adv_weight": 0.1, "levels": "all"},
        "val_map": 0.3,
        "val_ap50": 0.5,
        "best_epoch": 2,
        "status": "completed",
        "teacher": "/runs/teacher/best",
        "baseline_val_map": 0.25,
        "teacher_val_map": 0.5,
    }
    without = trial_card(best, SPACE_KEYS)
    assert not set(REFERENCE_KEYS) & set(without), "unknown references are absent, not None"


def test_the_model_fields_come_from_the_model_file(synthetic_data: str) -> None:
    from gankd_ray.config import RunConfig
    from gankd_ray.data import read_dataset_info
    from gankd_ray.models import build_detector

    cfg = RunConfig().with_overrides(["detector.backbone=mobilenet_v2_0.35", "detector.num_classes=5"])
    cfg.data.path = synthetic_data
    detector = build_detector(cfg.detector)
    card = model_card(detector, cfg, {"trial_id": "t1"})
    assert card["trial_id"] == "t1" and card["backbone"] == "mobilenet_v2_0.35" and card["num_classes"] == 5
    assert card["head_mode"] == "own" and card["dataset"] == synthetic_data
    assert card["classes"] == read_dataset_info(synthetic_data)["classes"]
    assert card["parameters"] == sum(p.numel() for p in detector.parameters())
    cfg.data.path = "/nowhere"
    assert "classes" not in model_card(detector, cfg, {}), "an unreachable dataset leaves the names out"


def test_an_export_prints_no_torchscript_deprecation_warning(synthetic_data: str, tmp_path) -> None:
    """torch 2.14 deprecates TorchScript; the export keeps ``student.ts`` and must not print its two warnings."""
    import warnings

    from gankd_ray.config import RunConfig
    from gankd_ray.export import export_model
    from gankd_ray.models import build_detector
    from gankd_ray.train.checkpoint import model_payload, save_torch

    cfg = RunConfig().with_overrides(["detector.backbone=mobilenet_v2_0.35", "detector.num_classes=5"])
    cfg.role, cfg.data.path = "teacher", synthetic_data
    model = save_torch(model_payload(build_detector(cfg.detector), cfg), tmp_path / "model.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export = export_model(model, tmp_path / "export", {"trial_id": "t1"})
    assert (tmp_path / "export" / "student.ts").is_file(), export
    jit = [str(w.message) for w in caught if "torch.jit" in str(w.message)]
    assert not jit, jit
