"""``gankd-train`` on a dataset whose train split holds an image that no longer decodes: the error is raised in
a Ray Train worker (inside a DataLoader worker process), and must still end the command as the one-line error
naming the split, the image id and its file, exit 2, no traceback. Real CLI, real local Ray (its own, in the
subprocess: no other Ray runs in this module)."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import corrupt_image
from test_bad_input import EXIT_BAD_INPUT, run_cli

TINY = ["detector.backbone=mobilenet_v2_0.35", "optim.batch_size=8"]


def test_an_undecodable_training_image_ends_the_run_as_one_line_naming_it(synthetic_data: str, tmp_path: Path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    image_id, file_name = corrupt_image(data / "parquet" / "train" / "part-00000.parquet", row=3)
    args = ["--role", "student", "--data", str(data), "--epochs", "1", "--workers", "1", "--max-failures", "0"]
    args += ["--storage", str(tmp_path / "runs"), "--name", "bad-image", *TINY, "data.loader_workers=1"]
    proc = run_cli("train", args, tmp_path, timeout=400).proc
    assert proc.returncode == EXIT_BAD_INPUT, (proc.returncode, proc.stderr[-3000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in last, last
    expected = f"{data}/parquet/train: image {image_id} ({file_name!r}): corrupt or unsupported image file: "
    assert expected in last, last
