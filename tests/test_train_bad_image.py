"""``gankd-train`` on a dataset whose train split was damaged after preparation: an image that no longer decodes
(raised in a Ray Train worker, inside a DataLoader worker process) or a row group that no longer reads (raised
by the batch sampler in the Ray Train worker). Either must end the command as one line naming the culprit,
exit 2, no traceback. Real CLI, real local Ray (its own, in the subprocess: no other Ray runs in this module)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import corrupt_image, corrupt_row_group, split_row_groups
from test_bad_input import EXIT_BAD_INPUT, run_cli

TINY = ["detector.backbone=mobilenet_v2_0.35", "optim.batch_size=8"]


def _damaged_image(data: Path) -> str:
    image_id, file_name = corrupt_image(data / "parquet" / "train" / "part-00000.parquet", row=3)
    return f"{data}/parquet/train: image {image_id} ({file_name!r}): corrupt or unsupported image file: "


def _damaged_row_group(data: Path) -> str:
    split_row_groups(data, "train", rows_per_group=8)
    shard = data / "parquet" / "train" / "part-00000.parquet"
    corrupt_row_group(shard, group=1)
    return f"{data}/parquet/train: cannot read ({shard}: row group 1: "


@pytest.mark.parametrize("damage", [_damaged_image, _damaged_row_group], ids=["image", "row-group"])
def test_a_damaged_training_split_ends_the_run_as_one_line_naming_the_culprit(
    damage: Callable[[Path], str], synthetic_data: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    expected = damage(data)
    args = ["--role", "student", "--data", str(data), "--epochs", "1", "--workers", "1", "--max-failures", "0"]
    args += ["--storage", str(tmp_path / "runs"), "--name", "bad-data", *TINY, "data.loader_workers=1"]
    proc = run_cli("train", args, tmp_path, timeout=400).proc
    assert proc.returncode == EXIT_BAD_INPUT, (proc.returncode, proc.stderr[-3000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in last, last
    assert expected in last, last
