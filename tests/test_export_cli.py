"""Export / evaluate / predict CLIs on a real tiny trained student (no Ray).

A MobileNetV2-0.35 student is trained a few steps on the synthetic data, saved as a model file the way
the trainer does, and exported; the exported files are then used in fresh processes. The ONNX tests need
the ``export`` extra (onnx, onnxscript, onnxruntime), which ``make test`` installs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from gankd_ray.cli import evaluate as evaluate_cli
from gankd_ray.cli import export as export_cli
from gankd_ray.cli import predict as predict_cli
from gankd_ray.cli import run
from gankd_ray.config import DataConfig, DetectorConfig, OptimConfig, RunConfig
from gankd_ray.data import read_dataset_info, read_split
from gankd_ray.data.loader import DetectionBatchLoader
from gankd_ray.distill import build_step
from gankd_ray.eval import coco_results, evaluate_coco, load_coco
from gankd_ray.export import ExportError, export_model
from gankd_ray.train.checkpoint import load_detector, load_torch, model_payload, save_torch

ROOT = Path(__file__).resolve().parents[1]
SIZE = 160
TRAIN_STEPS = 4
# One intra-op thread here and in the CLIs' processes: the same float reduction order on both sides, so the
# val figures agree although this barely trained model's scores are near-tied (2 threads vs 1 once moved AP50 4%).
THREADS = 1
# student.onnx vs the eager detector. onnxruntime's kernels sum in another order than torch's; measured on
# this fixture: head outputs (logits, box offsets) within 1e-6, detections within 2e-5 px and 1e-7 in score.
# The raw outputs are the sharp test: this barely trained model's detections are nearly its anchors and
# prior whatever the input (a graph without the normalisation still matched them within 1e-3 px).
HEAD_ATOL = 1e-4
BOX_ATOL_PX = 1e-3
SCORE_ATOL = 1e-4
ENV = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": str(ROOT)}


class _Command:
    """A command module's ``main`` as the console script runs it: ``UserError`` -> one line, exit status."""

    def __init__(self, module) -> None:
        self.module = module

    def main(self, argv: list[str]) -> int:
        return run(self.module.main, argv)


def _command(name: str) -> _Command:
    return _Command({"evaluate": evaluate_cli, "export": export_cli, "predict": predict_cli}[name])


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)


# A deployer's view of student.onnx: onnxruntime and numpy only, batches of 1 and 3 of the same images.
ONNX_RUNNER = """
import sys
import numpy as np
import onnxruntime as ort

options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
images = np.load(sys.argv[2])
names = [output.name for output in session.get_outputs()]
outputs = {}
for batch in (1, 3):
    values = session.run(names, {"images": images[:batch]})
    outputs.update({f"{name}_{batch}": value for name, value in zip(names, values)})
np.savez(sys.argv[3], **outputs)
"""


def _first_images(data: str, split: str, count: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The first ``count`` images of ``split`` as the eval loader gives them ([B, 3, S, S]) and their sizes."""
    loader = DetectionBatchLoader.from_dataset(data, split, SIZE, count, train=False, num_workers=0)
    images, _, metas = next(iter(loader))
    return images, [m["orig_size"] for m in metas]


def _assert_same_detections(expected: list[dict], got: list[dict]) -> None:
    """Per image the same number of detections, and each expected one has a detection of its label within
    ``BOX_ATOL_PX`` (every coordinate) and ``SCORE_ATOL``: matched by box, not by rank, since near-tied
    scores may swap places."""
    assert len(got) == len(expected)
    for want, have in zip(expected, got):
        assert len(have["scores"]) == len(want["scores"]) > 0
        for box, label, score in zip(want["boxes"], want["labels"], want["scores"]):
            same_label = have["labels"] == label
            distance = (have["boxes"][same_label] - box).abs().amax(dim=1)
            nearest = int(distance.argmin())
            assert float(distance[nearest]) <= BOX_ATOL_PX, (box, have["boxes"][same_label][nearest])
            assert abs(float(have["scores"][same_label][nearest] - score)) <= SCORE_ATOL


@pytest.fixture(scope="module")
def trained(synthetic_data: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    classes = read_dataset_info(synthetic_data)["classes"]
    cfg = RunConfig(
        role="student",
        detector=DetectorConfig(backbone="mobilenet_v2_0.35", num_classes=len(classes), image_size=SIZE),
        optim=OptimConfig(optimizer="adamw", lr=2e-3, warmup_epochs=0.0, epochs=1, batch_size=8),
        data=DataConfig(path=synthetic_data, loader_workers=0),
    )
    step = build_step(cfg, teacher=None, device="cpu")
    # The tolerances below were measured on this model: trained on the seeded permutation of the split (a
    # buffer of 1 keeps the rows in that order). A barely trained model's scores nearly tie, and another order
    # gave one whose ONNX mAP ranked ties differently by 22% (0.00073 against 0.00094).
    rows = read_split(synthetic_data, "train")
    train = DetectionBatchLoader(rows, SIZE, 8, train=True, num_workers=0, jitter=0.0, shuffle_buffer=1)
    for index, (images, targets, _) in enumerate(train):
        if index == TRAIN_STEPS:
            break
        step.train_step(images, targets, index / len(train))
    # The val figure of the training loop: step.predict over the eval loader.
    val = DetectionBatchLoader.from_dataset(synthetic_data, "val", SIZE, 8, train=False, num_workers=0)
    results = []
    for images, _, metas in val:
        results.extend(coco_results(step.predict(images, [m["orig_size"] for m in metas]), metas))
    val_metrics = evaluate_coco(load_coco(synthetic_data, "val"), results)

    root = tmp_path_factory.mktemp("export")
    checkpoint = root / "experiment" / "trials" / "t1" / "checkpoint_000001"
    save_torch(model_payload(step.export_detector(), cfg), checkpoint / "model.pt")
    export = Path(
        export_model(checkpoint / "model.pt", root / "best", {"trial_id": "t1", "val_map": val_metrics["map"]})
    )
    return {
        "root": root,
        "checkpoint": checkpoint,
        "export": export,
        "val": val_metrics,
        "data": synthetic_data,
        "classes": classes,
    }


def test_exported_files_load_in_a_fresh_process(trained):
    export = trained["export"]
    assert sorted(p.name for p in export.iterdir()) == ["card.json", "student.onnx", "student.pt", "student.ts"]
    payload = torch.load(export / "student.pt", map_location="cpu", weights_only=True)
    assert payload["format"] == "gankd-ray-model" and payload["config"]["detector"]["num_classes"] == len(
        trained["classes"]
    )
    script = (
        "import sys, torch\n"
        "import torchvision  # registers torchvision's ops (nms, box_iou) that the script calls\n"
        "m = torch.jit.load(sys.argv[1]).eval()\n"
        "out = m([torch.rand(3, 120, 200), torch.rand(3, 160, 160)])\n"
        "out = out[1] if isinstance(out, tuple) else out\n"
        "assert len(out) == 2 and set(out[0]) == {'boxes', 'labels', 'scores'}, out\n"
        "assert out[0]['boxes'].shape[-1] == 4 and out[0]['boxes'].shape[0] > 0\n"
        "print('ok', out[0]['boxes'].shape[0])\n"
    )
    proc = _run("-c", script, str(export / "student.ts"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")


def test_evaluate_matches_the_training_loops_val_figure(trained):
    assert trained["val"]["num_detections"] > 0
    proc = _run(
        "launch/evaluate.py",
        "--model",
        str(trained["export"]),
        "--data",
        trained["data"],
        "--split",
        "val",
        "--batch-size",
        "8",  # the fixture's batches: batch size changes conv kernels, hence float order
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("map: ") for line in lines) and any(line.startswith("ap50: ") for line in lines)
    metrics = json.loads(lines[-1])
    # Same path, same thread count, another process (weights through the exported file): the same figure.
    assert metrics["map"] == pytest.approx(trained["val"]["map"], rel=1e-3, abs=1e-6)
    assert metrics["ap50"] == pytest.approx(trained["val"]["ap50"], rel=1e-3, abs=1e-6)
    assert metrics["num_detections"] == trained["val"]["num_detections"]


def test_evaluate_torchscript_is_close(trained, capsys):
    evaluate = _command("evaluate")
    assert (
        evaluate.main(["--model", str(trained["export"]), "--data", trained["data"], "--split", "val", "--torchscript"])
        == 0
    )
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["file"] == "student.ts"
    assert metrics["num_detections"] > 0
    # Same network; only the resize differs (PIL bilinear in the loader, tensor bilinear in TorchScript).
    assert metrics["map"] == pytest.approx(trained["val"]["map"], abs=0.05)
    assert metrics["ap50"] == pytest.approx(trained["val"]["ap50"], abs=0.05)


def test_onnx_graph_runs_in_onnxruntime_with_a_dynamic_batch(trained, tmp_path):
    import numpy as np
    import onnx

    onnx_file = trained["export"] / "student.onnx"
    graph = onnx.load(str(onnx_file)).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [o.name for o in graph.output] == ["cls_logits", "bbox_regression", "anchors"]
    batch_axis = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param and not batch_axis.dim_value, "the batch axis is symbolic"
    images, sizes = _first_images(trained["data"], "test", 3)
    np.save(tmp_path / "images.npy", images.numpy())
    proc = _run("-c", ONNX_RUNNER, str(onnx_file), str(tmp_path / "images.npy"), str(tmp_path / "outputs.npz"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    outputs = np.load(tmp_path / "outputs.npz")
    detector, _ = load_detector(trained["export"] / "student.pt")
    with torch.no_grad():
        levels = list(detector.extract(detector.normalize(images)).values())
        eager_head = detector._run_head(levels, None)
    for batch in (1, 3):
        assert outputs[f"cls_logits_{batch}"].shape == (batch, 2420, len(trained["classes"]) + 1)
        assert outputs[f"bbox_regression_{batch}"].shape == (batch, 2420, 4)
        head = {name: torch.from_numpy(outputs[f"{name}_{batch}"]) for name in ("cls_logits", "bbox_regression")}
        for name, value in head.items():
            torch.testing.assert_close(value, eager_head[name][:batch], atol=HEAD_ATOL, rtol=0)
        anchors = torch.from_numpy(outputs[f"anchors_{batch}"])
        torch.testing.assert_close(anchors, detector.anchors(levels, SIZE), atol=0, rtol=0)
        got = detector.decode(head, anchors, SIZE, sizes[:batch])
        _assert_same_detections(detector.predict_resized(images[:batch], sizes[:batch]), got)


def test_evaluate_onnx_gives_the_student_pt_figure(trained):
    proc = _run(
        "launch/evaluate.py",
        "--model",
        str(trained["export"]),
        "--data",
        trained["data"],
        "--split",
        "val",
        "--batch-size",
        "8",
        "--onnx",
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["file"] == "student.onnx"
    # The same val mAP / AP50 to 3 decimals (what the issue asks): only float rounding differs. This barely
    # trained model's mAP is about 0.001, where 3 decimals say little, so within 5% as well (measured: 0.7%
    # mAP, 1% AP50, from near-tied scores that swap ranks; the detections themselves are compared above).
    for name in ("map", "ap50"):
        assert abs(metrics[name] - trained["val"][name]) < 5e-4
        assert metrics[name] == pytest.approx(trained["val"][name], rel=0.05)
    assert metrics["num_detections"] == pytest.approx(trained["val"]["num_detections"], rel=0.01)


def test_predict_onnx_writes_the_eager_detections(trained, tmp_path):
    files = sorted((Path(trained["data"]) / "images" / "test").iterdir())[:2]
    predict = _command("predict")
    per_model = {}
    for name, flags in (("eager", []), ("onnx", ["--onnx"])):
        out = tmp_path / name
        assert (
            predict.main(
                [
                    "--model",
                    str(trained["export"]),
                    "--images",
                    *map(str, files),
                    "--out",
                    str(out),
                    "--score-thresh",
                    "0.05",
                    *flags,
                ]
            )
            == 0
        )
        assert all((out / f"{file.stem}.png").is_file() for file in files)
        per_model[name] = _detections_by_image(json.loads((out / "detections.json").read_text()), len(files))
    # The synthetic pictures are S x S already, so both paths see the same pixels.
    _assert_same_detections(per_model["eager"], per_model["onnx"])


def _detections_by_image(detections: list[dict], count: int) -> list[dict]:
    """predict's detections.json as per-image tensors (boxes xywh, which the matcher compares as well)."""
    grouped = []
    for image_id in range(1, count + 1):
        rows = [d for d in detections if d["image_id"] == image_id]
        grouped.append(
            {
                "boxes": torch.tensor([d["bbox"] for d in rows], dtype=torch.float64).reshape(-1, 4),
                "labels": torch.tensor([d["category_id"] for d in rows], dtype=torch.int64),
                "scores": torch.tensor([d["score"] for d in rows], dtype=torch.float64),
            }
        )
    return grouped


def test_evaluate_bad_input_exits_2(trained, tmp_path, capsys):
    evaluate = _command("evaluate")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("student.ts", "card.json"):
        (broken / name).write_bytes((trained["export"] / name).read_bytes())
    assert evaluate.main(["--model", str(broken), "--data", trained["data"]]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing student.pt" in err and len(err.splitlines()) == 1
    with pytest.raises(ExportError) as raised:  # what the command raises, before the runner turns it into a line
        evaluate_cli.main(["--model", str(broken), "--data", trained["data"]])
    assert raised.value.flag == "--model" and raised.value.message.startswith(str(broken))
    assert err == f"error: {raised.value}"
    assert evaluate.main(["--model", str(broken), "--data", trained["data"], "--onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing student.onnx" in err and len(err.splitlines()) == 1
    assert evaluate.main(["--model", str(trained["export"]), "--data", trained["data"], "--onnx", "--torchscript"]) == 2
    assert "one of --torchscript and --onnx" in capsys.readouterr().err
    assert evaluate.main(["--model", str(trained["export"]), "--data", str(tmp_path / "nodata")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nodata" in err and len(err.splitlines()) == 1


def test_predict_writes_detections_and_pngs(trained, tmp_path, capsys):
    from PIL import Image

    images_dir = Path(trained["data"]) / "images"
    files = sorted(p for p in images_dir.rglob("*") if p.is_file())[:2]
    assert files
    predict = _command("predict")
    out = tmp_path / "pred"
    assert (
        predict.main(
            [
                "--model",
                str(trained["export"]),
                "--images",
                *map(str, files),
                "--out",
                str(out),
                "--score-thresh",
                "0.0",
            ]
        )
        == 0
    )
    detections = json.loads((out / "detections.json").read_text())
    assert detections, "score-thresh 0 keeps every detection"
    assert {d["image_id"] for d in detections} <= {1, 2}
    assert {d["file_name"] for d in detections} <= set(map(str, files))
    first = detections[0]
    assert set(first) >= {"image_id", "file_name", "category_id", "bbox", "score"} and len(first["bbox"]) == 4
    assert first["category_name"] in trained["classes"]
    for file in files:
        png = out / f"{file.stem}.png"
        with Image.open(png) as picture, Image.open(file) as original:
            assert picture.size == original.size
    assert (
        predict.main(["--model", str(trained["export"]), "--images", str(tmp_path / "nope.png"), "--out", str(out)])
        == 2
    )


def test_export_cli_from_experiment(trained, tmp_path, capsys):
    experiment = tmp_path / "experiment"
    experiment.mkdir()
    checkpoint = str(trained["checkpoint"])
    pd.DataFrame(
        [
            {
                "trial_id": "t1",
                "status": "completed",
                "best_map": 0.30,
                "best_ap50": 0.5,
                "best_checkpoint": checkpoint,
                "adv_weight": 0.1,
            },
            {
                "trial_id": "t2",
                "status": "diverged",
                "best_map": 0.90,
                "best_ap50": 0.9,
                "best_checkpoint": checkpoint,
                "adv_weight": 1.0,
            },
            {
                "trial_id": "t3",
                "status": "error",
                "best_map": 0.80,
                "best_ap50": 0.8,
                "best_checkpoint": checkpoint,
                "adv_weight": 0.5,
            },
            {
                "trial_id": "t4",
                "status": "stopped_early",
                "best_map": 0.10,
                "best_ap50": 0.2,
                "best_checkpoint": checkpoint,
                "adv_weight": 0.01,
            },
        ]
    ).to_parquet(experiment / "trials.parquet", index=False)
    export = _command("export")
    out = tmp_path / "out"
    assert export.main(["--experiment", str(experiment), "--out", str(out)]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["trial_id"] == "t1" and card["val_map"] == 0.30 and card["hyperparameters"] == {"adv_weight": 0.1}
    assert card["classes"] == trained["classes"]
    assert load_torch(out / "student.pt")["format"] == "gankd-ray-model"
    from gankd_ray.export import read_trials, select_trial

    assert select_trial(read_trials(str(experiment)), "t4")["best_map"] == 0.10  # --trial picks any row
    capsys.readouterr()
    assert export.main(["--experiment", str(experiment), "--out", str(tmp_path / "x"), "--trial", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown trial id 'nope'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    assert export.main(["--experiment", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2


def test_clis_take_paths_relative_to_where_they_run(trained, tmp_path):
    """export, evaluate and predict from a folder that is not the repository, every path relative to it."""
    workdir = tmp_path / "D"
    workdir.mkdir()
    experiment = workdir / "exp"
    experiment.mkdir()
    pd.DataFrame(
        [
            {
                "trial_id": "t1",
                "status": "completed",
                "best_map": 0.3,
                "best_ap50": 0.5,
                "best_checkpoint": str(trained["checkpoint"]),
            }
        ]
    ).to_parquet(experiment / "trials.parquet")
    data = os.path.relpath(trained["data"], workdir)
    image = os.path.relpath(next((Path(trained["data"]) / "images" / "val").iterdir()), workdir)

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "launch" / f"{script}.py"), *args],
            capture_output=True,
            text=True,
            env=ENV,
            cwd=workdir,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc

    run("export", "--experiment", "exp", "--out", "model")
    assert (workdir / "model" / "card.json").is_file() and (workdir / "model" / "student.pt").is_file()
    metrics = json.loads(run("evaluate", "--model", "model", "--data", data, "--split", "val").stdout.splitlines()[-1])
    assert metrics["num_images"] == 16
    run("predict", "--model", "model", "--images", image, "--out", "pred")
    assert (workdir / "pred" / "detections.json").is_file() and (workdir / "pred" / f"{Path(image).stem}.png").is_file()
