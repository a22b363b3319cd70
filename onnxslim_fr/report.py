"""Figures about a model and their rendering: params, MACs, channels, size, latency."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .channels.handlers import handler_for
from .channels.handlers.base import OpHandler, known
from .errors import BadModelError, SlimError
from .graph import Graph, infer_shapes, skeleton
from .latency import Comparison, is_noise
from .model_io import byte_size
from .runtime import run

log = logging.getLogger(__name__)


@dataclass
class Figures:
    params: int
    flops: int
    channels: int
    file_bytes: int


@dataclass
class Report:
    before: Figures
    after: Figures
    max_abs_error: float
    max_rel_error: float
    groups: list[dict] = field(default_factory=list)
    rounds: int = 0
    top1_agreement: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    exact_max_rel_error: float | None = None
    notes: list[str] = field(default_factory=list)
    output_errors: list[dict] = field(default_factory=list)
    latency: Comparison | None = None
    provider: str | None = None
    search: list[dict] = field(default_factory=list)  # candidates of a bound's bisection

    def to_json(self) -> dict:
        out = {
            "params_before": self.before.params, "params_after": self.after.params,
            "flops_before": self.before.flops, "flops_after": self.after.flops,
            "channels_before": self.before.channels, "channels_after": self.after.channels,
            "file_bytes_before": self.before.file_bytes,
            "file_bytes_after": self.after.file_bytes,
            **self._latency_json(),
            "max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
            "top1_agreement": self.top1_agreement,
            "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
            "exact_max_rel_error": self.exact_max_rel_error, "rounds": self.rounds,
            "groups": self.groups, "notes": self.notes, "output_errors": self.output_errors,
            "search": self.search,
        }
        return out

    def _latency_json(self) -> dict:
        lat = self.latency
        return {
            "latency_ms_before": lat.before.median_ms if lat else None,
            "latency_ms_after": lat.after.median_ms if lat else None,
            "latency_spread_ms_before": lat.before.spread_ms if lat else None,
            "latency_spread_ms_after": lat.after.spread_ms if lat else None,
            "latency_runs": lat.before.runs if lat else None,
            "latency_batch": lat.batch if lat else None,
            "latency_threads": lat.threads if lat else None,
            "provider": self.provider,
        }

    def render(self) -> str:
        b, a = asdict(self.before), asdict(self.after)
        lines = [f"{'':<12}{'before':>14}{'after':>14}{'change':>10}"]
        for key, label in (("params", "params"), ("flops", "MACs"), ("channels", "channels"),
                           ("file_bytes", "file bytes")):
            change = f"{(a[key] - b[key]) / b[key] * 100:+.1f}%" if b[key] else ""
            lines.append(f"{label:<12}{b[key]:>14,}{a[key]:>14,}{change:>10}")
        lines.extend(render_latency(self.latency, self.provider))
        lines.append(f"max abs error {self.max_abs_error:.3g}, max rel error "
                     f"{self.max_rel_error:.3g}")
        if self.accuracy_before is not None:
            lines.append(f"accuracy {self.accuracy_before:.4f} -> {self.accuracy_after:.4f}")
        if self.top1_agreement is not None:
            lines.append(f"top-1 agreement {self.top1_agreement:.4f}")
        lines.append("")
        lines.append(render_groups(self.groups))
        lines.extend(self.notes)
        return "\n".join(lines)


def render_latency(lat: Comparison | None, provider: str | None) -> list[str]:
    """The latency row (a change within the spread reads `noise`, not a percentage) and
    how it was measured."""
    if lat is None:
        return []
    before, after = lat.before.median_ms, lat.after.median_ms
    change = "noise" if is_noise(lat.before, lat.after) else \
        f"{(after - before) / before * 100:+.1f}%" if before else ""
    where = f" on {provider.removesuffix('ExecutionProvider')}" if provider else ""
    return [f"{'latency ms':<12}{before:>14.3f}{after:>14.3f}{change:>10}",
            f"  median of {lat.before.runs} alternating runs each, batch {lat.batch}, "
            f"{lat.threads} threads{where}; IQR {lat.before.spread_ms:.3f} / "
            f"{lat.after.spread_ms:.3f} ms"]


def render_groups(groups: list[dict]) -> str:
    """One row per group; a head group counts whole heads in `size` and `kept` and says how
    many features (channels of each projection) one head is."""
    lines = [f"{'group':>5} {'size':>6} {'kept':>6}  {'method':<10} producers / frozen reason"]
    for g in groups:
        why = f"frozen: {g['frozen']}" if g["frozen"] else ", ".join(g["producers"])
        if g.get("unit", 1) > 1:
            why = f"heads of {g['unit']} channels; {why}"
        if g.get("repeats", 1) > 1:
            why = f"x{g['repeats']} (repeats in {g['repeats']} blocks: grouped conv or " \
                  f"shared weight; a channel goes with its copies); {why}"
        lines.append(f"{g['id']:>5} {g['size']:>6} {g['kept']:>6}  {g['method']:<10} {why}")
    return "\n".join(lines)


def figures(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None = None, *,
            counted: onnx.ModelProto | None = None) -> Figures:
    """The static figures (latency is measured for a pair: latency.compare). `counted`: the
    same model normalized, whose weights are all initializers (an exporter's Constant
    nodes would otherwise be missing from params and channels); the file size is `model`'s."""
    counted = model if counted is None else counted
    return Figures(params(counted), flops(counted, feeds), channels(counted), byte_size(model))


def params(model: onnx.ModelProto) -> int:
    """Floating-point initializer elements: what the file holds, whichever op reads them."""
    return int(sum(np.prod(t.dims) for t in model.graph.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                      onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)))


def channels(model: onnx.ModelProto) -> int:
    """Output channels of every Conv/Gemm/MatMul with constant weights, as their handlers
    count them."""
    g = Graph(model)
    total = 0
    for node in g.nodes:
        handler = handler_for(node)
        n = handler.out_channels(node, g) if handler is not None else None
        total += n or 0
    return total


def flops(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None = None) -> int:
    """Multiply-accumulates of Conv/Gemm/MatMul for one forward pass of `feeds` (batch 1
    for dynamic dims without feeds)."""
    return int(sum(macs for macs, _ in node_costs(model, feeds).values()))


def node_costs(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None = None
               ) -> dict[int, tuple[int, int]]:
    """(MACs, weight parameters) of every node whose handler counts a cost, keyed by the
    node's index in the graph (names may be missing or repeated). Shapes are those of
    `feeds` (dynamic dims 1 without feeds): a dynamic height counted as 1 would make every
    convolution look almost free next to the MatMuls."""
    g = Graph(model)
    shapes = _static_shapes(model, feeds)
    if feeds:
        _measure_unknown(model, g, shapes, feeds)
    costs = {}
    for i, node in enumerate(g.nodes):
        handler = handler_for(node)
        cost = handler.cost(node, g, shapes.shape) if handler is not None else None
        if cost is not None:
            costs[i] = cost
    return costs


def _measure_unknown(model: onnx.ModelProto, g: Graph, shapes: Graph,
                     feeds: Mapping[str, np.ndarray]) -> None:
    """Shapes inference could not tell (a Slice with computed bounds loses the batch axis,
    and every MatMul after it would count nothing) are read off one onnxruntime run on
    `feeds`, with those tensors as extra outputs."""
    wanted = sorted({t for node in g.nodes if _counts_cost(node)
                     for t in [*node.input, *node.output]
                     if t and t not in g.initializers and not known(shapes.shape(t))})
    if not wanted:
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, shapes.elem_type(t) or
                                                                 onnx.TensorProto.FLOAT, None)
                              for t in wanted if t not in have)
    try:
        values = dict(zip([o.name for o in probe.graph.output], run(probe, feeds), strict=True))
    except SlimError as exc:  # costs then count what inference told; the run is not needed
        log.warning("costs at unknown shapes skipped: %s", exc)
        return
    for t in wanted:
        shapes.learn_shape(t, tuple(np.shape(values[t])))


def _counts_cost(node: onnx.NodeProto) -> bool:
    handler = handler_for(node)
    return handler is not None and type(handler).cost is not OpHandler.cost


def _static_shapes(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None) -> Graph:
    """The model's shapes inferred with every dynamic input dim fixed (from `feeds`, else
    1). If the feed's sizes do not infer, batch 1 does; if that fails too, the shapes the
    model declares (nodes with unknown shapes then count nothing)."""
    for sizes in ([feeds, None] if feeds else [None]):
        static = skeleton(model)  # shapes only: the weights' values are not needed
        _fix_input_dims(static.graph, sizes)
        del static.graph.value_info[:]
        try:
            return Graph(infer_shapes(static))
        except BadModelError:
            log.warning("shapes do not infer at the %s input sizes",
                        "calibration" if sizes else "batch-1")
    return Graph(model)


def _fix_input_dims(g: onnx.GraphProto, feeds: Mapping[str, np.ndarray] | None) -> None:
    for vi in g.input:
        dims = vi.type.tensor_type.shape.dim
        shape = np.shape(feeds[vi.name]) if feeds and vi.name in feeds else None
        if shape is not None and len(shape) != len(dims):
            shape = None
        for i, d in enumerate(dims):
            if not d.HasField("dim_value"):
                d.dim_value = int(shape[i]) if shape is not None else 1
