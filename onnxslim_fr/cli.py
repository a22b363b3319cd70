"""Command line: argument parsing and errors -> one line + exit code; no logic.

Every way out prints at most one line on stderr: a refusal (exit 2) or validation failure
(exit 1) says what is wrong, a bug says so (exit 3, the traceback only with -v), an
interrupt says what was written (130 SIGINT, 143 SIGTERM), a closed stdout is silent (141).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from . import __version__
from .api import analyze, slim
from .atomic import write_atomic
from .errors import SlimError, UsageError
from .lumping.budget import DEFAULT_ROUND_TO
from .lumping.redundancy import METHODS
from .options import check_paths
from .report import render_groups


def _shape(text: str) -> tuple[str, tuple[int, ...]]:
    try:
        name, dims = text.rsplit(":", 1)
        return name, tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected name:1x3x224x224, got {text!r}") from None


EXIT_INTERNAL, EXIT_PIPE = 3, 141
EPILOG = """exit codes: 0 written (exact, or measured in calibrated mode); 1 validation failed,
nothing written; 2 refused: one line says what to change; 3 internal error (a bug: rerun
with -v for the traceback); 130 interrupted (143 on SIGTERM). The input is never modified."""


class _Parser(argparse.ArgumentParser):
    """Usage mistakes become a UsageError: one line and exit 2, not usage text + SystemExit."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="onnxslim-fr", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Remove redundant channels from an ONNX model and fold them into the "
                    "layers that remain; the result is validated in onnxruntime.")
    p.add_argument("input", help="model to slim (never modified)")
    p.add_argument("output", nargs="?", help="where to write the slimmed model")
    p.add_argument("--report", metavar="FILE", help="write the report as JSON")
    p.add_argument("--input-shape", action="append", type=_shape, default=[],
                   metavar="NAME:DxDxD", help="shape for validation inputs (repeatable)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest relative output error accepted (default by the model's "
                   "float type: 1e-4, float16 2e-3, bfloat16 2e-2)")
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
    budget.add_argument("--min-agreement", type=float, metavar="A",
                        help="smallest held-out top-1 agreement with the original accepted "
                             "(no labels needed)")
    data.add_argument("--target", choices=("flops", "params"), default="flops")
    data.add_argument("--method", choices=METHODS, default="lfrns")
    data.add_argument("--threshold", type=float, default=0.05,
                      help="lfrns: clustering distance on 1-|corr| (default 0.05)")
    data.add_argument("--no-compensate", action="store_true",
                      help="drop channels without least-squares merge (ablation)")
    data.add_argument("--no-refit", action="store_true",
                      help="one-shot merge: skip the sequential refit against the original "
                      "activations (ablation; faster, less accurate)")
    data.add_argument("--round-to", type=int, default=DEFAULT_ROUND_TO, metavar="N",
                      help="kept channel counts are multiples of N, which CPU kernels run "
                      f"fastest (default {DEFAULT_ROUND_TO}; 1: any count)")
    data.add_argument("--batch-size", type=int, default=64)
    data.add_argument("--max-samples", type=int)
    run = p.add_argument_group("onnxruntime")
    run.add_argument("--provider", metavar="NAME", help="execution provider for calibration, "
                     "refit, validation and latency, e.g. CUDA (default CPU)")
    run.add_argument("--latency-batch", type=int, default=1, metavar="B",
                     help="batch size of the latency measurement (default 1)")
    run.add_argument("--threads", type=int, metavar="N", help="intra-op threads of the "
                     "latency measurement (default: every CPU this process may use)")
    p.add_argument("--inspect", action="store_true",
                   help="print channel groups and freeze reasons; write nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress; tracebacks")
    p.add_argument("--version", action="version", version=f"onnxslim-fr {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    written: list[str] = []
    args = None
    with _sigterm_as_interrupt():
        try:
            args = parser().parse_args(argv)
            _log_setup(args.verbose)
            return _run(args, written)
        except SystemExit as exc:  # --help / --version
            return exc.code if isinstance(exc.code, int) else 0
        except KeyboardInterrupt as exc:
            _say(f"interrupted; {_written(written)}")
            return 128 + getattr(exc, "signum", signal.SIGINT)
        except BrokenPipeError:  # stdout closed early (`--inspect | head`): not an error
            _silence_stdout()
            return EXIT_PIPE
        except SlimError as exc:
            _say(f"error: {exc}", verbose=getattr(args, "verbose", False))
            return exc.exit_code
        except MemoryError:
            _say("error: out of memory (try a smaller --batch-size or --max-samples); "
                 "nothing written")
            return 2
        except Exception as exc:
            _say(f"internal error: {type(exc).__name__}: {exc} ({_written(written)}; rerun "
                 "with -v for the traceback)", verbose=getattr(args, "verbose", False))
            return EXIT_INTERNAL


def _run(args: argparse.Namespace, written: list[str]) -> int:
    if args.inspect:
        if args.output is not None or args.report is not None:
            raise UsageError("--inspect writes nothing: drop the output path and --report")
        _, rows = analyze(args.input)
        _print(render_groups(rows))
        return 0
    if args.output is None:
        raise UsageError("an output path is required (or use --inspect)")
    check_paths(args.input, args.output, args.report)
    result = slim(args.input, args.output, input_shapes=dict(args.input_shape),
                  tolerance=args.tolerance, data=args.data, holdout=args.holdout,
                  ratio=args.ratio, max_error=args.max_error,
                  max_accuracy_drop=args.max_accuracy_drop,
                  min_agreement=args.min_agreement, target=args.target,
                  method=args.method, threshold=args.threshold,
                  compensate=not args.no_compensate, sequential_refit=not args.no_refit,
                  batch_size=args.batch_size, max_samples=args.max_samples,
                  round_to=args.round_to, provider=args.provider,
                  latency_batch=args.latency_batch, threads=args.threads)
    written.append(args.output)
    if args.report:  # files first: a closed stdout must not cost the report
        try:
            write_atomic(args.report, json.dumps(result.report.to_json(), indent=2).encode())
        except OSError as exc:
            raise UsageError(f"cannot write --report {args.report}: {exc.strerror or exc} "
                             f"({args.output} was written)") from None
        written.append(args.report)
    _print(result.report.render())
    return 0


class _Interrupted(KeyboardInterrupt):
    """SIGTERM, raised where the run is: it unwinds like Ctrl-C (temporary files vanish,
    one line is printed) and exits 128 + signum as shells expect."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise _Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _log_setup(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(message)s")
    logging.captureWarnings(True)  # library warnings (numpy, sklearn) are noise unless -v
    logging.getLogger("py.warnings").setLevel(logging.WARNING if verbose else logging.ERROR)


def _print(text: str) -> None:
    print(text)
    sys.stdout.flush()  # a closed pipe fails here, inside main, not at interpreter exit


def _written(paths: list[str]) -> str:
    return f"{' and '.join(paths)} written" if paths else "nothing written"


def _say(line: str, verbose: bool = False) -> None:
    """One line on stderr (newlines in a message are folded); with -v the traceback first."""
    if verbose:
        traceback.print_exc()
    print(f"onnxslim-fr: {' '.join(line.split())}", file=sys.stderr)


def _silence_stdout() -> None:
    """Python's recipe: point stdout at devnull so the final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor
        pass
