"""Runs the passes in order; holds no graph knowledge of its own."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import onnx

from . import model_io, report, rewrite, validate
from .channels import GroupSet, Role, build_groups
from .errors import ValidationError
from .graph import Graph, normalize
from .lumping import exact
from .testing import random_feeds

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
    graph = Graph(work)
    groups = build_groups(graph)
    return groups, _group_rows(groups, None)


def slim(model: ModelSource, output: str | os.PathLike[str] | None = None, *,
         input_shapes: Mapping[str, tuple[int, ...]] | None = None,
         tolerance: float = 1e-4, max_rounds: int = 6, latency_runs: int = 10,
         seed: int = 0) -> SlimResult:
    """Exact lumping: a smaller model with the same function, validated in onnxruntime.

    Raises ValidationError (nothing written) when the relative output error on seeded random
    inputs exceeds `tolerance`.
    """
    original = model_io.load(model)
    work = normalize(model_io.load(original))
    first: GroupSet | None = None
    rounds, removed = 0, 0
    for rounds in range(1, max_rounds + 1):
        graph = Graph(work)
        groups = build_groups(graph)
        first = first or groups
        plans = exact.plan(graph, groups)
        log.info("round %d: %d groups, %d channels removable", rounds, len(groups.groups),
                 sum(p.removed for p in plans.values()))
        if not plans:
            break
        removed += sum(p.removed for p in plans.values())
        work = rewrite.apply(work, graph, groups, plans)
    if not removed:
        work = original  # nothing to gain: hand back the model exactly as it came
    batches = [random_feeds(original, shapes=input_shapes, seed=seed + i) for i in range(3)]
    cmp = validate.compare(original, work, batches)
    if cmp.max_rel_error > tolerance:
        raise ValidationError(f"slimmed model differs from the original: relative error "
                              f"{cmp.max_rel_error:.3g} > {tolerance:g}; nothing written")
    rep = report.Report(
        before=report.figures(original, batches[0], latency_runs=latency_runs),
        after=report.figures(work, batches[0], latency_runs=latency_runs),
        max_abs_error=cmp.max_abs_error, max_rel_error=cmp.max_rel_error,
        groups=_group_rows(first, Graph(work)), rounds=rounds,
        top1_agreement=cmp.top1_agreement)
    if output is not None:
        model_io.save_atomic(work, output)
    return SlimResult(work, rep, first)


def _group_rows(groups: GroupSet, final: Graph | None) -> list[dict]:
    """Groups are named by their producers, whose node names survive every rewrite."""
    rows = []
    for g in groups.groups.values():
        producers = [m.node for m in g.members if m.role is Role.PRODUCER]
        kept = g.size
        if final is not None and producers:
            kept = _out_channels(final, producers[0], g.size)
        rows.append({"id": g.id, "size": g.size, "kept": kept, "producers": producers,
                     "frozen": g.frozen, "method": "frozen" if g.frozen else
                     ("exact" if kept < g.size else "-")})
    return rows


def _out_channels(graph: Graph, node_name: str, default: int) -> int:
    for node in graph.nodes:
        if node.name == node_name:
            w = graph.const(node.input[1])
            if node.op_type == "Conv":
                return int(w.shape[0])
            if node.op_type == "Gemm":
                trans = any(a.name == "transB" and a.i for a in node.attribute)
                return int(w.shape[0] if trans else w.shape[1])
            return int(w.shape[1])
    return default


