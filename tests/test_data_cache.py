"""The node-local cache (gankd_ray.node_cache) against a real S3 API server: a remote dataset or teacher is
downloaded once per node and read back identical; concurrent processes download it once (counted in the
server's request log); incomplete copies are redone; a disk that cannot hold the copy falls back to storage."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import S3_BUCKET, make_synthetic_dataset, upload, write_untrained_teacher

from gankd_ray import node_cache
from gankd_ray.config import ConfigError, DataConfig, RunConfig
from gankd_ray.data import SPLITS, DatasetError, read_dataset_info, read_split
from gankd_ray.data.sources.synthetic import SyntheticSpec
from gankd_ray.eval import load_coco

REPO = Path(__file__).resolve().parents[1]
SMALL_SPEC = SyntheticSpec(seed=0, image_size=64, num_train=16, num_val=8, num_test=8)
ROWS_PER_SHARD = 6  # several shards per split


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("cache-data") / "data", SMALL_SPEC, ROWS_PER_SHARD)


@pytest.fixture
def remote_data(s3, local_data, request) -> str:
    """The small dataset uploaded under a prefix of this test's own, so request counts are the test's."""
    return upload(local_data, f"s3://{S3_BUCKET}/node_cache/{request.node.name}/data")


def plain_rows(rows: list[dict]) -> list[dict]:
    return [{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in row.items()} for row in rows]


def object_gets(s3, uri: str, part: str) -> dict[str, int]:
    """``{object key: GET requests}`` the S3 server logged for objects under ``uri``/``part``."""
    prefix = "/" + uri.removeprefix("s3://") + "/" + part + "/"
    counts: dict[str, int] = {}
    for key in re.findall(r"GET (\S+) HTTP", Path(s3["log"]).read_text()):
        if key.startswith(prefix) and "?" not in key:
            counts[key] = counts.get(key, 0) + 1
    return counts


def cache_leftovers(cache: Path) -> list[str]:
    """What sits in the cache's datasets folder besides complete copies and lock files."""
    folder = cache / "datasets"
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return [n for n in names if not n.endswith(".lock") and not (folder / n / node_cache.MARKER).is_file()]


def test_a_remote_dataset_is_cached_once_and_reads_back_the_same_rows(remote_data, local_data, tmp_path):
    cache = tmp_path / "cache"
    first = node_cache.fetch_dataset(remote_data, str(cache))
    assert first.downloaded and Path(first.location).parent == cache / "datasets"
    info = read_dataset_info(remote_data)
    assert Path(first.location).name.startswith(info["inputs_sha256"] + "-")
    assert read_dataset_info(first.location) == info
    for split in SPLITS:
        assert plain_rows(read_split(first.location, split)) == plain_rows(read_split(remote_data, split))
        assert load_coco(first.location, split).dataset == load_coco(remote_data, split).dataset
    assert not (Path(first.location) / "images").exists()  # the parquet shards hold the image bytes already
    again = node_cache.fetch_dataset(remote_data, str(cache))
    assert again == node_cache.Fetched(first.location, downloaded=False)
    assert node_cache.local_dataset(remote_data, str(cache)) == first.location


def test_another_preparation_of_the_same_inputs_gets_its_own_copy(s3, local_data, tmp_path):
    """inputs_sha256 does not cover the split assignment: a dataset.json that differs otherwise is another key."""
    other = shutil.copytree(local_data, tmp_path / "other")
    info = json.loads((other / "dataset.json").read_text())
    info["created"] = "2000-01-01T00:00:00+00:00"
    (other / "dataset.json").write_text(json.dumps(info))
    first = node_cache.fetch_dataset(upload(local_data, f"s3://{S3_BUCKET}/node_cache/prep/a"), str(tmp_path / "c"))
    second = node_cache.fetch_dataset(upload(other, f"s3://{S3_BUCKET}/node_cache/prep/b"), str(tmp_path / "c"))
    assert first.downloaded and second.downloaded and first.location != second.location
    assert read_dataset_info(second.location)["created"] == "2000-01-01T00:00:00+00:00"


FETCH_AFTER_GO = """
import json, sys, time
from pathlib import Path
from gankd_ray import node_cache
print("ready", flush=True)
while not Path(sys.argv[3]).exists():
    time.sleep(0.005)
fetched = node_cache.fetch_dataset(sys.argv[1], sys.argv[2])
print(json.dumps({"location": fetched.location, "downloaded": fetched.downloaded}), flush=True)
"""


def test_concurrent_processes_download_a_dataset_once(s3, remote_data, tmp_path):
    cache, go = tmp_path / "cache", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FETCH_AFTER_GO, remote_data, str(cache), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for proc in procs:  # every process imported and waits: released together, they race for the download
        assert proc.stdout.readline().strip() == "ready"
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out))
    assert sum(r["downloaded"] for r in results) == 1
    assert len({r["location"] for r in results}) == 1
    # The server's own log: each shard and annotation file was fetched by one process only.
    shards = object_gets(s3, remote_data, "parquet")
    assert len(shards) == len(list(Path(results[0]["location"]).glob("parquet/*/*.parquet"))) >= len(SPLITS)
    assert set(shards.values()) == {1}
    assert set(object_gets(s3, remote_data, "annotations").values()) == {1}


def test_an_incomplete_copy_is_removed_and_downloaded_again(remote_data, tmp_path):
    cache = tmp_path / "cache"
    target = Path(node_cache.local_dataset(remote_data, str(cache)))
    shard = sorted(target.glob("parquet/train/*.parquet"))[0]
    size = shard.stat().st_size
    (target / node_cache.MARKER).unlink()  # a copy that never finished: no marker, a short file
    shard.write_bytes(shard.read_bytes()[: size // 2])
    stale = target.with_name(f".{target.name}.999999.0badc0de.staging")  # a dead process's staging folder
    (stale / "parquet").mkdir(parents=True)
    redone = node_cache.fetch_dataset(remote_data, str(cache))
    assert redone == node_cache.Fetched(str(target), downloaded=True)
    assert shard.stat().st_size == size and not stale.exists() and cache_leftovers(cache) == []
    assert plain_rows(read_split(str(target), "train")) == plain_rows(read_split(remote_data, "train"))


def test_a_copy_that_does_not_match_the_listing_is_removed_with_an_error_naming_the_dataset(remote_data, tmp_path):
    target = tmp_path / "cache" / "datasets" / "key"
    target.parent.mkdir(parents=True)
    _, root = node_cache.storage.resolve(remote_data)

    def short_download(staging: Path) -> dict[str, int]:
        listing = node_cache._remote_listing(remote_data, node_cache.DATASET_PARTS)
        node_cache._copy_files(remote_data, root, listing, staging)
        shard = sorted(staging.glob("parquet/val/*.parquet"))[0]
        shard.write_bytes(shard.read_bytes()[:100])  # what a cut-off read leaves
        node_cache._check_copy(remote_data, staging, listing)
        return listing

    with pytest.raises(node_cache.CacheError, match=rf"^{re.escape(remote_data)}: .*parquet/val/part-00000.parquet"):
        node_cache._download_into_place(target, remote_data, short_download)
    assert list(target.parent.iterdir()) == []


def test_a_dataset_that_does_not_fit_is_streamed_from_storage_with_one_warning(remote_data, tmp_path, caplog):
    cache = tmp_path / "cache"
    cache.mkdir()
    reserve_mb = shutil.disk_usage(cache).free / 2**20 + 1024  # more than the disk has: nothing fits
    with caplog.at_level(logging.WARNING, logger=node_cache.__name__):
        fetched = node_cache.fetch_dataset(remote_data, str(cache), reserve_mb=reserve_mb)
    assert fetched == node_cache.Fetched(remote_data, downloaded=False)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert re.match(rf"{re.escape(remote_data)}: not cached on this node, .* needed", warnings[0].getMessage())
    assert cache_leftovers(cache) == []
    assert len(read_split(fetched.location, "val")) == SMALL_SPEC.num_val  # the fallback reads storage


@pytest.fixture
def tiny_disk(tmp_path):
    """A tmpfs with room for 64 MB but only 10 files and folders: a copy passes the free-space check and
    runs out of space (ENOSPC) on the way. Needs root and mount(8)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,nr_inodes=10", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if os.geteuid() != 0 or made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.strip() or 'not root'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_disk_that_fills_up_during_the_copy_falls_back_to_storage(remote_data, tiny_disk, caplog):
    with caplog.at_level(logging.WARNING, logger=node_cache.__name__):
        fetched = node_cache.fetch_dataset(remote_data, str(tiny_disk), reserve_mb=0)
    assert fetched == node_cache.Fetched(remote_data, downloaded=False)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.startswith(f"{remote_data}: not cached on this node, the disk filled up during the copy")
    assert cache_leftovers(tiny_disk) == []


@pytest.mark.parametrize("form", ["path", "file_uri"])
def test_a_local_dataset_is_read_in_place(local_data, tmp_path, form):
    location = str(local_data) if form == "path" else f"file://{local_data}"
    cache = tmp_path / "cache"
    assert node_cache.fetch_dataset(location, str(cache)) == node_cache.Fetched(location, downloaded=False)
    assert node_cache.local_file(str(local_data / "dataset.json"), str(cache)) == str(local_data / "dataset.json")
    assert not cache.exists()


def test_a_remote_path_that_is_no_dataset_says_so(s3, tmp_path):
    with pytest.raises(DatasetError, match=r"node_cache/nothing/dataset.json: file not found"):
        node_cache.fetch_dataset(f"s3://{S3_BUCKET}/node_cache/nothing", str(tmp_path / "cache"))


def test_a_remote_teacher_is_cached_once_and_loads_weights_only(s3, local_data, tmp_path):
    from gankd_ray.train import engine

    model = write_untrained_teacher(str(local_data), tmp_path / "model.pt")
    folder = upload(tmp_path / "model.pt", f"s3://{S3_BUCKET}/node_cache/teacher/model.pt").rsplit("/", 1)[0]
    cache = tmp_path / "cache"
    teacher = engine.load_teacher(folder, torch.device("cpu"), DataConfig(cache_dir=str(cache)))  # a checkpoint dir
    fetched = node_cache.fetch_file(f"{folder}/model.pt", str(cache))
    assert not fetched.downloaded and Path(fetched.location).parent.parent == cache / "files"  # load_teacher's copy
    cached = torch.load(fetched.location, weights_only=True)
    expected = torch.load(model, weights_only=True)["state_dict"]
    assert cached["state_dict"].keys() == expected.keys()
    assert all(torch.equal(cached["state_dict"][k], v) for k, v in expected.items())
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in expected.items()) and not teacher.training


def test_a_replaced_remote_file_is_downloaded_again(s3, tmp_path):
    uri = f"s3://{S3_BUCKET}/node_cache/replaced/weights.pt"
    cache = str(tmp_path / "cache")
    torch.save({"w": torch.zeros(4)}, tmp_path / "w.pt")
    upload(tmp_path / "w.pt", uri)
    first = node_cache.fetch_file(uri, cache)
    assert first.downloaded and not node_cache.fetch_file(uri, cache).downloaded
    time.sleep(1.1)  # the object store's modification times have whole seconds
    torch.save({"w": torch.ones(5)}, tmp_path / "w.pt")
    upload(tmp_path / "w.pt", uri)
    second = node_cache.fetch_file(uri, cache)
    assert second.downloaded and second.location != first.location
    assert torch.equal(torch.load(second.location, weights_only=True)["w"], torch.ones(5))


def test_build_data_reads_a_remote_dataset_from_the_node_cache(remote_data, tmp_path):
    from gankd_ray.train import engine

    cfg = RunConfig(role="student")
    cfg.data.path, cfg.data.cache_dir, cfg.data.loader_workers = remote_data, str(tmp_path / "cache"), 0
    data = engine.build_data(cfg, engine.WorkerContext(rank=0, world_size=1, device=torch.device("cpu")))
    assert len(data.coco_gt.dataset["images"]) == SMALL_SPEC.num_val and len(data.train) > 0
    assert not node_cache.fetch_dataset(remote_data, cfg.data.cache_dir).downloaded  # build_data downloaded it
    assert cfg.data.path == remote_data  # the resolved config (saved with checkpoints) keeps the remote location


def test_the_cache_folder_comes_from_the_config_the_environment_or_the_home(tmp_path, monkeypatch):
    monkeypatch.setenv(node_cache.CACHE_ENV, str(tmp_path / "env"))
    assert node_cache.cache_root(str(tmp_path / "cfg")) == tmp_path / "cfg"
    assert node_cache.cache_root("") == tmp_path / "env"
    monkeypatch.delenv(node_cache.CACHE_ENV)
    assert node_cache.cache_root() == Path.home() / ".cache" / "gankd-ray"


def test_cache_settings_are_validated(tmp_path):
    RunConfig().with_overrides(["data.cache_dir=~/scratch", "data.cache_reserve_mb=0"]).validate()
    with pytest.raises(ConfigError, match=r"^data.cache_dir='cache': must be an absolute local folder"):
        RunConfig().with_overrides(["data.cache_dir=cache"]).validate()
    with pytest.raises(ConfigError, match=r"^data.cache_reserve_mb=-1.0: must be >= 0"):
        DataConfig(cache_reserve_mb=-1.0).validate()


def test_an_unusable_cache_folder_is_one_line_naming_it(remote_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(node_cache.CacheError, match=rf"^{re.escape(str(blocker))}/datasets: cannot use the node cache"):
        node_cache.fetch_dataset(remote_data, str(blocker))
