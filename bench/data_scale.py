"""Does the input pipeline's memory stay flat as the dataset grows, and does the loader outrun the trainer?

Per dataset size (synthetic, 160 px, 1k / 10k / 50k training images by default) and per loading mode, one fresh
process (peak memory is per process):
- ``streamed``: the training loader as the product builds it (``DetectionBatchLoader.from_dataset``: row groups
  streamed through the shuffle buffer, decoded in one loader worker);
- ``in_memory``: the rank's whole share read first (``read_split``), the previous design, as the contrast;
- ``ray_data`` (starts a local Ray): the same epoch through Ray Data, the alternative engine, under the loader's
  guarantees (seeded per-epoch file order, the same decode/flip/jitter with boxes in its tasks, a seeded
  1024-row local shuffle, ``preserve_order`` so the order repeats, last partial batch dropped); loader figures
  only.
Each process passes one full training epoch through the loader (every row read, decoded and batched), then runs
``--train-steps`` real student training steps on its batches (the step's memory does not depend on the dataset, and a
full epoch of steps at 50k images is hours on CPU). Memory is sampled every 50 ms over the process and its
descendants (loader workers; for Ray Data Ray's daemons and task workers), proportional set sizes summed, from
/proc (Linux only). Per run: ``idle_pss_mb`` (before the pipeline starts: for Ray Data, an idle local Ray),
``pipeline_pss_mb`` (the epoch's peak over that: what the input pipeline adds), ``first_batch_s``, and at up to
2,000 images ``same_order_on_rerun`` (a second pass of the same epoch gives the same image order). Figures:
- ``peak_pss_mb`` per size and mode, and ``rss_ratio_50k_over_1k`` (streamed, largest size over smallest, of that
  memory; goal <= 1.2);
- ``loader_images_per_s`` (the epoch pass) over ``train_images_per_s`` (the steps) = ``loader_over_consumption``
  (goal >= 3; one loader worker, as ``data.loader_workers`` defaults).
- ``dataset_reads_per_node``: a ``--s3-trials``-trial search (plus its teacher and baseline runs, each reading the
  dataset) with the dataset on a local S3 API server (moto) behind a byte-counting proxy: bytes the server sent
  over the bytes of the dataset's files (goal: about 1, one read per node, not one per run). Starts Ray.
- ``ray_data_over_streamed`` per size: Ray Data's ``pipeline_pss_mb``, ``loader_images_per_s`` and
  ``first_batch_s`` over the streamed loader's, measured in the same run.
Writes ``bench/results/data_scale.json``.

Usage: ``python bench/data_scale.py [--sizes 1000 10000 50000] [--modes streamed in_memory ray_data]
[--train-steps 20]``
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "data_scale.json"
BATCH_SIZE = 16


def prepare(size: int, data_root: Path) -> Path:
    from gankd_ray.data.records import Rejections
    from gankd_ray.data.sources.synthetic import SyntheticSpec, synthetic_source_data
    from gankd_ray.data.writer import write_dataset

    out = data_root / f"synthetic-{size}"
    if not (out / "dataset.json").exists():
        print(f"[bench] generating {size} images at {out}", flush=True)
        spec = SyntheticSpec(seed=0, num_train=size, num_val=16, num_test=16)
        write_dataset(out, synthetic_source_data(spec), Rejections(), log=lambda _: None)
    return out


class PeakMemory:
    """Samples the memory of this process plus its children (the loader workers) until stopped (Linux /proc)."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.pid, self.interval_s, self.peak = os.getpid(), interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss_of(pid: int | str) -> int:
        """Proportional set size: pages shared by the forked workers (torch, the model) count once in the sum."""
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:  # a worker that just exited
            return 0
        pss = next((line for line in text.splitlines() if line.startswith("Pss:")), "Pss: 0 kB")
        return int(pss.split()[1]) * 1024

    def _children(self) -> list[str]:
        """Every descendant (loader workers; for Ray Data also the raylet, its workers and the object store's
        users)."""
        parents = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parents[stat.parent.name] = stat.read_text().rsplit(")", 1)[1].split()[1]
            except (OSError, IndexError):
                pass
        found, frontier = [], [str(self.pid)]
        while frontier:
            children = [pid for pid, parent in parents.items() if parent in frontier]
            found += children
            frontier = children
        return found

    def sample(self) -> int:
        """The memory now (and the peak so far updated with it)."""
        now = self._rss()
        self.peak = max(self.peak, now)
        return now

    def _rss(self) -> int:
        return self._rss_of(self.pid) + sum(self._rss_of(child) for child in self._children())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


RAY_DATA_SEED, EPOCH = 3, 1
Batches = Iterator[tuple[Any, Any, list[int]]]  # (images, targets, image ids)
RERUN_MAX_IMAGES = 2000  # at or below this size the epoch is passed a second time to check it repeats


def idle_pss(memory: PeakMemory, settle_s: float = 3.0) -> int:
    """The memory of the process tree before the input pipeline starts (for Ray Data: Ray's daemons, idle), so
    the figure the pipeline itself adds is the peak minus this."""
    time.sleep(settle_s)
    return memory.sample()


def ray_data_batches(data: str, image_size: int, jitter: float) -> Batches:
    """One training epoch through Ray Data, the alternative engine, doing the loader's work under its guarantees:
    ``read_parquet`` of the split, file order drawn per epoch (its streaming input shuffle), each row
    decoded, resized, flipped and jittered with its boxes in Ray Data's tasks, batches of ``BATCH_SIZE`` through
    its 1024-row local shuffle buffer (as ``data.shuffle_buffer``), seeded, ``preserve_order`` on (without it the
    order depends on task timing), the last partial batch dropped. Yields (image tensor, image ids)."""
    import numpy as np
    import ray
    import torch
    from ray.data.datasource.file_based_datasource import FileShuffleConfig

    from gankd_ray.data.transforms import DetectionTransform

    transform = DetectionTransform(image_size, hflip=True, jitter=jitter)

    def decode(batch: dict) -> dict:
        images, boxes = [], []
        for image_id, image, flat in zip(batch["image_id"], batch["image"], batch["boxes"]):  # boxes: N arrays of 4
            rng = np.random.default_rng([RAY_DATA_SEED, EPOCH, int(image_id)])
            tensor, scaled, _ = transform(image, np.array([list(box) for box in flat], np.float32).reshape(-1, 4), rng)
            images.append(tensor.numpy())
            boxes.append(scaled.numpy().ravel())
        return {"image": np.stack(images), "image_id": batch["image_id"], "boxes": boxes, "labels": batch["labels"]}

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    files = sorted(str(path) for path in Path(data, "parquet", "train").glob("*.parquet"))
    columns = ["image_id", "image", "boxes", "labels"]
    # Files in a seeded order per epoch: Ray Data's streaming shuffle of the input (``randomize_block_order``, the
    # block-level one, is an all-to-all operator that reads the whole split before the first batch).
    epoch_seed = RAY_DATA_SEED * 1000 + EPOCH
    file_order = FileShuffleConfig(seed=epoch_seed, reseed_after_execution=False)
    dataset = ray.data.read_parquet(files, columns=columns, shuffle=file_order)
    batches = dataset.map_batches(decode, batch_size=64).iter_batches(
        batch_size=BATCH_SIZE,
        batch_format="numpy",
        local_shuffle_buffer_size=1024,
        local_shuffle_seed=epoch_seed,
        drop_last=True,
    )
    for batch in batches:
        targets = [
            {"boxes": torch.from_numpy(b).reshape(-1, 4), "labels": torch.as_tensor(lab)}
            for b, lab in zip(batch["boxes"], batch["labels"])
        ]
        yield torch.from_numpy(batch["image"]), targets, [int(i) for i in batch["image_id"]]


def gankd_batches(data: str, image_size: int, jitter: float, in_memory: bool) -> Batches:
    """One training epoch through the product's loader (streamed) or over the whole share read first."""
    from gankd_ray.data.loader import DetectionBatchLoader
    from gankd_ray.data.reader import read_split

    options = {"train": True, "num_workers": 1, "jitter": jitter, "seed": RAY_DATA_SEED}
    if in_memory:
        loader = DetectionBatchLoader(read_split(data, "train"), image_size, BATCH_SIZE, **options)
    else:
        loader = DetectionBatchLoader.from_dataset(data, "train", image_size, BATCH_SIZE, **options)
    loader.set_epoch(EPOCH)
    for images, targets, metas in loader:
        yield images, targets, [meta["image_id"] for meta in metas]


def epoch_pass(batches: Batches) -> dict[str, Any]:
    """Consume one epoch: images, seconds to the first batch and in all, and a digest of the image order."""
    import hashlib

    started, first_batch_s, ids = time.perf_counter(), None, []
    for images, _, image_ids in batches:
        first_batch_s = first_batch_s if first_batch_s is not None else time.perf_counter() - started
        ids += image_ids
        assert images.shape[0] == len(image_ids)
    seconds = time.perf_counter() - started
    order = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
    return {"images": len(ids), "seconds": seconds, "first_batch_s": first_batch_s, "order": order}


def measure(data: str, mode: str, train_steps: int) -> dict[str, Any]:
    """One size and mode, in this (fresh) process."""
    import torch

    from gankd_ray.config import RunConfig
    from gankd_ray.distill import build_step

    torch.set_num_threads(1)
    overrides = {"role": "student", "optim.batch_size": BATCH_SIZE, "data.path": data, "detector.num_classes": 5}
    cfg = RunConfig().with_overrides(overrides)  # the synthetic generator draws 5 classes
    size, jitter = cfg.detector.image_size, cfg.data.jitter

    def epoch() -> Batches:
        if mode == "ray_data":
            return ray_data_batches(data, size, jitter)
        return gankd_batches(data, size, jitter, in_memory=mode == "in_memory")

    with PeakMemory() as memory, ray_for(mode):
        idle = idle_pss(memory)
        passed = epoch_pass(epoch())
        epoch_peak = memory.peak
        row = {
            "images": passed["images"],
            "idle_pss_mb": idle / 2**20,
            "epoch_peak_pss_mb": epoch_peak / 2**20,
            "pipeline_pss_mb": (epoch_peak - idle) / 2**20,  # what the input pipeline adds
            "loader_images_per_s": passed["images"] / passed["seconds"],
            "first_batch_s": passed["first_batch_s"],
        }
        if passed["images"] <= RERUN_MAX_IMAGES:
            rerun = epoch_pass(epoch())  # warm: Ray Data's task workers exist now, the loader forks a new worker
            row["same_order_on_rerun"] = rerun["order"] == passed["order"]
            row["rerun_images_per_s"] = rerun["images"] / rerun["seconds"]
        if mode != "ray_data":
            row["train_images_per_s"] = train_rate(build_step(cfg), epoch(), train_steps)
    return {**row, "peak_pss_mb": memory.peak / 2**20}


@contextlib.contextmanager
def ray_for(mode: str) -> Iterator[None]:
    """A local Ray of this machine's size for the Ray Data arm (its daemons count in the idle figure)."""
    if mode != "ray_data":
        yield
        return
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def train_rate(step: Any, batches: Batches, train_steps: int) -> float:
    """Images a second of ``train_steps`` real student GAN-KD steps (the first, which builds lazy state, untimed)."""
    next(batches)
    started = time.perf_counter()
    for index in range(train_steps):
        images, targets, _ = next(batches)
        step.train_step(images, targets, index / max(train_steps, 1))
    return train_steps * BATCH_SIZE / (time.perf_counter() - started)


def run_child(data: Path, mode: str, train_steps: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", str(data), "--modes", mode, "--train-steps", str(train_steps)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


class CountingProxy:
    """A TCP forwarder to ``target_port`` that counts the bytes the server sends back: what clients read."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.bytes_to_clients = target_port, 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the server is not up yet: the client retries
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source, sink, count: bool) -> None:
        try:
            while data := source.recv(65536):
                if count:
                    with self._lock:
                        self.bytes_to_clients += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            source.close()
            sink.close()


@contextlib.contextmanager
def s3_server(workdir: Path) -> Iterator[CountingProxy]:
    """moto's S3 server on 127.0.0.1 with bucket ``bench``, reached through a counting proxy (this process's
    environment points at the proxy, and so does every process it starts)."""
    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(workdir / "moto.log", "w") as server_log:
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        server = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT)
        try:
            proxy = CountingProxy(port)
            os.environ.update(
                AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}",
                AWS_ACCESS_KEY_ID="bench",
                AWS_SECRET_ACCESS_KEY="bench",
                AWS_DEFAULT_REGION="us-east-1",
            )
            for _ in range(100):
                try:
                    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
                    break
                except Exception:  # the server is still starting
                    time.sleep(0.2)
            yield proxy
        finally:
            server.terminate()
            server.wait(timeout=30)


def upload_dataset(data: Path, uri: str) -> int:
    """What a node copies of a dataset (``gankd_ray.node_cache``): its json, annotations and shards; bytes."""
    import pyarrow.fs as pafs

    parts = [data / part for part in ("dataset.json", "annotations", "parquet")]
    for path in parts:
        pafs.copy_files(str(path), f"{uri}/{path.name}")
    return sum(f.stat().st_size for p in parts for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())


def s3_search_reads(data: Path, workdir: Path, trials: int) -> dict[str, Any]:
    """Bytes a ``trials``-trial search (which also trains its teacher and baseline) reads from an S3 server
    holding the dataset, over the bytes of one copy of the dataset: 1.0 is one read per node (one node here)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cache = workdir / f"node-cache-{time.time_ns()}"  # empty: the search's first run downloads
    with s3_server(workdir) as proxy:
        dataset_bytes = upload_dataset(data, "s3://bench/data")
        before = proxy.bytes_to_clients
        command = [sys.executable, str(ROOT / "launch" / "search.py"), "--data", "s3://bench/data"]
        command += ["--storage", str(workdir / "runs"), "--name", cache.name.replace("node-cache", "search")]
        command += ["--num-samples", str(trials), "--max-epochs", "2", "--grace-period", "1", "--teacher-epochs", "1"]
        command += ["optim.batch_size=8", "data.loader_workers=0"]
        with open(workdir / "search.log", "w") as log:
            env = {**os.environ, "GANKD_RAY_CACHE": str(cache)}
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        read = proxy.bytes_to_clients - before
    return {
        "trials": trials,
        "runs_reading_the_dataset": trials + 2,  # the trials, the teacher and the baseline
        "nodes": 1,
        "dataset_bytes": dataset_bytes,
        "bytes_read_from_s3": read,
        "dataset_reads_per_node": read / dataset_bytes,
    }


def merged_rows(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This run's rows over those already in ``path`` (by size and mode), so arms can be measured one at a
    time (the 50k in-memory arm alone takes minutes)."""
    measured = {(row["size"], row["mode"]) for row in rows}
    kept = json.loads(path.read_text()).get("runs", []) if path.exists() else []
    rows = [r for r in kept if (r["size"], r["mode"]) not in measured] + rows
    return sorted(rows, key=lambda r: (r["size"], r["mode"]))


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    streamed = {row["size"]: row for row in rows if row["mode"] == "streamed"}
    ray_data = {row["size"]: row for row in rows if row["mode"] == "ray_data"}
    sizes = sorted(streamed)
    top = {}
    if len(sizes) > 1:
        top["rss_ratio_50k_over_1k"] = streamed[sizes[-1]]["peak_pss_mb"] / streamed[sizes[0]]["peak_pss_mb"]
        top["rss_ratio_sizes"] = [sizes[-1], sizes[0]]
    if streamed:
        ratios = [row["loader_images_per_s"] / row["train_images_per_s"] for row in streamed.values()]
        top["loader_over_consumption"] = min(ratios)
    for size in sorted(set(ray_data) & set(streamed)):  # the same epoch through Ray Data, at the same size
        ray, ours = ray_data[size], streamed[size]
        top.setdefault("ray_data_over_streamed", {})[str(size)] = {
            key: ray[key] / ours[key] for key in ("pipeline_pss_mb", "loader_images_per_s", "first_batch_s")
        }
    return top


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    modes = ["streamed", "in_memory", "ray_data"]
    parser.add_argument("--modes", nargs="+", choices=modes, default=modes, help="ray_data starts Ray")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--data-root", type=Path, default=ROOT / "runs" / "data_scale")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--s3-trials", type=int, default=4, help="trials of the S3 search (0: skip it; starts Ray)")
    parser.add_argument("--skip-memory", action="store_true", help="only the S3 search")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one dataset in this process
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.modes[0], args.train_steps)))
        return 0
    from gankd_ray.utils import machine_description, write_benchmark_json

    rows = []
    for size in [] if args.skip_memory else args.sizes:
        data = prepare(size, args.data_root)
        for mode in args.modes:
            row = {"size": size, "mode": mode, **run_child(data, mode, args.train_steps)}
            training = f", training {row['train_images_per_s']:5.1f} img/s" if "train_images_per_s" in row else ""
            print(
                f"[bench] {size:>6} images {mode:>9}: peak PSS {row['peak_pss_mb']:7.0f} MB, loader "
                f"{row['loader_images_per_s']:6.1f} img/s{training}",
                flush=True,
            )
            rows.append(row)
    rows = merged_rows(args.out, rows)
    s3 = json.loads(args.out.read_text()).get("s3_search", {}) if args.out.exists() else {}
    if args.s3_trials:
        s3 = s3_search_reads(prepare(min(args.sizes), args.data_root), args.data_root / "s3", args.s3_trials)
        print(f"[bench] S3 search of {s3['trials']} trials: {s3['dataset_reads_per_node']:.2f} dataset reads per node")
    report = {
        "benchmark": "data_scale",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_description(),
        "batch_size": BATCH_SIZE,
        "train_steps": args.train_steps,
        **summarize(rows),
        **({"dataset_reads_per_node": s3["dataset_reads_per_node"]} if s3 else {}),
        "runs": rows,
        "s3_search": s3,
    }
    write_benchmark_json(args.out, report)
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
