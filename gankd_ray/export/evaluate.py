"""COCO mAP / AP50 of an export on a split of a prepared dataset.

``student.pt`` goes through exactly the path of the training loop's validation: images resized to ``S x S``
by the eval ``DetectionBatchLoader``, then ``SSDDetector.predict_resized`` (the function ``TrainStep.predict``
calls) in float32, so the val figure equals the search's ``best_map`` by construction. ``student.onnx`` (on
request: onnxruntime parses it with native code; trusted files only) runs on the same resized batches, its
network in onnxruntime and the post-processing the detector's own (``SSDDetector.decode``, settings from
``student.pt``), so its figure matches ``student.pt``'s to float rounding. ``student.ts`` (only on request:
TorchScript is code, so a crafted file can touch the disk; trusted files only) is evaluated as a user would
run it: the decoded original images in, TorchScript's own resize inside (tensor bilinear instead of PIL's),
so its numbers are close to, not identical with, the ``student.pt`` ones.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from gankd_ray.export.model import InferenceError, LoadedExport, load_export
from gankd_ray.export.predict import run_scripted, to_tensor

if TYPE_CHECKING:
    from PIL import Image

# What reading a split raises: DatasetError is a ValueError, pyarrow's errors are OSError or ArrowInvalid (a
# ValueError), a COCO file without a key a KeyError.
READ_ERRORS = (OSError, ValueError, KeyError)
_END = object()  # the end of a batch stream
T = TypeVar("T")


def evaluate_export(
    model_dir: str | Path,
    data: str,
    split: str = "test",
    *,
    torchscript: bool = False,
    onnx: bool = False,
    batch_size: int = 16,
    num_workers: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """:func:`evaluate_loaded` with the export loaded from ``model_dir`` (``load_export``'s choice of model)."""
    export = load_export(model_dir, torchscript=torchscript, device=device, onnx=onnx)
    return evaluate_loaded(export, data, split, batch_size=batch_size, num_workers=num_workers, device=device)


def evaluate_loaded(
    export: LoadedExport,
    data: str,
    split: str = "test",
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """COCO metrics (``STAT_NAMES``, ``num_images``, ``num_detections``) of a ``LoadedExport`` on ``split`` of
    ``data``, plus ``split``, ``model`` (the export's location) and ``file`` (which model file ran)."""
    from gankd_ray.eval import evaluate_coco, load_coco

    torchscript = export.config is None
    try:
        coco_gt = load_coco(data, split)
        batches = (
            _original_batches(data, split, batch_size)
            if torchscript
            else _resized_batches(data, split, export.image_size, batch_size, num_workers)
        )
    except READ_ERRORS as err:
        raise _unreadable(data, split, err) from None
    run = _scripted_results if torchscript else _resized_results
    device = "cpu" if export.file.endswith(".onnx") else device  # onnxruntime's CPU provider
    metrics: dict[str, Any] = evaluate_coco(coco_gt, run(export.model, _read_checked(batches, data, split), device))
    metrics.update({"split": split, "model": str(export.location), "file": export.file})
    return metrics


def _unreadable(data: str, split: str, err: BaseException) -> InferenceError:
    from gankd_ray.data.reader import read_failure
    from gankd_ray.data.records import UnreadableRows

    reason = err.reason if isinstance(err, UnreadableRows) else read_failure(err)
    return InferenceError(f"{data}: cannot read split {split!r} ({reason})")


def _read_checked(batches: Iterable[T], data: str, split: str) -> Iterator[T]:
    """``batches``, where a read failure while streaming them (a corrupt row group, storage gone) is the same
    one-line ``InferenceError`` as one before the first batch. Only fetching a batch is checked: an error of
    the model keeps its traceback."""
    iterator: Iterator[T] | None = None
    while True:
        try:
            if iterator is None:
                iterator = iter(batches)  # a DataLoader with workers reads its first batches here
            batch = next(iterator, _END)
        except READ_ERRORS as err:
            raise _unreadable(data, split, err) from None
        if batch is _END:
            return
        yield batch


def _resized_batches(data: str, split: str, image_size: int, batch_size: int, num_workers: int):
    """The training loop's eval loader: ``(images [B,3,S,S], targets, metas)``, no augmentation."""
    from gankd_ray.data.loader import DetectionBatchLoader

    return DetectionBatchLoader.from_dataset(
        data, split, image_size, batch_size, train=False, hflip=False, jitter=0.0, num_workers=num_workers
    )


def _original_batches(data: str, split: str, batch_size: int) -> Iterator[list[tuple[int, Image.Image]]]:
    """The split's ``(image_id, decoded original image)`` in chunks of ``batch_size``, streamed; the split's
    footers are read here, so a missing split fails before any inference. Images are decoded while a chunk is
    fetched, so an undecodable one is a read failure (``_read_checked``), worded as the loader words it."""
    from gankd_ray import storage
    from gankd_ray.data.reader import split_share

    rows = split_share(data, split).rows()
    where = storage.join(data, "parquet", split)

    def chunks() -> Iterator[list[tuple[int, Image.Image]]]:
        while chunk := list(itertools.islice(rows, batch_size)):
            yield [(int(row["image_id"]), _decoded(row, where)) for row in chunk]

    return chunks()


def _decoded(row: dict[str, Any], where: str) -> Image.Image:
    """The row's image as RGB; ``DatasetError`` (the loader's one line) when it does not decode."""
    from gankd_ray.data.records import DatasetError
    from gankd_ray.data.transforms import decode_rgb, undecodable_image

    try:
        return decode_rgb(row["image"])
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for corrupt files
        raise DatasetError(undecodable_image(where, row["image_id"], row["file_name"], err)) from None


def _resized_results(model, loader, device: str) -> list[dict[str, Any]]:
    from gankd_ray.eval import coco_results

    results: list[dict[str, Any]] = []
    for images, _, metas in loader:
        results.extend(coco_results(model.predict_resized(images.to(device), [m["orig_size"] for m in metas]), metas))
    return results


def _scripted_results(model, chunks, device: str) -> list[dict[str, Any]]:
    from gankd_ray.eval import coco_results

    results: list[dict[str, Any]] = []
    for chunk in chunks:
        outputs = run_scripted(model, [to_tensor(image).to(device) for _, image in chunk])
        results.extend(coco_results(outputs, [{"image_id": image_id} for image_id, _ in chunk]))
    return results


def json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN -> None so the line is valid JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
