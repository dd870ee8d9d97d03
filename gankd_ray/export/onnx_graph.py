"""``student.onnx``: an exported student's network as an ONNX graph, and running it with onnxruntime.

The graph is the part of the detector with fixed shapes: normalisation, backbone (+ adapters), SSD head.
The rest (box decoding, score threshold, top-k, per-class NMS, rescaling to the original image) has
data-dependent shapes, so it stays outside: :meth:`SSDDetector.decode`, the same code as the eager path.

Graph (opset 20; ``B`` is a dynamic axis, ``S`` = the card's ``image_size``, ``K`` = its ``num_classes``,
``A`` = anchors, 2420 at S = 160):

=================  ===================  ==============================================================
name               shape (float32)      meaning
=================  ===================  ==============================================================
``images``         ``[B, 3, S, S]``     input: RGB in [0, 1], the picture resized to ``S x S`` (bilinear,
                                        aspect ratio not kept, no padding); ImageNet mean/std
                                        normalisation is inside the graph
``cls_logits``     ``[B, A, K + 1]``    per-anchor class logits; softmax over the last axis gives scores;
                                        index 0 is background, index ``k`` is category id ``k``
``bbox_regression`` ``[B, A, 4]``       per-anchor box offsets ``(dx, dy, dw, dh)`` against the anchor,
                                        torchvision's ``BoxCoder`` with weights ``(10, 10, 5, 5)``
``anchors``        ``[A, 4]``           the default boxes, ``x1, y1, x2, y2`` in pixels of the S x S input
=================  ===================  ==============================================================

Detections = decode boxes, clip to ``[0, S]``, per class keep ``score > score_thresh``, the best
``topk_candidates``, NMS at IoU ``nms_thresh`` within each class, the best ``detections_per_img``
over all classes, scale ``x`` by ``width / S`` and ``y`` by ``height / S``. The values are in the
graph's metadata (``metadata_props``) for deployers.

ONNX is a graph, not code, but onnxruntime parses it with native code: trusted files only.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from gankd_ray.errors import InputError
from gankd_ray.models.detector import SSDDetector

ONNX_FILE = "student.onnx"
INPUT_NAME = "images"
OUTPUT_NAMES = ("cls_logits", "bbox_regression", "anchors")
OPSET = 20  # torch 2.14 dynamo exporter's default (no version conversion); ONNX Runtime >= 1.17 runs it


class OnnxUnavailable(InputError):
    """``onnx`` / ``onnxscript`` / ``onnxruntime`` (the ``export`` extra) is not installed.

    A user error (exit 2): ``--onnx`` asks for what this environment lacks, and the message says what to
    install. ``export_model`` checks :func:`onnx_export_available` first and exports without the graph."""


def onnx_export_available() -> bool:
    """Whether the ``export`` extra's exporter side (``onnx``, ``onnxscript``) is importable."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxscript"))


class DetectorGraph(nn.Module):
    """The exported part of ``detector``: ``images [B,3,S,S] in [0,1] -> (cls_logits, bbox_regression, anchors)``."""

    def __init__(self, detector: SSDDetector) -> None:
        super().__init__()
        self.detector = detector.eval()
        size = detector.image_size
        with torch.no_grad():  # one forward gives the real level shapes the anchors are laid on
            levels = list(detector.extract(detector.normalize(torch.zeros(1, 3, size, size))).values())
        # Not named "anchors": the buffer becomes an initializer, whose name must differ from the output's.
        self.register_buffer("default_boxes", detector.anchors(levels, size).clone(), persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        levels = list(self.detector.extract(self.detector.normalize(images)).values())
        outputs = self.detector._run_head(levels, None)  # the eager path's head call (float32 outputs)
        # A fresh tensor: an output that is a buffer itself would be an initializer, not a node's output.
        return outputs["cls_logits"], outputs["bbox_regression"], self.default_boxes + 0.0


def export_onnx(detector: SSDDetector, file: str | Path) -> None:
    """Write ``detector``'s graph (see the module docstring) to the local ``file``, checked by ``onnx``.

    torch 2.14's default exporter (``dynamo=True``, torch.export + onnxscript) is used. The legacy
    TorchScript-based one (``dynamo=False``) still gives an equivalent graph (opset 17, 2 s instead of about
    15 s here) but is deprecated along with TorchScript and warns; the network has no data-dependent control
    flow, so torch.export captures it whole, the batch axis symbolic.
    """
    if not onnx_export_available():
        raise OnnxUnavailable("ONNX export needs onnx and onnxscript: pip install 'gankd-ray[export]'")
    import onnx

    graph = DetectorGraph(detector).eval()
    size = detector.image_size
    example = torch.zeros(2, 3, size, size)  # batch 2: a batch of 1 would be specialised to a constant
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(
            graph,
            (example,),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"images": {0: batch}},
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    model = program.model_proto
    onnx.helper.set_model_props(model, postprocess_metadata(detector))
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(file))


def postprocess_metadata(detector: SSDDetector) -> dict[str, str]:
    """The post-processing settings a deployer needs, as the graph's ``metadata_props``."""
    return {
        "image_size": str(detector.image_size),
        "num_classes": str(detector.config.num_classes),
        "score_thresh": str(detector.score_thresh),
        "nms_thresh": str(detector.nms_thresh),
        "topk_candidates": str(detector.topk_candidates),
        "detections_per_img": str(detector.detections_per_img),
        "box_coder_weights": ",".join(str(w) for w in detector.box_coder.weights),
        "input": "images float32 [B,3,S,S] RGB in [0,1], resized to SxS bilinear; normalised inside",
    }


class OnnxDetector:
    """``student.onnx`` in onnxruntime (CPU) followed by ``detector.decode``: the eager post-processing."""

    def __init__(self, model_bytes: bytes, detector: SSDDetector, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise OnnxUnavailable("needs onnxruntime: pip install 'gankd-ray[export]'", flag="--onnx") from None
        options = ort.SessionOptions()
        # torch's thread budget (OMP_NUM_THREADS / set_num_threads), not one thread per core.
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        self.detector = detector

    def network(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """``images [B,3,S,S]`` in [0,1] -> (``{"cls_logits", "bbox_regression"}``, anchors) from the graph."""
        logits, regression, anchors = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.cpu().numpy()})
        head = {"cls_logits": torch.from_numpy(logits), "bbox_regression": torch.from_numpy(regression)}
        return head, torch.from_numpy(anchors)

    def predict_resized(self, images: Tensor, orig_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """``SSDDetector.predict_resized`` with the network in onnxruntime: ``images [B,3,S,S]`` in [0,1] ->
        detections in original coordinates."""
        head, anchors = self.network(images)
        return self.detector.decode(head, anchors, images.shape[-2:], orig_sizes)
