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
from contextlib import contextmanager, nullcontext
from pathlib import Path

from . import __version__, plot, progress
from .api import analyze, slim
from .atomic import write_atomic
from .errors import SlimError, UsageError
from .lumping.budget import DEFAULT_ROUND_TO
from .lumping.redundancy import METHODS
from .options import TARGETS, check_budget, check_paths
from .report import Report, render_groups


def _shape(text: str) -> tuple[str, tuple[int, ...]]:
    try:
        name, dims = text.rsplit(":", 1)
        return name, tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected name:1x3x224x224, got {text!r}") from None


def _ratios(text: str) -> list[float]:
    """`0.5` or a list `0.3,0.5,0.7` (one model per ratio)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected R or R1,R2,..., got {text!r}") from None
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"repeated ratio in {text!r}")
    return values


def suffixed(path: str | None, ratio: float, several: bool) -> str | None:
    """OUT.onnx -> OUT_r0.3.onnx for each ratio of a list (the path itself for one ratio)."""
    if path is None or not several:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}_r{ratio:g}{p.suffix}"))


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
    budget.add_argument("--ratio", type=_ratios, metavar="R[,R...]",
                        help="fraction of FLOPs (or --target) to remove; a list (0.3,0.5,0.7) "
                        "writes one model per ratio, OUT_r0.3.onnx, ...")
    budget.add_argument("--max-error", type=float,
                        help="largest held-out relative output error accepted")
    budget.add_argument("--max-accuracy-drop", type=float,
                        help="largest held-out accuracy drop accepted (needs labels)")
    budget.add_argument("--min-agreement", type=float, metavar="A",
                        help="smallest held-out top-1 agreement with the original accepted "
                             "(no labels needed)")
    data.add_argument("--target", choices=TARGETS, default="flops",
                      help="what --ratio removes: flops (default), params, or latency "
                      "(each layer timed alone at the widths it may take, cached on disk)")
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
    p.add_argument("--plot", metavar="FILE.png", help="plot kept channels per group (and a "
                   "bound search's fidelity-vs-FLOPs points, or a --ratio list's trade-off); "
                   "needs matplotlib")
    p.add_argument("--inspect", action="store_true",
                   help="print channel groups and freeze reasons; write nothing")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log each phase with its time; tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
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
        if args.output is not None or args.report is not None or args.plot is not None:
            raise UsageError("--inspect writes nothing: drop the output path, --report and "
                             "--plot")
        _, rows = analyze(args.input)
        _print(render_groups(rows))
        return 0
    if args.output is None:
        raise UsageError("an output path is required (or use --inspect)")
    names = [name for name, _ in args.input_shape]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise UsageError(f"--input-shape {twice} given twice: give each input once")
    ratios = args.ratio or [None]
    several = len(ratios) > 1
    for ratio in ratios:  # every ratio checked before the first model is written
        check_budget(args.data, args.holdout, ratio, args.max_error, args.max_accuracy_drop,
                     args.min_agreement)
        check_paths(args.input, suffixed(args.output, ratio, several),
                    suffixed(args.report, ratio, several), plot=args.plot,
                    reads={"--data": args.data, "--holdout": args.holdout})
    if args.plot is not None:
        plot.require(args.plot)
    runs = []
    bar = progress.overall(len(ratios), "ratios") if several else nullcontext(lambda: None)
    with progress.quiet(args.quiet), bar as step:
        for ratio in ratios:
            runs.append((ratio, _slim_one(args, ratio, several, written)))
            step()
    if args.plot is not None:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)  # as for the model, report
        if several:
            plot.write_tradeoff(args.plot, runs)
        else:
            plot.write(args.plot, runs[0][1])
        written.append(args.plot)
    return 0


def _slim_one(args: argparse.Namespace, ratio: float | None, several: bool,
              written: list[str]) -> Report:
    """One slim call; its model and report written, its table printed."""
    output, report = suffixed(args.output, ratio, several), suffixed(args.report, ratio, several)
    result = slim(args.input, output, input_shapes=dict(args.input_shape),
                  tolerance=args.tolerance, data=args.data, holdout=args.holdout,
                  ratio=ratio, max_error=args.max_error,
                  max_accuracy_drop=args.max_accuracy_drop,
                  min_agreement=args.min_agreement, target=args.target,
                  method=args.method, threshold=args.threshold,
                  compensate=not args.no_compensate, sequential_refit=not args.no_refit,
                  batch_size=args.batch_size, max_samples=args.max_samples,
                  round_to=args.round_to, provider=args.provider,
                  latency_batch=args.latency_batch, threads=args.threads)
    written.append(output)
    if report:  # files first: a closed stdout must not cost the report
        try:
            write_atomic(report, json.dumps(result.report.to_json(), indent=2).encode())
        except OSError as exc:
            raise UsageError(f"cannot write --report {report}: {exc.strerror or exc} "
                             f"({output} was written)") from None
        written.append(report)
    if several:
        _print(f"--ratio {ratio:g}: {output}")
    _print(result.report.render())
    return result.report


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
