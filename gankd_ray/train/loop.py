"""The per-worker function run by ``ray.train.torch.TorchTrainer``: the engine under Ray Train's runtime.

Each worker receives the ``TrainJob`` itself; ``RayRuntime`` gives the engine its rank, the run's latest
checkpoint (a worker failure, or the same storage+name started again, continues after it) and
``ray.train.report`` for each epoch's record and checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from gankd_ray.records import EpochRecord
from gankd_ray.train.spec import TrainJob

JOB_KEY = "job"  # the key of the TrainJob in TorchTrainer's train_loop_config


def train_loop_per_worker(config: dict[str, Any]) -> None:
    from gankd_ray.train.engine import fit

    job: TrainJob = config[JOB_KEY]
    fit(job, RayRuntime())


class RayRuntime:
    """The engine's runtime inside a Ray Train worker."""

    def __init__(self):
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.local_rank = context.get_local_rank()

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()[:12]

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield directory

    def report(self, record: EpochRecord, checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(record.to_dict(), checkpoint=checkpoint)
