"""The calibrated pass: statistics, redundancy plans within a budget, sequential refit.

It runs on the model exact lumping left, so what it measures is only what calibration
adds. A budget is a cost ratio (met by allocation) or a bound on a measured fidelity
(met by bisection on the kept cost). A model with nothing to calibrate comes back as it
was, with a note that says why, rather than an error: the user asked for a smaller model
and got the smallest correct one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import onnx

from . import calibrate, latency_table, progress, refit, report, rewrite, validate
from .channels import GroupSet, build_groups
from .channels.handlers import QUANTIZED_OPS
from .errors import BadDataError
from .graph import Graph
from .lumping import redundancy
from .lumping.plan import Plan, methods_by_producer
from .probe import OutputErrorProbe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """Exactly one is set: a cost ratio to remove, or a bound on measured fidelity."""

    ratio: float | None = None
    max_error: float | None = None
    max_accuracy_drop: float | None = None
    min_agreement: float | None = None


@dataclass(frozen=True)
class Options:
    method: str = "lfrns"
    target: str = "flops"
    threshold: float = 0.05
    compensate: bool = True
    refit: bool = True
    round_to: int = 1
    latency_batch: int = 1  # target "latency": layers are timed at this batch and threads
    threads: int | None = None


def run(reference: validate.References, counted: onnx.ModelProto, work: onnx.ModelProto,
        calib: calibrate.Dataset, held: calibrate.Dataset, budget: Budget, options: Options,
        cost_feeds: dict, notes: list[str], methods: dict[str, str],
        trace: list[dict] | None = None) -> onnx.ModelProto:
    """`work` slimmed further within `budget`; notes say what limited it. `reference` is
    the original model, which keeps its outputs on the batches it ran on; `counted` is it
    normalized, whose costs the budget is a share of (paddle2onnx writes every weight as
    a Constant node: the original's parameters count 0)."""
    graph = Graph(work)
    groups = build_groups(graph)
    why = nothing_to_calibrate(graph, groups)
    if why:
        notes.append(f"nothing to calibrate: {why}; the model is returned as exact lumping "
                     f"left it")
        return work
    stats = calibrate.collect(work, groups, calib)
    if not stats.points:
        notes.append("nothing to calibrate: no unfrozen group has a consumer to merge into")
        return work
    _warn_few_samples(groups, stats, notes)
    probe = OutputErrorProbe(work, graph, groups, calib.head(_probe_samples(
        calib.samples, len(groups.active()))))
    sequential = options.refit and options.compensate and options.method != "magnitude"
    refit_groups = sorted({gid for _, gid in stats.points})
    measured = latency_table.measure_layers(
        graph, cost_feeds, options.latency_batch, options.threads, options.round_to, notes
    ) if options.target == "latency" else None

    def slimmed(fraction: float) -> onnx.ModelProto:
        plans: Plan = redundancy.plan(
            graph, groups, stats, fraction=fraction, probe=probe, method=options.method,
            target=options.target, threshold=options.threshold,
            compensate=options.compensate, feeds=cost_feeds, round_to=options.round_to,
            measured=measured, notes=notes if budget.ratio is not None else None)
        methods.update(methods_by_producer(groups, plans))
        if sequential:
            return refit.refit(work, graph, groups, plans, calib, refit_groups)[0]
        return rewrite.apply(work, graph, groups, plans)

    if budget.ratio is not None:
        return _by_ratio(counted, work, budget.ratio, options.target, cost_feeds, slimmed, notes,
                         options.round_to)
    return _search(reference, held, slimmed, budget, notes,
                   _tracer(trace, counted, cost_feeds)) or work


def _tracer(trace: list[dict] | None, original: onnx.ModelProto, feeds: dict
            ) -> Callable[[onnx.ModelProto, validate.Comparison, bool], None] | None:
    """Records each candidate of a search in `trace` (the report's `search`, the plot's
    fidelity-vs-FLOPs curve): kept FLOPs and the measured fidelity."""
    if trace is None:
        return None
    base = max(report.flops(original, feeds), 1)

    def record(model: onnx.ModelProto, cmp: validate.Comparison, ok: bool) -> None:
        trace.append({"flops_kept": report.flops(model, feeds) / base,
                      "max_rel_error": cmp.max_rel_error, "top1_agreement": cmp.top1_agreement,
                      "accuracy": cmp.accuracy_after, "within": ok})
    return record


def nothing_to_calibrate(graph: Graph, groups: GroupSet) -> str | None:
    """Why calibration cannot change this model, or None when it can."""
    if groups.active():
        return None
    quantized = next((n for n in graph.nodes if n.op_type in QUANTIZED_OPS), None)
    if quantized is not None:
        return (f"quantized graph ({quantized.op_type} at node {quantized.name}) is out of "
                f"scope; slim the float model, then quantize")
    if not groups.groups:
        return "no Conv, Gemm or MatMul with constant weights writes channels"
    return "every channel group is frozen (the groups table gives each reason)"


def _warn_few_samples(groups: GroupSet, stats: calibrate.ChannelStats,
                      notes: list[str]) -> None:
    """A group with more channels than observations has a singular covariance: its merge
    is a guess the ridge keeps tame, not a fit. Say so once per group."""
    seen: set[int] = set()
    for (tensor, gid), point in stats.points.items():
        size = groups.groups[gid].size
        if point.count < size and gid not in seen:
            seen.add(gid)
            message = (f"calibration: {point.count} observations at {tensor} for a group of "
                       f"{size} channels; give more samples for a reliable merge")
            log.warning("onnxslim-fr: warning: %s", message)
            notes.append(message)


def _by_ratio(original: onnx.ModelProto, work: onnx.ModelProto, ratio: float, target: str,
              feeds: dict, slimmed: Callable[[float], onnx.ModelProto], notes: list[str],
              round_to: int) -> onnx.ModelProto:
    def cost(model: onnx.ModelProto) -> float:
        return report.params(model) if target == "params" else report.flops(model, feeds)

    base = cost(original)
    fraction = (1 - ratio) * base / max(cost(work), 1)
    if fraction >= 1:
        notes.append("exact lumping alone met the budget")
        return work
    result = slimmed(fraction)
    reached = cost(result)
    if target != "latency" and reached > (1 - ratio) * base * 1.02:  # latency: measured
        notes.append(f"budget not met: reached {reached / base:.3f} of the original "
                     f"{target} (frozen groups limit the reduction)")
    elif target != "latency" and reached < (1 - ratio - OVERSHOOT) * base:
        why = f"kept counts are multiples of --round-to {round_to}, a coarse step for " \
              f"small groups; --round-to 1 allows any count" if round_to > 1 else \
              "the groups left could not be cut finer"
        notes.append(f"removed {1 - reached / base:.3f} of the original {target}, more than "
                     f"the {ratio:g} asked: {why}")
    return result


#: A ratio met with more than this share of the original's cost removed on top gets a note.
OVERSHOOT = 0.05


def _probe_samples(samples: int, groups: int, most: int = 128, least: int = 4) -> int:
    """Samples per sensitivity probe: one probe per group runs the part of the model after
    the group (probe.py), so all probes together cost about one pass over the calibration
    set, within [least, most]. Sensitivities span orders of magnitude across groups; on a
    ResNet-50 four samples give them within 15% of eight."""
    return max(least, min(most, samples // max(groups, 1)))


def _search(original: validate.References, held: calibrate.Dataset,
            slimmed: Callable[[float], onnx.ModelProto], budget: Budget,
            notes: list[str], explored: Callable[[onnx.ModelProto, validate.Comparison,
                                                  bool], None] | None = None
            ) -> onnx.ModelProto | None:
    """Bisection on the kept cost fraction for the largest reduction within the bound;
    `explored` is told every candidate, its comparison and whether it passed."""
    within = _bound(original, held, budget, explored)
    lo, hi, best = 0.02, 1.0, None
    with progress.overall(8, "searching") as step:
        for _ in range(8):
            mid = (lo + hi) / 2
            candidate = slimmed(mid)
            if within(candidate):
                best, hi = candidate, mid
            else:
                lo = mid
            step()
    if best is None:
        notes.append("no reduction stays within the bound")
    return best


def _bound(original: validate.References, held: calibrate.Dataset, budget: Budget,
           explored: Callable[[onnx.ModelProto, validate.Comparison, bool], None] | None = None
           ) -> Callable[[onnx.ModelProto], bool]:
    """The fidelity test a candidate must pass on the hold-out data."""
    if budget.min_agreement is not None:
        first = validate.compare(original, original.model, held.head(1))
        if first.top1_agreement is None:
            raise BadDataError("--min-agreement needs a first output of class scores "
                               "(batch, classes); use --max-error for other outputs")

    def within(model: onnx.ModelProto) -> bool:
        cmp = validate.compare(original, model, held.batches, held.labels)
        if budget.max_accuracy_drop is not None:
            ok = cmp.accuracy_before - cmp.accuracy_after <= budget.max_accuracy_drop
        elif budget.min_agreement is not None:
            ok = (cmp.top1_agreement or 0.0) >= budget.min_agreement
        else:
            ok = cmp.max_rel_error <= budget.max_error
        if explored is not None:
            explored(model, cmp, ok)
        return ok

    return within
