"""Figures about a model and their rendering: params, MACs, channels, size, latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .graph import Graph, infer_shapes, skeleton
from .runtime import session

LINEAR_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class Figures:
    params: int
    flops: int
    channels: int
    file_bytes: int
    latency_ms: float | None = None


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

    def to_json(self) -> dict:
        out = {
            "params_before": self.before.params, "params_after": self.after.params,
            "flops_before": self.before.flops, "flops_after": self.after.flops,
            "channels_before": self.before.channels, "channels_after": self.after.channels,
            "file_bytes_before": self.before.file_bytes,
            "file_bytes_after": self.after.file_bytes,
            "latency_ms_before": self.before.latency_ms,
            "latency_ms_after": self.after.latency_ms,
            "max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
            "top1_agreement": self.top1_agreement,
            "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
            "exact_max_rel_error": self.exact_max_rel_error, "rounds": self.rounds,
            "groups": self.groups, "notes": self.notes,
        }
        return out

    def render(self) -> str:
        b, a = asdict(self.before), asdict(self.after)
        lines = [f"{'':<12}{'before':>14}{'after':>14}{'change':>10}"]
        for key, label in (("params", "params"), ("flops", "MACs"), ("channels", "channels"),
                           ("file_bytes", "file bytes"), ("latency_ms", "latency ms")):
            if b[key] is None or a[key] is None:
                continue
            change = f"{(a[key] - b[key]) / b[key] * 100:+.1f}%" if b[key] else ""
            fmt = "{:>14.3f}" if key == "latency_ms" else "{:>14,}"
            lines.append(f"{label:<12}" + fmt.format(b[key]) + fmt.format(a[key]) + f"{change:>10}")
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


def render_groups(groups: list[dict]) -> str:
    lines = [f"{'group':>5} {'size':>6} {'kept':>6}  {'method':<10} producers / frozen reason"]
    for g in groups:
        why = f"frozen: {g['frozen']}" if g["frozen"] else ", ".join(g["producers"])
        lines.append(f"{g['id']:>5} {g['size']:>6} {g['kept']:>6}  {g['method']:<10} {why}")
    return "\n".join(lines)


def figures(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None = None,
            *, latency_runs: int = 0) -> Figures:
    return Figures(params(model), flops(model, feeds), channels(model), model.ByteSize(),
                   latency_ms(model, feeds, latency_runs) if feeds and latency_runs else None)


def params(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(t.dims) for t in model.graph.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                      onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)))


def channels(model: onnx.ModelProto) -> int:
    """Output channels of every Conv/Gemm/MatMul with constant weights."""
    g = Graph(model)
    total = 0
    for node in g.nodes:
        w = g.const(node.input[1]) if node.op_type in LINEAR_OPS and len(node.input) > 1 \
            else None
        if w is None or w.ndim < 2:
            continue
        if node.op_type == "Conv":
            total += w.shape[0]
        elif node.op_type == "Gemm":
            total += w.shape[0] if any(a.name == "transB" and a.i for a in node.attribute) \
                else w.shape[1]
        else:
            total += w.shape[1]
    return total


def flops(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None = None) -> int:
    """Multiply-accumulates of Conv/Gemm/MatMul for one forward pass of `feeds` (batch 1
    for dynamic dims without feeds)."""
    return int(sum(macs for macs, _ in node_costs(model, feeds).values()))


def node_costs(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None = None
               ) -> dict[str, tuple[int, int]]:
    """(MACs, weight parameters) of every Conv/Gemm/MatMul with known shapes, by node name."""
    static = skeleton(model)  # shapes only: the weights' values are not needed
    for vi in static.graph.input:
        dims = vi.type.tensor_type.shape.dim
        shape = feeds[vi.name].shape if feeds and vi.name in feeds else None
        for i, d in enumerate(dims):
            if shape is not None:
                d.dim_value = int(shape[i])
            elif not d.HasField("dim_value"):
                d.dim_value = 1
    del static.graph.value_info[:]
    g = Graph(infer_shapes(static))
    costs = {}
    for node in g.nodes:
        if node.op_type not in LINEAR_OPS:
            continue
        out, w = g.shape(node.output[0]), g.shape(node.input[1])
        if out is None or w is None or None in out or None in w:
            continue
        if node.op_type == "Conv":
            macs = int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            a = g.shape(node.input[0])
            k = a[0] if any(x.name == "transA" and x.i for x in node.attribute) else a[1]
            macs = int(np.prod(out)) * int(k)
        else:
            macs = int(np.prod(out)) * int(g.shape(node.input[0])[-1])
        costs[node.name] = (macs, int(np.prod(w)))
    return costs


def latency_ms(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], runs: int) -> float:
    """Median wall time of `runs` onnxruntime runs after one warm-up."""
    sess = session(model)
    sess.run(None, dict(feeds))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, dict(feeds))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
