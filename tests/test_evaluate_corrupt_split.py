"""``gankd-evaluate`` on a split whose second row group is corrupt: the read fails mid-stream, after batches
have been evaluated, and must end as the one-line error of an unreadable split (naming the parquet file and
row group), exit 2, print no metrics; an image that does not decode names itself in the same line with or
without loader workers and with --torchscript (which decodes without the loader). Runs the real CLI in a
subprocess; no Ray (evaluate starts none)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import corrupt_image, corrupt_row_group, split_row_groups
from test_bad_input import EXIT_BAD_INPUT, assert_no_ray, run_cli, snapshot

ROWS_PER_GROUP = 8  # the 16 test rows: two row groups in one file


@pytest.fixture(scope="module")
def corrupt_test_split(synthetic_data: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset whose test split's row group 1 is corrupt, that parquet file)."""
    data = tmp_path_factory.mktemp("corrupt_split") / "data"
    shutil.copytree(synthetic_data, data)
    split_row_groups(data, "test", ROWS_PER_GROUP)
    shard = data / "parquet" / "test" / "part-00000.parquet"
    corrupt_row_group(shard, group=1)
    parquet = pq.ParquetFile(shard)
    assert parquet.metadata.num_row_groups == 2 and parquet.read_row_group(0).num_rows == ROWS_PER_GROUP
    with pytest.raises(OSError):
        parquet.read_row_group(1)
    return data, shard


@pytest.fixture(scope="module")
def export(synthetic_data: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export (student.pt, student.ts) of an untrained detector for the synthetic classes."""
    from gankd_ray.config import RunConfig
    from gankd_ray.export import export_model
    from gankd_ray.models import build_detector
    from gankd_ray.train.checkpoint import model_payload, save_torch

    root = tmp_path_factory.mktemp("corrupt_split_export")
    cfg = RunConfig().with_overrides(["detector.backbone=mobilenet_v2_0.35"])
    cfg.role, cfg.data.path, cfg.detector.num_classes = "teacher", synthetic_data, 5
    model = save_torch(model_payload(build_detector(cfg.detector), cfg), root / "model.pt")
    return Path(export_model(model, root / "export", {"trial_id": "t1"}))


@pytest.mark.parametrize("model_file", ["--torchscript", "student.pt"])
def test_a_corrupt_row_group_mid_stream_is_one_line_naming_the_file(
    model_file: str, corrupt_test_split: tuple[Path, Path], export: Path, tmp_path: Path
) -> None:
    data, shard = corrupt_test_split
    before = snapshot(tmp_path)
    # Batches of 4: two batches of row group 0 are evaluated before row group 1 fails.
    args = ["--model", str(export), "--data", str(data), "--batch-size", "4"]
    proc = run_cli("evaluate", [*args, *([model_file] if model_file.startswith("--") else [])], tmp_path).proc
    assert proc.returncode == EXIT_BAD_INPUT, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --data: {data}: cannot read split 'test' ("), last
    assert f"{shard}: row group 1: " in last, last
    assert proc.stdout == "", "metrics printed for a split that could not be read"
    assert snapshot(tmp_path) == before
    assert_no_ray(proc)


# student.pt through the loader with and without workers; student.ts decodes in the caller, without the loader.
@pytest.mark.parametrize(
    "model_args",
    [["--workers", "0"], ["--workers", "1"], ["--torchscript"]],
    ids=["student.pt-0-workers", "student.pt-1-worker", "torchscript"],
)
def test_an_undecodable_image_is_one_line_naming_it_whatever_the_model_file_or_loader_workers(
    model_args: list[str], synthetic_data: str, export: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    image_id, file_name = corrupt_image(data / "parquet" / "test" / "part-00000.parquet", row=5)
    args = ["--model", str(export), "--data", str(data), "--batch-size", "4", *model_args]
    proc = run_cli("evaluate", args, tmp_path).proc
    assert proc.returncode == EXIT_BAD_INPUT, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: --data: {data}: cannot read split 'test' ({data}/parquet/test: image {image_id} ({file_name!r}): "
        "corrupt or unsupported image file: not in an image format PIL recognises)"
    )
    assert proc.stdout == ""
    assert_no_ray(proc)
