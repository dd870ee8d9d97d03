"""``gankd-predict``: detect objects in image files with an exported student (student.pt, weights only).

student.ts is TorchScript, and TorchScript is code that runs with your rights (it can read and write
files): use --torchscript only with model folders you trust. student.pt is safe with a folder from anyone.
--onnx runs student.onnx in onnxruntime (CPU) on the image resized to the model's S x S; onnxruntime
parses the file with native code, so --onnx is for trusted model folders too.

Writes OUT/detections.json (COCO results: image_id = position in --images from 1, file_name,
category_id, category_name, bbox [x, y, w, h], score) and OUT/<image stem>.png with the boxes drawn.

Example:
    gankd-predict --model runs/default/best --images photos/*.jpg --out predictions \
        [--score-thresh 0.3] [--torchscript | --onnx]
"""

from __future__ import annotations

import argparse

from gankd_ray.cli import entry
from gankd_ray.cli.options import add_export_options
from gankd_ray.data.validate import DEFAULT_MAX_PIXELS
from gankd_ray.errors import InputError, UserError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_options(parser, "run")
    parser.add_argument("--images", required=True, nargs="+", help="image files")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--score-thresh", type=float, default=0.3, help="keep detections scoring at least this")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse larger images, checked before decoding (default {DEFAULT_MAX_PIXELS})",
    )
    # student.pt is the default now; --eager (which asked for it) is still accepted so old scripts run.
    parser.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from gankd_ray.export import load_export, predict_pictures, read_pictures

    args = parse_args(argv)
    torchscript = args.torchscript and not args.eager
    if torchscript and args.onnx:
        raise InputError("choose one of --torchscript and --onnx")
    try:
        export = load_export(args.model, torchscript=torchscript, onnx=args.onnx)
    except UserError as err:
        raise err.under("--model") from None
    try:
        pictures = read_pictures(args.images, args.max_pixels)
    except UserError as err:
        raise err.under("--images") from None
    summary = predict_pictures(export, pictures, args.out, args.score_thresh)
    print(f"{summary['count']} detections in {len(summary['images'])} images -> {summary['detections']}")
    return 0


console_script = entry(main)
