"""Options more than one command takes, defined once."""

from __future__ import annotations

import argparse


def add_export_options(parser: argparse.ArgumentParser, verb: str) -> None:
    """``--model`` (an export folder) and which of its files to ``verb`` (run, evaluate) instead of student.pt."""
    parser.add_argument(
        "--model", required=True, help="export folder (student.pt, student.ts, student.onnx, card.json)"
    )
    parser.add_argument(
        "--torchscript",
        action="store_true",
        help=f"{verb} student.ts instead of student.pt (TorchScript is code: trusted files only)",
    )
    parser.add_argument(
        "--onnx", action="store_true", help=f"{verb} student.onnx in onnxruntime on the CPU (trusted files only)"
    )
