"""The storage seam (gankd_ray.storage) on local paths, file:// URIs and a real S3 API server: the same
calls, the same results; whole-or-absent folders; one-line errors naming the location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import S3_BUCKET

from gankd_ray import storage


@pytest.fixture(params=["relative", "file_uri", "s3"])
def location(request, tmp_path, monkeypatch) -> str:
    """A fresh folder location of each kind."""
    if request.param == "relative":
        monkeypatch.chdir(tmp_path)
        return "here/folder"
    if request.param == "file_uri":
        return f"file://{tmp_path}/folder"
    request.getfixturevalue("s3")
    return f"s3://{S3_BUCKET}/{request.node.originalname}/folder"


def test_files_round_trip_through_every_kind_of_location(location):
    file = storage.join(location, "sub", "a.json")
    assert not storage.exists(file)
    storage.write_json(file, {"x": 1})
    assert (
        storage.read_json(file) == {"x": 1} and storage.is_file(file) and storage.is_dir(storage.join(location, "sub"))
    )
    storage.save_torch({"w": torch.arange(3)}, storage.join(location, "m.pt"))
    loaded = torch.load(storage.open_for_torch(storage.join(location, "m.pt")), weights_only=True)
    assert torch.equal(loaded["w"], torch.arange(3))
    with pytest.raises(FileNotFoundError, match="file not found"):
        storage.read_bytes(storage.join(location, "missing"))
    storage.delete(location)
    assert not storage.exists(file)


def test_a_published_folder_replaces_the_old_one_whole(location, tmp_path):
    def stage(name: str, files: dict[str, str]) -> Path:
        folder = tmp_path / name
        for rel, text in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)
        return folder

    storage.publish_dir(stage("v1", {"card.json": "1", "a.txt": "old", "stale.txt": "x"}), location, "card.json")
    storage.publish_dir(stage("v2", {"card.json": "2", "a.txt": "new", "deep/b.txt": "b"}), location, "card.json")
    assert storage.read_text(storage.join(location, "card.json")) == "2"
    assert storage.read_text(storage.join(location, "a.txt")) == "new"
    assert storage.read_text(storage.join(location, "deep", "b.txt")) == "b"
    assert not storage.exists(storage.join(location, "stale.txt"))  # nothing of the old folder is mixed in
    with pytest.raises(ValueError, match="no card.json"):
        storage.publish_dir(stage("v3", {"a.txt": "no marker"}), location, "card.json")


def test_relative_locations_become_absolute_where_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize_uri("runs/x") == str(tmp_path / "runs" / "x")
    assert storage.normalize_uri("s3://b/k") == "s3://b/k" and storage.normalize_uri("file:///a/b") == "file:///a/b"
    assert storage.local_path("file:///a/b") == Path("/a/b")


def test_ray_checkpoint_locations_become_full_uris(s3):
    import pyarrow.fs as pafs

    filesystem, path = storage.resolve(f"s3://{S3_BUCKET}/runs/ckpt")
    assert storage.uri_of(filesystem, path) == f"s3://{S3_BUCKET}/runs/ckpt"
    assert storage.uri_of(pafs.LocalFileSystem(), "/abs/ckpt") == "/abs/ckpt"


def test_object_storage_failures_are_one_line_naming_the_location(s3, monkeypatch):
    missing_bucket = "s3://no-such-bucket/runs"
    with pytest.raises(
        storage.StorageError, match=r"^s3://no-such-bucket/runs: storage is not writable \(.*bucket does not exist"
    ):
        storage.check_writable(missing_bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3["read_only"]["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3["read_only"]["AWS_SECRET_ACCESS_KEY"])
    with pytest.raises(storage.StorageError, match="not writable.*access denied"):
        storage.check_writable(f"s3://{S3_BUCKET}/read-only")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(storage.StorageError, match="access denied") as denied:
        storage.read_bytes(f"s3://{S3_BUCKET}/x")
    assert "\n" not in str(denied.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(
        storage.StorageError, match="cannot reach the storage endpoint AWS_ENDPOINT_URL=http://127.0.0.1"
    ):
        storage.check_readable(f"s3://{S3_BUCKET}/x")


def _closed_port() -> int:
    from conftest import free_port

    return free_port()  # bound then released: nothing listens there


def test_local_write_errors_keep_their_errno(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError) as err:
        storage.write_text(str(blocker / "under" / "a.txt"), "x")  # a file where a folder should be
    assert err.value.errno is not None and os.path.exists(blocker)
