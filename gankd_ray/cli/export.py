"""``gankd-export``: export one trial of a finished search (student.pt, student.ts, student.onnx when the
``export`` extra is installed, card.json), as the search exports its best.

Example:
    gankd-export --experiment runs/default --out exports/best            # best healthy trial
    gankd-export --experiment runs/default --out exports/t3 --trial 1a2b3_00003
"""

from __future__ import annotations

import argparse

from gankd_ray.cli import entry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="search experiment folder or URI (<storage>/<name>)")
    parser.add_argument("--out", required=True, help="export folder to write (replaced whole)")
    parser.add_argument("--trial", help="trial id (default: the best healthy trial of trials.parquet)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from gankd_ray.export import export_trial

    args = parse_args(argv)
    out, card = export_trial(args.experiment, args.out, args.trial)  # its errors name the experiment or the trial
    print(f"exported trial {card['trial_id']} (val mAP {card.get('val_map')}) to {out}")
    return 0


console_script = entry(main)
