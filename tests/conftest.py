"""Shared fixtures: small generated datasets, reusable by every test module."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from gankd_ray.data.records import Rejections
from gankd_ray.data.sources.synthetic import SyntheticSpec, synthetic_source_data
from gankd_ray.data.writer import write_dataset

# Remote datasets and teachers are cached per node (gankd_ray.node_cache): the tests' copies go to a folder of
# their own, set before any Ray starts so every worker inherits it, never to the user's ~/.cache.
TEST_CACHE = tempfile.mkdtemp(prefix="gankd-test-cache-")
os.environ["GANKD_RAY_CACHE"] = TEST_CACHE
atexit.register(shutil.rmtree, TEST_CACHE, ignore_errors=True)

SYNTHETIC_TEST_SPEC = SyntheticSpec(seed=0, image_size=160, num_train=48, num_val=16, num_test=16)
SYNTHETIC_ROWS_PER_SHARD = 20  # train splits into files of 20, 20 and 8 rows: readers see several shards


def make_synthetic_dataset(
    out: Path, spec: SyntheticSpec = SYNTHETIC_TEST_SPEC, rows_per_shard: int = SYNTHETIC_ROWS_PER_SHARD
) -> Path:
    """Write a synthetic prepared dataset at ``out`` quietly; returns ``out``."""
    write_dataset(out, synthetic_source_data(spec), Rejections(), rows_per_shard=rows_per_shard, log=lambda _: None)
    return out


def split_row_groups(data: Path, split: str, rows_per_group: int) -> None:
    """Rewrite the parquet files of ``split`` of the prepared dataset at ``data`` with row groups of
    ``rows_per_group`` rows (the writer's other settings kept): a small split then spans many row groups."""
    import pyarrow.parquet as pq

    for path in sorted((data / "parquet" / split).glob("*.parquet")):
        table = pq.read_table(path)
        pq.write_table(table, path, row_group_size=rows_per_group, compression="none", write_statistics=["image_id"])


def corrupt_row_group(path: Path, group: int) -> None:
    """Overwrite the first page header of row group ``group`` of the parquet file at ``path`` with junk: the
    footer still parses and the other row groups still read; reading that one raises pyarrow's error."""
    import pyarrow.parquet as pq

    column = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))


def corrupt_image(path: Path, row: int) -> tuple[int, str]:
    """Replace the encoded image of row ``row`` of the parquet file at ``path`` with a JPEG header and nothing
    after it: the row still reads, its image no longer decodes. Returns that row's ``(image_id, file_name)``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[row] = b"\xff\xd8\xff\xe0" + bytes(12)
    column = table.schema.get_field_index("image")
    pq.write_table(table.set_column(column, table.schema.field(column), pa.array(images, pa.binary())), path)
    corrupted = table.slice(row, 1).to_pylist()[0]
    return corrupted["image_id"], corrupted["file_name"]


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a prepared synthetic dataset: 160 px, 48 train / 16 val / 16 test images, 5 classes.

    Session-scoped and shared: treat it as read-only.
    """
    return str(make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "data"))


def flags(**options: object) -> list[str]:
    """A command line's options from keywords: ``flags(role="gankd", max_failures=0)`` is
    ``["--role", "gankd", "--max-failures", "0"]`` (keyword order kept)."""
    return [part for name, value in options.items() for part in (f"--{name.replace('_', '-')}", str(value))]


PAPER_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "paper.yaml"


def paper_recipe(config):
    """``config`` (a ``RunConfig``) with the published GAN-KD recipe applied: the fixed values of
    ``search_spaces/paper.yaml`` (the recipe's one source of truth), through the search's own
    ``SearchSpace.to_overrides``."""
    from gankd_ray.tune.space import load_space

    space = load_space(PAPER_SPACE, config)
    return config.with_overrides(space.to_overrides(space.fixed_values()))


def write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A small noisy RGB image (format from the suffix: .png, .jpg)."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_untrained_teacher(data: str, path: Path, backbone: str = "mobilenet_v2_0.5") -> str:
    """A randomly initialised teacher saved as a gankd-ray model file for ``data``'s classes: tests of
    faults and orchestration need a valid teacher, not a good one."""
    import torch

    from gankd_ray.config import RunConfig
    from gankd_ray.data import read_dataset_info
    from gankd_ray.models import build_detector
    from gankd_ray.train.checkpoint import model_payload, save_torch

    cfg = RunConfig(role="teacher")
    cfg.detector.backbone = backbone
    cfg.detector.num_classes = len(read_dataset_info(data)["classes"])
    torch.manual_seed(0)
    save_torch(model_payload(build_detector(cfg.detector), cfg), path)
    return str(path)


@pytest.fixture(scope="session")
def untrained_teacher(synthetic_data, tmp_path_factory) -> str:
    """Path of an untrained mobilenet_v2_0.5 teacher for ``synthetic_data`` (read-only, shared)."""
    return write_untrained_teacher(synthetic_data, tmp_path_factory.mktemp("teacher") / "model.pt")


def read_trials_metrics(trials_dir: Path) -> dict[str, list[dict]]:
    """Every run under ``trials_dir`` that has a metrics log: ``{run folder name: records}``."""
    from gankd_ray.records import METRICS_FILE, read_metrics

    return {path.parent.name: read_metrics(str(path.parent)) for path in sorted(trials_dir.glob(f"*/{METRICS_FILE}"))}


# --------------------------------------------------------------------------------------------
# A real S3 API server on 127.0.0.1 (moto's server mode), with IAM authentication enforced


S3_BUCKET = "gankd"
S3_REGION = "us-east-1"
# Requests the server takes unauthenticated: creating the two IAM users (user, policy, access key each);
# every request after these must be signed with a known key that its policy allows.
S3_SETUP_REQUESTS = 6


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, proc, timeout: float = 60) -> None:
    import socket
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the S3 server exited at start-up"
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"the S3 server did not listen on port {port}")


def _s3_user(iam, name: str, actions: list[str]) -> dict[str, str]:
    import json

    iam.create_user(UserName=name)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
    iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """An S3 API server on a free 127.0.0.1 port with bucket ``S3_BUCKET``.

    Yields ``{"url", "env" (what a client needs: AWS_ENDPOINT_URL and a read-write key), "read_only"
    (env of a key that may only read), "bucket", "log" (the server's request log: one line per request,
    ``"GET /bucket/key HTTP/1.1"``)}``. The test process's own environment gets ``env`` too, so
    pyarrow in the tests reads what the CLIs wrote.
    """
    import os
    import subprocess
    import sys

    import boto3

    port = free_port()
    log_path = tmp_path_factory.mktemp("s3") / "server.log"
    log = open(log_path, "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(S3_SETUP_REQUESTS)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    try:
        _wait_for_port(port, server)
        url = f"http://127.0.0.1:{port}"
        iam = boto3.client(
            "iam", endpoint_url=url, region_name=S3_REGION, aws_access_key_id="setup", aws_secret_access_key="setup"
        )
        read_write = _s3_user(iam, "gankd-rw", ["s3:*"])
        read_only = _s3_user(iam, "gankd-ro", ["s3:Get*", "s3:List*", "s3:Head*"])
        env = {"AWS_ENDPOINT_URL": url, "AWS_DEFAULT_REGION": S3_REGION, **read_write}
        boto3.client(
            "s3",
            endpoint_url=url,
            region_name=S3_REGION,
            aws_access_key_id=read_write["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=read_write["AWS_SECRET_ACCESS_KEY"],
        ).create_bucket(Bucket=S3_BUCKET)
        os.environ.update(env)
        yield {
            "url": url,
            "port": port,
            "env": env,
            "read_only": {**env, **read_only},
            "bucket": S3_BUCKET,
            "log": log_path,
        }
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def upload(local: str | Path, uri: str) -> str:
    """Copy a local file or folder to ``uri`` (on the S3 server); returns ``uri``."""
    import pyarrow.fs as pafs

    pafs.copy_files(str(local), uri)
    return uri


class TcpProxy:
    """A TCP forwarder on a free 127.0.0.1 port to ``target_port``, which a test can cut (every connection
    closed, new ones refused: a network outage) and restore on the same port."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self._listener = None
        self._connections: list = []
        self.restore()

    def restore(self) -> None:
        import socket
        import threading

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        import socket

        self._listener.close()
        for conn in self._connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._connections.clear()

    def _accept(self, listener) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self._connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source, sink) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.close()
                except OSError:
                    pass
