#!/usr/bin/env python
"""COCO mAP / AP50 of an exported student on a split of a prepared dataset.

student.pt is evaluated on exactly the path of the search's validation (same resize, same numbers on
val); --torchscript evaluates student.ts on the original images instead (close, not identical).
TorchScript is code that runs with your rights: use --torchscript only with model folders you trust.
--onnx evaluates student.onnx in onnxruntime (CPU) on the student.pt path's resized images, post-processed
by student.pt's own code: the same figure as student.pt to float rounding. onnxruntime parses the file
with native code: use --onnx only with model folders you trust too.

Example:
    python launch/evaluate.py --model runs/default/best --data data/synthetic [--split test] [--torchscript | --onnx]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gankd_ray.tune.inference import InferenceError, evaluate_export, json_safe  # noqa: E402

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export folder (student.pt, student.ts, student.onnx, card.json)")
    parser.add_argument("--data", required=True, help="prepared dataset folder or URI")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--torchscript", action="store_true",
                        help="evaluate student.ts instead of student.pt (TorchScript is code: trusted files only)")
    parser.add_argument("--onnx", action="store_true",
                        help="evaluate student.onnx in onnxruntime on the CPU (trusted files only)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0, help="background image decoding processes")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        metrics = evaluate_export(
            args.model, args.data, args.split, torchscript=args.torchscript, onnx=args.onnx,
            batch_size=args.batch_size, num_workers=args.workers, device=args.device,
        )
    except InferenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{metrics['file']} on {args.split} ({int(metrics['num_images'])} images)")
    print(f"map: {metrics['map']:.4f}")
    print(f"ap50: {metrics['ap50']:.4f}")
    print(json.dumps(json_safe(metrics)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
