"""``gankd-evaluate``: COCO mAP / AP50 of an exported student on a split of a prepared dataset.

student.pt is evaluated on exactly the path of the search's validation (same resize, same numbers on
val); --torchscript evaluates student.ts on the original images instead (close, not identical).
TorchScript is code that runs with your rights: use --torchscript only with model folders you trust.
--onnx evaluates student.onnx in onnxruntime (CPU) on the student.pt path's resized images, post-processed
by student.pt's own code: the same figure as student.pt to float rounding. onnxruntime parses the file
with native code: use --onnx only with model folders you trust too.

Example:
    gankd-evaluate --model runs/default/best --data data/synthetic [--split test] [--torchscript | --onnx]
"""

from __future__ import annotations

import argparse
import json

from gankd_ray.cli import entry
from gankd_ray.cli.options import add_export_options
from gankd_ray.errors import InputError, UserError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_options(parser, "evaluate")
    parser.add_argument("--data", required=True, help="prepared dataset folder or URI")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0, help="background image decoding processes")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from gankd_ray.export import evaluate_loaded, json_safe, load_export

    args = parse_args(argv)
    if args.torchscript and args.onnx:
        raise InputError("choose one of --torchscript and --onnx")
    try:
        export = load_export(args.model, torchscript=args.torchscript, device=args.device, onnx=args.onnx)
    except UserError as err:
        raise err.under("--model") from None
    try:
        metrics = evaluate_loaded(
            export, args.data, args.split, batch_size=args.batch_size, num_workers=args.workers, device=args.device
        )
    except UserError as err:
        raise err.under("--data") from None
    print(f"{metrics['file']} on {args.split} ({int(metrics['num_images'])} images)")
    print(f"map: {metrics['map']:.4f}")
    print(f"ap50: {metrics['ap50']:.4f}")
    print(json.dumps(json_safe(metrics)))
    return 0


console_script = entry(main)
