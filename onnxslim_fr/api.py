"""Runs the passes in order; holds no graph knowledge of its own."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import onnx

from . import calibrate, calibrated, latency, model_io, progress, report, rewrite, validate, weights
from .channels import GroupSet, Role, build_groups
from .channels.groups import kept_channels
from .channels.handlers import handler_for
from .errors import InternalError, SlimError, ValidationError
from .feeds import validation_feeds
from .graph import Graph, name_nodes, normalize
from .lumping import exact
from .lumping.budget import DEFAULT_ROUND_TO
from .lumping.plan import methods_by_producer
from .options import check_arguments, check_labels, check_source
from .runtime import current_provider, first_line, on_provider

log = logging.getLogger(__name__)

ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto


@dataclass
class SlimResult:
    model: onnx.ModelProto
    report: report.Report
    groups: GroupSet


@weights.scoped
def analyze(model: ModelSource) -> tuple[GroupSet, list[dict]]:
    """Channel groups of `model` and a row per group (size, producers, freeze reason)."""
    work = normalize(model_io.load(model))
    groups = build_groups(Graph(work))
    return groups, _group_rows(groups, None, {})


@on_provider  # every onnxruntime session of the call runs on `provider`
@weights.scoped  # large weights are kept once, on disk, for the call (weights.py)
def slim(model: ModelSource, output: str | os.PathLike[str] | None = None, *,
         data: calibrate.DataSource | None = None,
         holdout: calibrate.DataSource | None = None,
         ratio: float | None = None, target: str = "flops",
         max_error: float | None = None, max_accuracy_drop: float | None = None,
         min_agreement: float | None = None, method: str = "lfrns", threshold: float = 0.05,
         compensate: bool = True, sequential_refit: bool = True,
         batch_size: int = 64, max_samples: int | None = None,
         input_shapes: Mapping[str, tuple[int, ...]] | None = None,
         tolerance: float | None = None, round_to: int = DEFAULT_ROUND_TO,
         provider: str | None = None, latency_runs: int = 30, latency_batch: int = 1,
         threads: int | None = None, seed: int = 0) -> SlimResult:
    """Exact lumping, then (with `data`) functional-redundancy merging within a budget.

    `ratio` removes that fraction of the model's FLOPs (`target="params"`: parameters);
    `max_error` (per output) / `max_accuracy_drop` / `min_agreement` (top-1 agreement with
    the original, no labels needed) take the largest reduction that stays within them on
    `holdout` (or `data`). The exact part is validated on inputs that exercise every branch
    (and on the first calibration samples): over `tolerance` (None: by the model's float
    type, see validate.default_tolerance) raises ValidationError and nothing is written.
    Kept channel counts are multiples of `round_to` (1: any count). `provider` names the
    onnxruntime execution provider for every run (None: CPU). Latency: at least
    `latency_runs` alternating runs of each model (0: not measured) at `latency_batch`
    on `threads` intra-op threads (None: every CPU this process may use).
    """
    check_arguments(
        model=model, output=output, data=data, holdout=holdout, ratio=ratio,
        max_error=max_error, max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement,
        target=target, method=method,
        threshold=threshold, batch_size=batch_size, max_samples=max_samples,
        input_shapes=input_shapes, tolerance=tolerance, round_to=round_to, provider=provider,
        latency_runs=latency_runs, latency_batch=latency_batch, threads=threads)
    source = model_io.read(model)
    check_source(source, output, input_shapes)
    original = name_nodes(source.model)  # onnxruntime refuses repeated node names
    tolerance = validate.default_tolerance(original) if tolerance is None else tolerance
    calib = None if data is None else calibrate.load_data(
        data, original, batch_size=batch_size, max_samples=max_samples)
    normalized = normalize(model_io.load(original))  # weights in Constant nodes counted too
    work, first, rounds, methods = _exact(normalized)
    randoms = validation_feeds(original, input_shapes, seed=seed,
                               fallback=calib.batches if calib else ())
    reference = validate.References(original)  # its outputs are computed once per batch
    exact_cmp = validate.compare(reference, work, randoms + (calib.head(64) if calib else []))
    if not exact_cmp.within(tolerance):
        raise ValidationError(exact_cmp.failure(tolerance))
    notes: list[str] = []
    search: list[dict] = []  # a bound's bisection: every candidate tried (report, plot)
    check_set, labels, cost_feeds = randoms, None, randoms[0]
    if data is not None:
        cost_feeds = calib.head(1)[0]  # costs at the sizes the data has, batch 1
        held = calibrate.load_data(holdout, original, batch_size=batch_size,
                                   what="hold-out data") if holdout is not None else calib
        check_labels(max_accuracy_drop, held.labels, original)
        check_set, labels = held.batches, held.labels
        if holdout is None:  # seen: 1 sample, "error 4e-7", 20% accuracy on the rest
            notes.append("fidelity measured on the calibration samples the merge was fitted "
                         "to (no --holdout): an in-sample figure; give --holdout for one "
                         "that generalizes")
        budget = calibrated.Budget(ratio, max_error, max_accuracy_drop, min_agreement)
        options = calibrated.Options(method, target, threshold, compensate, sequential_refit,
                                     round_to, latency_batch, threads)
        try:
            work = calibrated.run(reference, normalized, work, calib, held, budget, options,
                                  cost_feeds, notes, methods, search)
        except (SlimError, MemoryError):
            raise
        except Exception as exc:  # onnxruntime failing on a model we slimmed: our bug
            raise InternalError(f"calibrated pass failed: {first_line(exc)}") from exc
    elif not any(m == "exact" for m in methods.values()):
        work = original  # nothing to gain: hand back the model exactly as it came
    if work is not original:
        notes.extend(_weights_no_longer_inputs(original))
    notes.extend(_ungrouped(normalized, first))
    cmp = exact_cmp if data is None else validate.compare(reference, work, check_set, labels)
    if not math.isfinite(cmp.max_rel_error):  # NaN/Inf or a shape change: damage, not error
        raise ValidationError(cmp.failure(tolerance))
    rep = report.Report(
        before=report.figures(original, cost_feeds, counted=normalized),
        # handed back unchanged: count it as normalized too (Constant-node weights)
        after=report.figures(work, cost_feeds, counted=normalized if work is original else None),
        max_abs_error=cmp.max_abs_error, max_rel_error=cmp.max_rel_error,
        groups=_group_rows(first, Graph(work), methods), rounds=rounds,
        top1_agreement=cmp.top1_agreement, accuracy_before=cmp.accuracy_before,
        accuracy_after=cmp.accuracy_after, exact_max_rel_error=exact_cmp.max_rel_error,
        notes=notes, output_errors=cmp.output_rows(), provider=current_provider(),
        search=search, latency=latency.measure(original, work, cost_feeds, latency.Timing(
            latency_runs, latency_batch, threads), notes))
    if output is not None:
        model_io.save_atomic(work, output, ir_version=source.ir_version,
                             external=source.external)
    return SlimResult(work, rep, first)


@progress.phase("exact lumping")
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
        methods.update(methods_by_producer(groups, plans))
        work = weights.intern(rewrite.apply(work, graph, groups, plans))
    return work, first, rounds, methods


def _weights_no_longer_inputs(original: onnx.ModelProto) -> list[str]:
    """A note naming the graph inputs that only carried weights (old exporters, or
    keep_initializers_as_inputs): slimming treats them as weights, so the output no longer
    lists them and feeding one would fail."""
    if original.ir_version < 4:  # IR 3 requires the listing: the output keeps it
        return []
    initializers = {t.name for t in original.graph.initializer}
    names = [i.name for i in original.graph.input if i.name in initializers]
    if not names:
        return []
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return [f"{len(names)} graph input(s) that only carried weights ({shown}) are plain "
            f"weights in the output: the slimmed model no longer accepts them as inputs"]


def _ungrouped(model: onnx.ModelProto, groups: GroupSet) -> list[str]:
    """A note naming the layers with weights that belong to no group, so the groups table
    does not list them: their shapes are unknown (shape inference does not know an op
    before them, onnxruntime's fused com.microsoft ops say)."""
    graph = Graph(model)
    missing = [n.name for n in graph.nodes if n.name not in groups.roles and
               (h := handler_for(n)) is not None and h.out_channels(n, graph) is not None]
    if not missing:
        return []
    custom = sorted({f"{n.domain}::{n.op_type}" for n in graph.nodes
                     if n.domain not in ("", "ai.onnx")})
    why = f" (shape inference does not know {', '.join(custom[:3])})" if custom else ""
    return [f"{len(missing)} layer(s) with weights ({missing[0]}"
            f"{' and more' if len(missing) > 1 else ''}) are in no channel group and stay as "
            f"they are: their shapes are unknown{why}"]


def _group_rows(groups: GroupSet, final: Graph | None, methods: dict[str, str]) -> list[dict]:
    rows = []
    pieces = kept_channels(groups, final) if final else {}  # a Split's pieces of an output
    for g in groups.groups.values():
        producers = [m.node for m in g.members if m.role is Role.PRODUCER]
        kept = pieces.get(g.id) or (_out_channels(final, producers[0], g.size * g.unit)
                                    // g.unit if final and producers else g.size)
        method = "frozen" if g.frozen else next((methods[p] for p in producers
                                                 if p in methods), "-")
        rows.append({"id": g.id, "size": g.size, "kept": kept, "unit": g.unit,
                     "repeats": _repeats(groups, g), "producers": producers,
                     "frozen": g.frozen, "method": method if kept < g.size or g.frozen else "-"})
    return rows


def _repeats(groups: GroupSet, group) -> int:
    """How many times the group repeats along one of its producers' outputs (a grouped
    conv's blocks, time steps sharing a weight): a channel goes only with its copies."""
    return max((sum(s.group == group.id for s in groups.layouts[m.tensor].segments)
                for m in group.members
                if m.role is Role.PRODUCER and m.tensor in groups.layouts), default=1)


def _out_channels(graph: Graph, node_name: str, default: int) -> int:
    node = next((n for n in graph.nodes if n.name == node_name), None)
    handler = handler_for(node) if node is not None else None
    kept = handler.out_channels(node, graph) if handler is not None else None
    return default if kept is None else kept
