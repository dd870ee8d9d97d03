"""How fast a student is where it will run: measured, not estimated.

``measure_latency`` times the deployable prediction path (``predict_resized``: normalise, backbone, head,
decoding and NMS) on one image (batch 1) at the detector's input size, after warm-up runs, and reports the
median and 90th percentile of ``runs`` timed calls, with the CPU thread count pinned for the measurement and
recorded, the device, the parameter count and the forward FLOPs (``torch.utils.flop_counter``: convolutions and
matrix products, which is where a detector's cost is; NMS and decoding are in the timing, not in the FLOPs).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Latency:
    latency_ms: float  # median
    latency_p90_ms: float
    runs: int
    threads: int
    device: str
    image_size: int
    params: int
    gflops: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_latency(
    detector: torch.nn.Module,
    image_size: int,
    *,
    device: str | torch.device = "cpu",
    runs: int = 30,
    warmup: int = 5,
    threads: int | None = None,
) -> Latency:
    """Latency of ``detector.predict_resized`` on one ``image_size`` image (see the module docstring).

    ``threads``: torch CPU threads for the measurement (default: the current count); restored after.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs={runs}, warmup={warmup}: need runs >= 1 and warmup >= 0")
    device = torch.device(device)
    image = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
    sizes = [(image_size, image_size)]
    previous = torch.get_num_threads()
    threads = threads or previous
    torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            detector.predict_resized(image, sizes)
        times = [_timed(detector, image, sizes, device) for _ in range(runs)]
    finally:
        torch.set_num_threads(previous)
    return Latency(
        latency_ms=statistics.median(times),
        latency_p90_ms=_percentile(times, 0.9),
        runs=runs,
        threads=threads,
        device=str(device),
        image_size=image_size,
        params=sum(p.numel() for p in detector.parameters()),
        gflops=forward_flops(detector, image) / 1e9,
    )


def _timed(detector: torch.nn.Module, image: torch.Tensor, sizes: list[tuple[int, int]], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    detector.predict_resized(image, sizes)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) * 1000.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def forward_flops(detector: torch.nn.Module, image: torch.Tensor) -> int:
    """FLOPs of one prediction (``FlopCounterMode`` counts a multiply-add as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        detector.predict_resized(image, [tuple(image.shape[-2:])])
    return int(counter.get_total_flops())
