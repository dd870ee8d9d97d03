"""``prepare_data`` command line: one subcommand per registered source, the same output layout for all.

``main`` raises ``DatasetError`` on invalid input, which ``gankd_ray.cli.run`` (``launch/prepare_data.py``,
``gankd-prepare-data``) turns into exit status 2 and one ``error:`` line on stderr naming the file and id;
no partial output folder is left behind (SIGTERM cleans up as Ctrl-C does; exit status 143).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from gankd_ray.data.records import Rejections
from gankd_ray.data.sources import available_sources, get_source
from gankd_ray.data.validate import DEFAULT_MAX_PIXELS
from gankd_ray.data.writer import ROWS_PER_SHARD, check_output_dir, output_path, stderr_log, write_dataset

MESSAGES_SHOWN = 10  # dropped items listed on stderr with --drop-invalid; the rest are only counted


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert a detection dataset into the prepared format (COCO json + images + parquet shards).",
    )
    subparsers = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for name in available_sources():
        source = get_source(name)
        sub = subparsers.add_parser(name, help=source.help, description=source.help)
        source.add_arguments(sub)
        _add_common_arguments(sub)
    return parser


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (created; must be absent or empty)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a --out folder holding a prepared dataset (other non-empty folders are refused)",
    )
    parser.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse images of more pixels, checked before decoding (default {DEFAULT_MAX_PIXELS})",
    )
    parser.add_argument(
        "--drop-invalid", action="store_true", help="drop invalid images/annotations and report how many"
    )
    parser.add_argument(
        "--rows-per-shard",
        type=_positive_int,
        default=ROWS_PER_SHARD,
        help=f"rows per parquet file (default {ROWS_PER_SHARD})",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rejections = Rejections(drop_invalid=args.drop_invalid)
    with _terminate_cleanly():
        check_output_dir(output_path(args.out), args.overwrite)
        data = get_source(args.source).load(args, rejections)
        # Progress goes to stdout: on invalid input, stderr holds the one error line and nothing else.
        info = write_dataset(
            args.out,
            data,
            rejections,
            overwrite=args.overwrite,
            rows_per_shard=args.rows_per_shard,
            log=stdout_log,
            max_pixels=args.max_pixels,
        )
    for message in rejections.messages[:MESSAGES_SHOWN]:
        stderr_log(f"dropped: {message}")
    print(summary_line(args.out, info))
    return 0


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """SIGTERM (``kill``, a batch scheduler) unwinds like Ctrl-C, so the writer removes its staging folder."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def exit_on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stdout_log(message: str) -> None:
    print(message, flush=True)


def summary_line(out: str, info: dict[str, Any]) -> str:
    """``prepared <source> at <out>: 5 classes; train 512 images (1800 boxes), ...; dropped 0 ...``."""
    splits = ", ".join(f"{name} {c['images']} images ({c['boxes']} boxes)" for name, c in info["splits"].items())
    dropped = info["dropped"]
    return (
        f"prepared {info['source']} at {out}: {len(info['classes'])} classes; {splits}; "
        f"dropped {dropped['images']} invalid images and {dropped['annotations']} invalid annotations"
    )
