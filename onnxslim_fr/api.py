"""Runs the passes in order; holds no graph knowledge of its own."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import onnx

from . import calibrate, model_io, refit, report, rewrite, validate
from .channels import GroupSet, Role, build_groups
from .channels.handlers import handler_for
from .errors import BadDataError, ValidationError
from .feeds import validation_feeds
from .graph import Graph, name_nodes, normalize
from .lumping import exact, redundancy
from .options import check_arguments, check_labels, check_source

log = logging.getLogger(__name__)

ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto


@dataclass
class SlimResult:
    model: onnx.ModelProto
    report: report.Report
    groups: GroupSet


def analyze(model: ModelSource) -> tuple[GroupSet, list[dict]]:
    """Channel groups of `model` and a row per group (size, producers, freeze reason)."""
    work = normalize(model_io.load(model))
    groups = build_groups(Graph(work))
    return groups, _group_rows(groups, None, {})


def slim(model: ModelSource, output: str | os.PathLike[str] | None = None, *,
         data: calibrate.DataSource | None = None,
         holdout: calibrate.DataSource | None = None,
         ratio: float | None = None, target: str = "flops",
         max_error: float | None = None, max_accuracy_drop: float | None = None,
         method: str = "lfrns", threshold: float = 0.05, compensate: bool = True,
         sequential_refit: bool = True,
         batch_size: int = 64, max_samples: int | None = None,
         input_shapes: Mapping[str, tuple[int, ...]] | None = None,
         tolerance: float | None = None, latency_runs: int = 10, seed: int = 0) -> SlimResult:
    """Exact lumping, then (with `data`) functional-redundancy merging within a budget.

    `ratio` removes that fraction of the model's FLOPs (`target="params"`: parameters);
    `max_error` / `max_accuracy_drop` take the largest reduction that stays within them on
    `holdout` (or `data`). The exact part is validated on inputs that exercise every branch
    (and on the first calibration samples): over `tolerance` (None: by the model's float
    type, see validate.default_tolerance) raises ValidationError and nothing is written.
    """
    check_arguments(
        model=model, output=output, data=data, holdout=holdout, ratio=ratio,
        max_error=max_error, max_accuracy_drop=max_accuracy_drop, target=target, method=method,
        threshold=threshold, batch_size=batch_size, max_samples=max_samples,
        input_shapes=input_shapes, tolerance=tolerance)
    source = model_io.read(model)
    check_source(source, output, input_shapes)
    original = name_nodes(source.model)  # onnxruntime refuses repeated node names
    tolerance = validate.default_tolerance(original) if tolerance is None else tolerance
    calib = None if data is None else calibrate.load_data(
        data, original, batch_size=batch_size, max_samples=max_samples)
    work, first, rounds, methods = _exact(normalize(model_io.load(original)))
    randoms = validation_feeds(original, input_shapes, seed=seed,
                               fallback=calib.batches if calib else ())
    exact_cmp = validate.compare(original, work, randoms + (calib.head(64) if calib else []))
    if not exact_cmp.within(tolerance):
        raise ValidationError(exact_cmp.failure(tolerance))
    notes: list[str] = []
    check_set, labels, cost_feeds = randoms, None, randoms[0]
    if data is not None:
        cost_feeds = calib.head(1)[0]  # costs at the sizes the data has, batch 1
        held = calibrate.load_data(holdout, original, batch_size=batch_size,
                                   what="hold-out data") if holdout is not None else calib
        check_labels(max_accuracy_drop, held.labels)
        check_set, labels = held.batches, held.labels
        options = dict(method=method, target=target, threshold=threshold,
                       compensate=compensate, refit=sequential_refit, feeds=cost_feeds)
        work = _redundant(original, work, calib, held, ratio, max_error, max_accuracy_drop,
                          options, notes, methods)
    elif not any(m == "exact" for m in methods.values()):
        work = original  # nothing to gain: hand back the model exactly as it came
    cmp = exact_cmp if data is None else validate.compare(original, work, check_set, labels)
    if not math.isfinite(cmp.max_rel_error):  # NaN/Inf or a shape change: damage, not error
        raise ValidationError(cmp.failure(tolerance))
    rep = report.Report(
        before=report.figures(original, cost_feeds, latency_runs=latency_runs),
        after=report.figures(work, cost_feeds, latency_runs=latency_runs),
        max_abs_error=cmp.max_abs_error, max_rel_error=cmp.max_rel_error,
        groups=_group_rows(first, Graph(work), methods), rounds=rounds,
        top1_agreement=cmp.top1_agreement, accuracy_before=cmp.accuracy_before,
        accuracy_after=cmp.accuracy_after, exact_max_rel_error=exact_cmp.max_rel_error,
        notes=notes, output_errors=cmp.output_rows())
    if output is not None:
        model_io.save_atomic(work, output, ir_version=source.ir_version,
                             external=source.external)
    return SlimResult(work, rep, first)


def _exact(work: onnx.ModelProto, max_rounds: int = 6
           ) -> tuple[onnx.ModelProto, GroupSet, int, dict[str, str]]:
    """Exact lumping rounds until nothing more goes (one removal can expose the next)."""
    first: GroupSet | None = None
    methods: dict[str, str] = {}
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        graph = Graph(work)
        groups = build_groups(graph)
        first = first or groups
        plans = exact.plan(graph, groups)
        log.info("exact round %d: %d channels removable", rounds,
                 sum(p.removed for p in plans.values()))
        if not plans:
            break
        _record(groups, plans, methods)
        work = rewrite.apply(work, graph, groups, plans)
    return work, first, rounds, methods


def _redundant(original: onnx.ModelProto, work: onnx.ModelProto, calib: calibrate.Dataset,
               held: calibrate.Dataset, ratio: float | None, max_error: float | None,
               max_drop: float | None, options: dict, notes: list[str],
               methods: dict[str, str]) -> onnx.ModelProto:
    graph = Graph(work)
    groups = build_groups(graph)
    stats = calibrate.collect(work, groups, calib)
    feeds = options["feeds"]
    base, now = report.flops(original, feeds), report.flops(work, feeds)
    probe = validate.output_error_probe(work, graph, groups, calib.head(_probe_samples(
        calib.samples, len(groups.active()))))

    sequential = options.pop("refit") and options["compensate"] and \
        options["method"] != "magnitude"
    refit_groups = sorted({gid for _, gid in stats.points})

    def slimmed(fraction: float) -> onnx.ModelProto:
        plans = redundancy.plan(graph, groups, stats, fraction=fraction, probe=probe,
                                **options)
        _record(groups, plans, methods)
        if sequential:
            return refit.refit(work, graph, groups, plans, calib, refit_groups)[0]
        return rewrite.apply(work, graph, groups, plans)

    if ratio is not None:
        if not 0 <= ratio < 1:
            raise BadDataError(f"--ratio must be in [0, 1), got {ratio}")
        if options["target"] == "params":
            base, now = report.params(original), report.params(work)
        fraction = (1 - ratio) * base / max(now, 1)
        if fraction >= 1:
            notes.append("exact lumping alone met the budget")
            return work
        result = slimmed(fraction)
        reached = report.params(result) if options["target"] == "params" else \
            report.flops(result, feeds)
        if reached > (1 - ratio) * base * 1.02:
            notes.append(f"budget not met: reached {reached / base:.3f} of the original "
                         f"{options['target']} (frozen groups limit the reduction)")
        return result
    return _search(original, held, slimmed, max_error, max_drop, notes) or work


def _probe_samples(samples: int, groups: int, most: int = 128, least: int = 8) -> int:
    """Samples per sensitivity probe: one probe per group runs the whole model, so all
    probes together cost about one pass over the calibration set, within [least, most]."""
    return max(least, min(most, samples // max(groups, 1)))


def _search(original: onnx.ModelProto, held: calibrate.Dataset, slimmed, max_error: float | None,
            max_drop: float | None, notes: list[str]) -> onnx.ModelProto | None:
    """Bisection on the kept cost fraction for the largest reduction within the bound."""
    if max_drop is not None and held.labels is None:
        raise BadDataError("--max-accuracy-drop needs labels in the hold-out data")

    def within(model: onnx.ModelProto) -> bool:
        cmp = validate.compare(original, model, held.batches, held.labels)
        if max_drop is not None:
            return cmp.accuracy_before - cmp.accuracy_after <= max_drop
        return cmp.max_rel_error <= max_error

    lo, hi, best = 0.02, 1.0, None
    for _ in range(8):
        mid = (lo + hi) / 2
        candidate = slimmed(mid)
        if within(candidate):
            best, hi = candidate, mid
        else:
            lo = mid
    if best is None:
        notes.append("no reduction stays within the error bound")
    return best


def _record(groups: GroupSet, plans: dict, methods: dict[str, str]) -> None:
    """Remember the method per group by its first producer (names survive rewrites)."""
    for gid, p in plans.items():
        for m in groups.groups[gid].members:
            if m.role is Role.PRODUCER:
                methods[m.node] = p.method


def _group_rows(groups: GroupSet, final: Graph | None, methods: dict[str, str]) -> list[dict]:
    rows = []
    for g in groups.groups.values():
        producers = [m.node for m in g.members if m.role is Role.PRODUCER]
        kept = _out_channels(final, producers[0], g.size) if final and producers else g.size
        method = "frozen" if g.frozen else next((methods[p] for p in producers
                                                 if p in methods), "-")
        rows.append({"id": g.id, "size": g.size, "kept": kept, "producers": producers,
                     "frozen": g.frozen, "method": method if kept < g.size or g.frozen else "-"})
    return rows


def _out_channels(graph: Graph, node_name: str, default: int) -> int:
    node = next((n for n in graph.nodes if n.name == node_name), None)
    handler = handler_for(node) if node is not None else None
    kept = handler.out_channels(node, graph) if handler is not None else None
    return default if kept is None else kept
