"""Command line: argument parsing and errors -> one line + exit code; no logic."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .api import analyze, slim
from .errors import SlimError
from .lumping.redundancy import METHODS
from .report import render_groups


def _shape(text: str) -> tuple[str, tuple[int, ...]]:
    try:
        name, dims = text.rsplit(":", 1)
        return name, tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected name:1x3x224x224, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="onnxslim-fr",
        description="Remove redundant channels from an ONNX model and fold them into the "
                    "layers that remain; the result is validated in onnxruntime.")
    p.add_argument("input", help="model to slim (never modified)")
    p.add_argument("output", nargs="?", help="where to write the slimmed model")
    p.add_argument("--report", metavar="FILE", help="write the report as JSON")
    p.add_argument("--input-shape", action="append", type=_shape, default=[],
                   metavar="NAME:DxDxD", help="shape for validation inputs (repeatable)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest relative output error accepted (default 1e-4)")
    data = p.add_argument_group("calibration (functional redundancy)")
    data.add_argument("--data", metavar="FILE", help="calibration inputs (.npz keyed by input "
                      "name, or .npy); enables merging of functionally redundant channels")
    data.add_argument("--holdout", metavar="FILE", help="validation inputs, same formats; an "
                      "optional 'labels' array enables accuracy")
    budget = data.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, help="fraction of FLOPs (or --target) to remove")
    budget.add_argument("--max-error", type=float,
                        help="largest held-out relative output error accepted")
    budget.add_argument("--max-accuracy-drop", type=float,
                        help="largest held-out accuracy drop accepted (needs labels)")
    data.add_argument("--target", choices=("flops", "params"), default="flops")
    data.add_argument("--method", choices=METHODS, default="lfrns")
    data.add_argument("--threshold", type=float, default=0.05,
                      help="lfrns: clustering distance on 1-|corr| (default 0.05)")
    data.add_argument("--no-compensate", action="store_true",
                      help="drop channels without least-squares merge (ablation)")
    data.add_argument("--no-refit", action="store_true",
                      help="one-shot merge: skip the sequential refit against the original "
                      "activations (ablation; faster, less accurate)")
    data.add_argument("--batch-size", type=int, default=64)
    data.add_argument("--max-samples", type=int)
    p.add_argument("--inspect", action="store_true",
                   help="print channel groups and freeze reasons; write nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress; tracebacks")
    p.add_argument("--version", action="version", version=f"onnxslim-fr {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(message)s")
    try:
        return _run(args)
    except SlimError as exc:
        if args.verbose:
            raise
        print(f"onnxslim-fr: error: {exc}", file=sys.stderr)
        return exc.exit_code


def _run(args: argparse.Namespace) -> int:
    if args.inspect:
        _, rows = analyze(args.input)
        print(render_groups(rows))
        return 0
    if args.output is None:
        raise SlimError("an output path is required (or use --inspect)")
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise SlimError("output must differ from input: the input file is never modified")
    result = slim(args.input, args.output, input_shapes=dict(args.input_shape),
                  tolerance=args.tolerance, data=args.data, holdout=args.holdout,
                  ratio=args.ratio, max_error=args.max_error,
                  max_accuracy_drop=args.max_accuracy_drop, target=args.target,
                  method=args.method, threshold=args.threshold,
                  compensate=not args.no_compensate, sequential_refit=not args.no_refit,
                  batch_size=args.batch_size,
                  max_samples=args.max_samples)
    print(result.report.render())
    if args.report:
        Path(args.report).write_text(json.dumps(result.report.to_json(), indent=2))
    return 0
