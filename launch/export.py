#!/usr/bin/env python
"""Export one trial of a finished search: student.pt, student.ts and card.json, as the search exports its best.

Example:
    python launch/export.py --experiment runs/default --out exports/best            # best healthy trial
    python launch/export.py --experiment runs/default --out exports/t3 --trial 1a2b3_00003
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gankd_ray.tune.inference import InferenceError, export_trial  # noqa: E402

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="search experiment folder or URI (<storage>/<name>)")
    parser.add_argument("--out", required=True, help="export folder to write (replaced whole)")
    parser.add_argument("--trial", help="trial id (default: the best healthy trial of trials.parquet)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out, card = export_trial(args.experiment, args.out, args.trial)
    except InferenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"exported trial {card['trial_id']} (val mAP {card.get('val_map')}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
