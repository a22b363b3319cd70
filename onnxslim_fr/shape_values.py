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
        if node.op_type not in ("Reshape", "Slice"):
            continue
        known = graph.symbolic_shape(node.output[0])
        dims = target_shape(node, graph) if node.op_type == "Reshape" else \
            sliced_shape(node, graph)
        elem = graph.elem_type(node.input[0])
        if dims is not None and elem and _more_known(dims, known):
            infos.append(onnx.helper.make_tensor_value_info(node.output[0], elem, dims))
    return infos


def sliced_shape(node: onnx.NodeProto, graph: Graph) -> list[Dim] | None:
    """Output shape of a Slice whose bounds are computed (torch's ``chunk``: ends =
    ``(C + 1) / 2 * k`` from ``Shape``): shape inference gives up on every axis, yet only
    the sliced axes change and their bounds evaluate to numbers. None when they do not."""
    src = graph.symbolic_shape(node.input[0])
    if src is None or len(node.input) < 3:
        return None
    bounds = [value_of(name, graph) if name else None for name in node.input[1:5]]
    starts, ends = bounds[0], bounds[1]
    axes = bounds[2] if len(bounds) > 2 and bounds[2] is not None else list(range(len(starts
                                                                                     or ())))
    steps = bounds[3] if len(bounds) > 3 and bounds[3] is not None else [1] * len(axes)
    values = [starts, ends, axes, steps]
    if any(v is None or len(v) != len(axes) or not all(isinstance(x, int) for x in v)
           for v in values):
        return None
    out = list(src)
    for start, end, axis, step in zip(*values, strict=True):
        dim = src[axis % len(src)]
        if not isinstance(dim, int) or step == 0:
            return None
        out[axis % len(src)] = len(range(dim)[slice(start, end, step)])
    return out


def _more_known(dims: list[Dim], known: tuple[Dim, ...] | None) -> bool:
    """Whether `dims` tells something `known` (shape inference's answer) does not."""
    if known is None:
        return True
    return len(dims) == len(known) and any(
        isinstance(d, int) and not isinstance(k, int) for d, k in zip(dims, known, strict=True))


# ------------------------------------------------------------ which entries read the channels

Taint = list[bool]  # per entry of a small integer value: does it depend on the channel count?

#: Ops whose result entries are taken from their first input's entries, in the same order.
_SAME_ENTRIES = ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten")
#: Element-wise integer arithmetic and comparisons: an entry depends on the entries it meets.
_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Mod", "Max", "Min", "Equal", "Less", "Greater",
                "LessOrEqual", "GreaterOrEqual", "Not", "Neg", "Abs", "Where")
_REDUCE = ("ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin")
_TRACED = (*_SAME_ENTRIES, *_ELEMENTWISE, *_REDUCE, "Gather", "Slice", "Concat")
_MAX_TRACED = 512  # shape subgraphs are small; past this, everything counts as dependent


def channel_dependent(shape_node: onnx.NodeProto, axis: int, graph: Graph) -> set[str]:
    """Tensors computed from `shape_node` (a Shape or Size of a tensor whose channels sit on
    `axis`) whose value may change with the channel count. An LSTM's initial state built as
    ``Shape -> Gather(batch) -> Concat -> ConstantOfShape`` reads only the batch size: its
    value does not depend on the channels, so nothing downstream of it needs checking.

    Entries are traced through index arithmetic (Gather / Slice with constant indices,
    Concat, element-wise ops); anything not understood counts as dependent."""
    seed = _seed(shape_node, axis, graph)
    reach = _forward(shape_node.output[0], graph)
    taints: dict[str, Taint | None] = {shape_node.output[0]: seed}
    for node in graph.nodes:  # topological: inputs are known before the node
        outs = [o for o in node.output if o in reach and o not in taints]
        if outs:
            taint = _taint(node, graph, taints)
            for o in outs:
                taints[o] = taint
    return {t for t, v in taints.items() if v is None or any(v)}


def _seed(node: onnx.NodeProto, axis: int, graph: Graph) -> Taint | None:
    if node.op_type != "Shape":
        return [True]  # Size: the product of every dimension
    shape = graph.shape(node.input[0])
    if shape is None:
        return None
    rank = len(shape)
    start, end = attr(node, "start", 0), attr(node, "end", None)
    return [a == axis for a in range(rank)][slice(start, end)]


def _forward(start: str, graph: Graph) -> set[str]:
    """Tensors reachable from `start` through traced ops (their first hop included)."""
    todo, seen = [start], {start}
    while todo and len(seen) < _MAX_TRACED:
        for user in graph.consumers.get(todo.pop(), []):
            for o in user.output:
                if o and o not in seen:
                    seen.add(o)
                    if user.op_type in _TRACED:
                        todo.append(o)
    return seen


def _taint(node: onnx.NodeProto, graph: Graph, taints: dict[str, Taint | None]
           ) -> Taint | None:
    """The output's taint from the inputs' (an input not in `taints` is independent)."""
    ins = [taints.get(i, _clean(i, graph)) if i else [] for i in node.input]
    op = node.op_type
    if op not in _TRACED:  # any op of independent values is independent
        return _clean(node.output[0], graph) if all(t is not None and not any(t)
                                                     for t in ins) else None
    if op in _SAME_ENTRIES:
        return ins[0] if all(t is not None and not any(t) for t in ins[1:]) else None
    if op in _REDUCE:
        return None if any(t is None for t in ins) else [any(any(t) for t in ins)]
    if any(t is None for t in ins):
        return None
    if op == "Concat":
        return [e for t in ins for e in t]
    if op in ("Gather", "Slice"):
        return _indexed(node, graph, ins)
    if op in _ELEMENTWISE:
        n = max(len(t) for t in ins)
        if any(len(t) not in (1, n) for t in ins):
            return None
        return [any(t[k if len(t) > 1 else 0] for t in ins) for k in range(n)]
    return None


def _clean(name: str, graph: Graph) -> Taint | None:
    """An independent input: all-False entries of its length (None if unknown)."""
    value = value_of(name, graph)
    if value is not None:
        return [False] * len(value)
    shape = graph.shape(name)
    if shape is None or any(d is None for d in shape):
        return None
    size = 1
    for d in shape:
        size *= int(d)
    return [False] * size


def _indexed(node: onnx.NodeProto, graph: Graph, ins: list[Taint]) -> Taint | None:
    """Gather (axis 0) or Slice of a 1-D value with constant indices."""
    if any(any(t) for t in ins[1:]):
        return None  # an index that depends on the channel count
    data, n = ins[0], len(ins[0])
    index = [value_of(i, graph) if i else None for i in node.input[1:]]
    if node.op_type == "Gather":
        if int(attr(node, "axis", 0)) != 0 or index[0] is None or \
                not all(isinstance(i, int) and -n <= i < n for i in index[0]):
            return None
        return [data[i] for i in index[0]]
    if len(index) < 2 or any(v is None or not all(isinstance(x, int) for x in v)
                             for v in index) or (len(index) > 2 and index[2] not in ([0], [-1])):
        return None
    step = index[3][0] if len(index) > 3 else 1
    return data[slice(index[0][0], index[1][0], step)] if step else None
