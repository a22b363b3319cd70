"""Symbolic values of small integer tensors computed from shapes (Reshape targets).

Exporters build Reshape targets as ``Shape -> Gather -> Unsqueeze -> Concat``. onnx's data
propagation resolves them only for some opsets, so the few ops involved are evaluated
here over dimensions that are numbers or symbols: ``Shape(x)[0]`` of an ``[N, 64, 7, 7]``
tensor is ``'N'``. The Reshape output shape then follows from the target with ONNX's
rules (0 copies the input dimension, -1 takes what is left), symbols and all; `normalize`
writes it where shape inference left it unknown, so every op after it sees it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx
import onnx.numpy_helper

Dim = int | str  # a dimension: its size, or the symbol of a dynamic one

if TYPE_CHECKING:
    from .graph import Graph

Value = list[Dim]
_MAX_LENGTH = 16  # shape vectors are short; anything longer is not a shape


def value_of(name: str, graph: Graph, depth: int = 0) -> Value | None:
    """The 1-D (or scalar, as one entry) integer value of `name`, or None if unknown.
    Memoised per graph: shape subgraphs share their Shape / Gather nodes, and walking them
    again for every reader is exponential in the number of layers."""
    memo = graph.__dict__.setdefault("_shape_values", {})
    if name not in memo:
        value = _value_of(name, graph, depth)
        memo[name] = None if value is None else list(value)
    return None if memo[name] is None else list(memo[name])


def _value_of(name: str, graph: Graph, depth: int) -> Value | None:
    const = graph.const(name)
    if const is not None:
        if const.dtype.kind not in "iu" or const.size > _MAX_LENGTH:
            return None
        return [int(v) for v in const.reshape(-1)]
    node = graph.producer.get(name)
    if node is None or depth > 32:
        return None
    inputs = [value_of(i, graph, depth + 1) if i else None for i in node.input]
    return _evaluate(node, graph, inputs)


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _evaluate(node: onnx.NodeProto, graph: Graph, inputs: list[Value | None]) -> Value | None:
    op = node.op_type
    if op == "Constant":  # an unfolded model (the report costs the original as it came)
        value = attr(node, "value", None)
        if value is None:
            ints = attr(node, "value_ints", None)
            one = attr(node, "value_int", None)
            return list(ints) if ints is not None else None if one is None else [int(one)]
        array = onnx.numpy_helper.to_array(value)
        if array.dtype.kind not in "iu" or array.size > _MAX_LENGTH:
            return None
        return [int(v) for v in array.reshape(-1)]
    if op == "Shape":
        dims = graph.symbolic_shape(node.input[0])
        if dims is None:
            return None
        start, end = attr(node, "start", 0), attr(node, "end", None)
        return list(dims[slice(start, end)])
    if any(v is None for v in inputs[:1]):
        return None
    if op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
        return inputs[0]
    if op == "Concat":
        if any(v is None for v in inputs):
            return None
        return [d for v in inputs for d in v]
    if op == "Gather" and int(attr(node, "axis", 0)) == 0 and len(inputs) > 1 \
            and inputs[1] is not None and all(isinstance(i, int) for i in inputs[1]):
        data = inputs[0]
        try:
            return [data[i] for i in inputs[1]]
        except IndexError:
            return None
    if op == "Slice" and len(inputs) >= 3 and all(
            v is not None and all(isinstance(x, int) for x in v) for v in inputs[1:]):
        steps = inputs[4][0] if len(inputs) > 4 else 1
        return inputs[0][slice(inputs[1][0], inputs[2][0], steps)]
    if op == "Mul" and len(inputs) == 2 and inputs[1] is not None:
        return _multiply(inputs[0], inputs[1])
    if op in ("Add", "Sub", "Div") and len(inputs) == 2 and inputs[1] is not None:
        return _integer(op, inputs[0], inputs[1])  # torch's chunk: (C + 1) / 2 * k
    return None


def _integer(op: str, a: Value, b: Value) -> Value | None:
    """Add / Sub / Div (truncating, as ONNX's integer Div) of known numbers only."""
    if not all(isinstance(v, int) for v in [*a, *b]) or (len(a) != len(b) and
                                                         1 not in (len(a), len(b))):
        return None
    n = max(len(a), len(b))
    a, b = a * n if len(a) == 1 else a, b * n if len(b) == 1 else b
    if op == "Div" and 0 in b:
        return None
    ops = {"Add": lambda x, y: x + y, "Sub": lambda x, y: x - y,
           "Div": lambda x, y: abs(x) // abs(y) * (1 if (x < 0) == (y < 0) else -1)}
    return [ops[op](x, y) for x, y in zip(a, b, strict=True)]


def _multiply(a: Value, b: Value) -> Value | None:
    if len(a) != len(b) and 1 not in (len(a), len(b)):
        return None
    n = max(len(a), len(b))
    a, b = a * n if len(a) == 1 else a, b * n if len(b) == 1 else b
    out: Value = []
    for x, y in zip(a, b, strict=True):
        out.append(x * y if isinstance(x, int) and isinstance(y, int) else f"({x})*({y})")
    return out


def reshaped(src: tuple[Dim, ...], target: Value, allowzero: bool = False) -> list[Dim] | None:
    """Output shape of Reshape(src, target) by ONNX's rules, or None if it cannot be told."""
    out = [src[i] if d == 0 and not allowzero and i < len(src) else d
           for i, d in enumerate(target)]
    if out.count(-1) > 1:
        return None
    if -1 in out:
        left = list(src)
        static = 1
        for d in left:
            if isinstance(d, int):
                static *= d
        known = 1
        for d in out:
            if isinstance(d, int) and d != -1:
                known *= d
            elif isinstance(d, str):
                if d not in left:
                    return None
                left.remove(d)
        symbols = [d for d in left if isinstance(d, str)]
        if known == 0 or static % known:
            return None
        rest = static // known
        fill: Dim = rest if not symbols else "*".join([*symbols, str(rest)])
        if symbols and rest == 1 and len(symbols) == 1:
            fill = symbols[0]
        out[out.index(-1)] = fill
    return out if all(isinstance(d, str) or d >= 0 for d in out) else None


def target_shape(node: onnx.NodeProto, graph: Graph) -> list[Dim] | None:
    """Symbolic output shape of a Reshape node from its evaluated target."""
    src = graph.symbolic_shape(node.input[0])
    target = value_of(node.input[1], graph)
    if src is None or target is None:
        return None
    return reshaped(src, target, bool(attr(node, "allowzero", 0)))



def resolved_reshapes(graph: Graph) -> list[onnx.ValueInfoProto]:
    """Typed shapes for Reshape outputs shape inference left unknown, where the evaluated
    target tells them."""
    infos = []
    for node in graph.nodes:
        if node.op_type != "Reshape":
            continue
        known = graph.symbolic_shape(node.output[0])
        dims = target_shape(node, graph)
        elem = graph.elem_type(node.input[0])
        if dims is not None and elem and _more_known(dims, known):
            infos.append(onnx.helper.make_tensor_value_info(node.output[0], elem, dims))
    return infos


def _more_known(dims: list[Dim], known: tuple[Dim, ...] | None) -> bool:
    """Whether `dims` tells something `known` (shape inference's answer) does not."""
    if known is None:
        return True
    return len(dims) == len(known) and any(
        isinstance(d, int) and not isinstance(k, int) for d, k in zip(dims, known, strict=True))
