"""Using a trained student outside training: export it, load an export, evaluate it, predict with it.

- :mod:`~gankd_ray.export.model`: the export folder (``student.pt``, ``student.ts``, ``student.onnx``,
  ``card.json``): ``export_model`` writes it, ``load_export`` loads one of its models.
- :mod:`~gankd_ray.export.card`: ``card.json``, built in one place (``trial_card`` + ``model_card``).
- :mod:`~gankd_ray.export.trial`: a trial of a finished search (``trials.parquet``) -> an export.
- :mod:`~gankd_ray.export.evaluate`: COCO mAP / AP50 of an export; ``student.pt`` through
  ``SSDDetector.predict_resized``, the prediction of training's validation.
- :mod:`~gankd_ray.export.predict`: detections on image files, ``detections.json`` and annotated PNGs.
- :mod:`~gankd_ray.export.onnx_graph`: the ``student.onnx`` contract and its onnxruntime runner.

The commands over them are ``gankd_ray.cli.export``, ``.evaluate`` and ``.predict``. Errors a user can fix are
``ExportError`` (the export folder) and ``InferenceError`` (the other inputs), both ``errors.InputError``,
and ``OnnxUnavailable`` (``--onnx`` without the ``export`` extra).
"""

from gankd_ray.export.card import model_card, trial_card
from gankd_ray.export.evaluate import evaluate_export, evaluate_loaded, json_safe
from gankd_ray.export.model import (
    COMPLETE_MARKER,
    EXPORT_FILES,
    ExportError,
    InferenceError,
    LoadedExport,
    check_export,
    export_model,
    load_export,
    read_card,
)
from gankd_ray.export.onnx_graph import ONNX_FILE, OnnxDetector, OnnxUnavailable
from gankd_ray.export.predict import draw_detections, predict_images, predict_pictures, read_picture, read_pictures
from gankd_ray.export.trial import export_search_trial, export_trial, read_trials, select_trial

__all__ = [
    "COMPLETE_MARKER",
    "EXPORT_FILES",
    "ONNX_FILE",
    "ExportError",
    "InferenceError",
    "LoadedExport",
    "OnnxDetector",
    "OnnxUnavailable",
    "check_export",
    "draw_detections",
    "evaluate_export",
    "evaluate_loaded",
    "export_model",
    "export_search_trial",
    "export_trial",
    "json_safe",
    "load_export",
    "model_card",
    "predict_images",
    "predict_pictures",
    "read_card",
    "read_picture",
    "read_pictures",
    "read_trials",
    "select_trial",
    "trial_card",
]
