"""Coverage of real exporter patterns: how much of each model onnxslim-fr can slim, and how well.

For every model in ``models/`` (and, when ``rapidocr-onnxruntime`` is installed, PaddleOCR's
v4 detector, recogniser and direction classifier, calibrated and tested on crops of
``skimage.data.page()``; those files are never copied here), using only the public API
(``onnxslim_fr.analyze`` and ``onnxslim_fr.slim``), prints:

* ``prod ch``: output channels of every Conv / ConvTranspose / Gemm / MatMul with a constant
  weight (an initializer or a ``Constant`` node, through Identity/Cast; depthwise Convs
  carry their input's channels and are not counted), found in the graph
  independently of the library, except producers whose channels reach a graph output
  without passing another producer or a recurrent layer (a classifier's or a vocabulary's
  output channels, a detector's map);
* ``unfrozen``: the share of those channels in groups the analysis leaves unfrozen;
  producers the analysis puts in no group count as frozen ("in no group: <op>");
* ``top freeze reasons``: reasons by channel count, node and tensor names stripped;
* ``exact``: ``slim(path)`` as a new user runs it (change in the report's producer channels,
  max relative error),
  or the one line it refused with (``refused``) or the exception it raised (``CRASH``);
* ``calibrated``: ``slim(path, data=calib, holdout=test, ratio=0.2, input_shapes=<the
  data's shapes at batch 1>)``: kept FLOPs and, on the test split, the task metric before ->
  after and the agreement with the original (top-1 for classifiers, identical greedy-CTC
  strings for recognisers, F1 of the binarized map against the original's for detectors).

Run from the repository root (no torch needed)::

    python tools/bench_coverage.py [--models NAME ...] [--no-rapidocr] [--ratio 0.2]

Full error lines and per-model timings follow the table.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rapidocr_data
from fixtures import MODELS, agreement, fixture_for, load_split, run, score

from onnxslim_fr import analyze, errors, slim

PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
STOPS = (*PRODUCERS, "LSTM", "GRU", "RNN")
PASS_THROUGH = ("Identity", "Cast")


@dataclass
class Result:
    name: str
    producer_channels: int = 0
    unfrozen: int = 0
    reasons: Counter = field(default_factory=Counter)
    exact: str = ""
    calibrated: str = ""
    crashes: int = 0
    refusals: int = 0
    details: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------------ coverage


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node tensors, also through Identity / Cast."""
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(a.t)
        elif node.op_type in PASS_THROUGH and node.input[0] in out:
            out[node.output[0]] = out[node.input[0]]
    return out


def producer_channels(model: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """Node name -> (op, output channels) for every linear op with a constant weight."""
    consts = _constants(model)
    found = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type not in PRODUCERS or len(node.input) < 2:
            continue
        w = consts.get(node.input[1])
        if w is None or w.ndim < 2:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv" and attrs.get("group", 1) == w.shape[0] > 1:
            continue  # depthwise: carries its input's channels, produces none of its own
        if node.op_type == "Conv":
            ch = w.shape[0]
        elif node.op_type == "ConvTranspose":
            ch = w.shape[1] * attrs.get("group", 1)
        elif node.op_type == "Gemm":
            ch = w.shape[0] if attrs.get("transB", 0) else w.shape[1]
        else:
            ch = w.shape[-1]
        found[node.name or f"#{i}"] = (node.op_type, int(ch))
    return found


def output_producers(model: onnx.ModelProto, names: set[str]) -> set[str]:
    """Producers whose output reaches a graph output without passing another producer."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    outputs = {o.name for o in model.graph.output}
    hits = set()
    for node in model.graph.node:
        if node.name not in names:
            continue
        todo, seen = list(node.output), set()
        while todo:
            t = todo.pop()
            if t in outputs:
                hits.add(node.name)
                break
            for user in consumers.get(t, []):
                if user.op_type not in STOPS and user.name not in seen:
                    seen.add(user.name)
                    todo.extend(user.output)
    return hits


def normalize_reason(reason: str) -> str:
    """A freeze reason without node and tensor names, so equal causes add up."""
    r = re.sub(r" at node .*$", "", reason)
    r = re.sub(r"reaches graph output .*", "reaches graph output", r)
    r = re.sub(r"initializer .* shared with node .*", "initializer shared with another node", r)
    r = re.sub(r"read inside the subgraph of (\S+) node .*", r"read inside a subgraph of \1", r)
    r = re.sub(r"(unknown rank|dynamic dimension \d+|flattened features) of .*", r"\1", r)
    r = re.sub(r"parameter \S+ is not constant", "parameter is not constant", r)
    return r


def coverage(model: onnx.ModelProto, result: Result) -> None:
    prods = producer_channels(model)
    at_output = output_producers(model, set(prods))
    groups, rows = analyze(model)
    grouped: set[str] = set()
    for row in rows:
        names = row["producers"]
        grouped.update(names)
        frozen = row["frozen"]
        if not names or any(p in at_output for p in names) or \
                (frozen or "").startswith("reaches graph output"):
            continue
        # a group repeats in a producer's output once per piece of a grouped Conv
        channels = row["size"] * (sum(
            sum(s.group == row["id"] for s in groups.layouts[m.tensor].segments)
            for m in groups.groups[row["id"]].members if m.role.name == "PRODUCER")
            or len(names))
        result.producer_channels += channels
        if frozen is None:
            result.unfrozen += channels
        else:
            result.reasons[normalize_reason(frozen)] += channels
    for name, (op, ch) in prods.items():
        if name not in grouped and name not in at_output:
            result.producer_channels += ch
            result.reasons[f"in no group: {op}"] += ch


# ---------------------------------------------------------------------------------- runs


def _error(exc: BaseException, result: Result, what: str) -> str:
    """Table cell for a failed run; counts it as a refusal or a crash."""
    line = " ".join(str(exc).split()) or type(exc).__name__
    internal = getattr(errors, "InternalError", ())  # exit 3: a bug, so a crash
    if isinstance(exc, errors.SlimError) and not isinstance(exc, internal):
        result.refusals += 1
        result.details.append(f"{what} refused ({type(exc).__name__}): {line}")
        return f"refused: {line[:44]}"
    result.crashes += 1
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "onnxslim_fr" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].name}"
    if ours[-1] is not frames[-1]:
        where += f" -> {Path(frames[-1].filename).name}:{frames[-1].lineno}"
    result.details.append(f"{what} CRASH {type(exc).__name__}: {line} [{where}]")
    return f"CRASH {type(exc).__name__}: {line[:34]}"


def exact(model: onnx.ModelProto, result: Result, shapes: dict | None) -> None:
    try:
        rep = slim(model, latency_runs=0).report
        result.exact = (f"{rep.after.channels - rep.before.channels:+d} ch, "
                        f"err {rep.max_rel_error:.0e}")
    except Exception as exc:  # a benchmark shows every failure, it never stops on one
        result.exact = _error(exc, result, "exact")
        if shapes:  # would the exact pass itself work with inputs the model can run?
            try:
                rep = slim(model, latency_runs=0, input_shapes=shapes).report
                result.details.append(f"exact with input_shapes={shapes}: "
                                      f"{rep.after.channels - rep.before.channels:+d} ch, err "
                                      f"{rep.max_rel_error:.0e}")
            except Exception as again:
                result.details.append(f"exact with input_shapes={shapes} also fails: "
                                      f"{type(again).__name__}: {again}")


def calibrated(model: onnx.ModelProto, result: Result, metric: str, calib: dict,
               test: tuple[dict, dict], ratio: float) -> None:
    feeds, targets = test
    shapes = {k: (1, *v.shape[1:]) for k, v in feeds.items()}
    try:
        res = slim(model, data=calib, holdout=feeds, ratio=ratio, input_shapes=shapes,
                   latency_runs=0)
        before, after = run(model, feeds), run(res.model, feeds)
    except Exception as exc:
        result.calibrated = _error(exc, result, f"calibrated {ratio}")
        return
    rep = res.report
    kept = f"{rep.after.flops / rep.before.flops:.2f}" if rep.before.flops else "n/a"
    q0, q1 = score(metric, before, targets), score(metric, after, targets)
    task = f"{q0:.1%}->{q1:.1%} " if q0 is not None else ""
    result.calibrated = f"{kept} {task}agree {agreement(metric, before, after):.1%}"
    result.details.extend(f"calibrated note: {n}" for n in rep.notes)


def dynamic_shapes(model: onnx.ModelProto, feeds: dict) -> dict | None:
    """The data's shapes at batch 1 when an input has a dynamic non-batch dimension."""
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if inp.name in feeds and any(not d.HasField("dim_value") for d in dims[1:]):
            return {k: (1, *v.shape[1:]) for k, v in feeds.items()}
    return None


def bench_one(name: str, model: onnx.ModelProto, metric: str, calib: dict | None,
              test: tuple[dict, dict], ratio: float) -> Result:
    result, start = Result(name), time.time()
    try:
        coverage(model, result)
    except Exception as exc:
        _error(exc, result, "analyze")
    exact(model, result, dynamic_shapes(model, test[0]))
    if calib is None:
        result.calibrated = "no calibration data in models/"
    else:
        calibrated(model, result, metric, calib, test, ratio)
    result.seconds = time.time() - start
    return result


# ------------------------------------------------------------------------------- driver


def shipped_jobs(filters: list[str] | None) -> list[tuple[str, onnx.ModelProto, str, dict, tuple]]:
    jobs = []
    for path in sorted(MODELS.glob("*.onnx")):
        fx = fixture_for(path.name)
        if filters and not any(f in path.name for f in filters):
            continue
        model = onnx.load(str(path))
        if fx is None:
            jobs.append((path.name, model, "top1", None, ({}, {})))
            continue
        calib, _ = load_split(fx.data_path("calib"), model)
        jobs.append((path.name, model, fx.metric, calib,
                     load_split(fx.data_path("test"), model)))
    return jobs


def rapidocr_jobs(filters: list[str] | None) -> list[tuple[str, onnx.ModelProto, str, dict, tuple]]:
    paths = rapidocr_data.model_paths()
    if not paths:
        print("rapidocr-onnxruntime not installed: no PaddleOCR rows\n")
        return []
    try:
        sets = rapidocr_data.datasets(paths)
    except ImportError as exc:  # scikit-image (the page) or scipy missing
        print(f"no PaddleOCR rows: {exc} (pip install scikit-image)\n")
        return []
    jobs = []
    for key, (calib, test) in sets.items():
        if filters and not any(f in key for f in filters):
            continue
        targets = {"labels": test["labels"]} if "labels" in test else {}
        jobs.append((f"{key} (rapidocr)", onnx.load(str(paths[key])),
                     rapidocr_data.METRICS[key], {"x": calib["x"]}, ({"x": test["x"]}, targets)))
    return jobs


def render(results: list[Result], ratio: float) -> str:
    head = (f"{'model':<28} {'prod ch':>7} {'unfrozen':>8}  {'exact':<42} "
            f"{'calibrated ratio ' + str(ratio) + ' (kept FLOPs, task, agreement)':<52} "
            "top freeze reasons (channels)")
    lines = [head, "-" * len(head)]
    for r in results:
        share = f"{r.unfrozen / r.producer_channels:.0%}" if r.producer_channels else "-"
        reasons = "; ".join(f"{k} ({v})" for k, v in r.reasons.most_common(3))
        lines.append(f"{r.name:<28} {r.producer_channels:>7} {share:>8}  {r.exact:<42} "
                     f"{r.calibrated:<52} {reasons}")
    total = sum(r.producer_channels for r in results)
    unfrozen = sum(r.unfrozen for r in results)
    shares = [r.unfrozen / r.producer_channels for r in results if r.producer_channels]
    lines += ["", f"models: {len(results)}; producer channels {total}, unfrozen "
              f"{unfrozen / max(total, 1):.1%} overall, median per model "
              f"{float(np.median(shares)) if shares else 0:.1%}; crashes "
              f"{sum(r.crashes for r in results)}, refusals {sum(r.refusals for r in results)}"
              f" (exact + calibrated runs)"]
    reasons = sum((r.reasons for r in results), Counter())
    lines += ["", "freeze reasons over all models (channels):"]
    lines += [f"  {v:>6}  {k}" for k, v in reasons.most_common()]
    lines += ["", "details:"]
    for r in results:
        lines.append(f"  {r.name} ({r.seconds:.0f} s)")
        lines += [f"    {d}" for d in r.details]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", help="only models whose name contains one of these")
    parser.add_argument("--no-rapidocr", action="store_true", help="skip the PaddleOCR rows")
    parser.add_argument("--ratio", type=float, default=0.2, help="FLOPs fraction to remove")
    args = parser.parse_args()
    jobs = shipped_jobs(args.models)
    if not args.no_rapidocr:
        jobs += rapidocr_jobs(args.models)
    results = []
    for name, model, metric, calib, test in jobs:
        results.append(bench_one(name, model, metric, calib, test, args.ratio))
        print(f"done {name} ({results[-1].seconds:.0f} s)", file=sys.stderr, flush=True)
    print(render(results, args.ratio))


if __name__ == "__main__":
    main()
