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
    return _selected(node, inputs)


def _selected(node: onnx.NodeProto, inputs: list[Value | None]) -> Value | None:
    """torch's ``expand(B, -1, T, T)`` target: ``Where(Equal(s, -1), 1, s)`` over a
    ``ConstantOfShape`` (a 1-D Reshape of the vector on the way). A dimension symbol is
    never negative, so it never equals the -1 it is compared with."""
    op = node.op_type
    if op == "ConstantOfShape":
        fill = attr(node, "value", None)  # none: float zeros, not a shape
        array = onnx.numpy_helper.to_array(fill) if fill is not None else None
        n = inputs[0][0] if len(inputs[0]) == 1 else None
        if array is None or array.dtype.kind not in "iu" or not isinstance(n, int) or \
                n > _MAX_LENGTH:
            return None
        return [int(array.reshape(-1)[0])] * n
    if op == "Reshape" and len(inputs) > 1 and inputs[1] is not None and len(inputs[1]) == 1:
        return inputs[0] if inputs[1][0] in (-1, len(inputs[0])) else None
    if op == "Equal" and len(inputs) == 2 and inputs[1] is not None:
        return _paired(inputs[0], inputs[1], _equal)
    if op == "Where" and len(inputs) == 3 and None not in inputs and \
            all(isinstance(c, int) for c in inputs[0]):
        n = max(len(v) for v in inputs)
        if any(len(v) not in (1, n) for v in inputs):
            return None
        pick = [v * n if len(v) == 1 else v for v in inputs]
        return [pick[1][k] if pick[0][k] else pick[2][k] for k in range(n)]
    return None


def _equal(x: Dim, y: Dim) -> Dim | None:
    if isinstance(x, int) and isinstance(y, int):
        return int(x == y)
    if x == y:
        return 1
    if (isinstance(x, int) and x < 0) or (isinstance(y, int) and y < 0):
        return 0  # a symbol is a dimension: never negative
    return None


def _paired(a: Value, b: Value, fn) -> Value | None:
    """`fn` entry by entry (one-entry values broadcast); None if any entry is unknown."""
    if len(a) != len(b) and 1 not in (len(a), len(b)):
        return None
    n = max(len(a), len(b))
    a, b = a * n if len(a) == 1 else a, b * n if len(b) == 1 else b
    out = [fn(x, y) for x, y in zip(a, b, strict=True)]
    return None if any(v is None for v in out) else out


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
    """Typed shapes for Reshape / Slice / Expand outputs shape inference left unknown,
    where the evaluated target, bounds or expanded shape tell them."""
    infos = []
    shapes = {"Reshape": target_shape, "Slice": sliced_shape, "Expand": expanded_shape,
              "Gemm": _gemm_shape}
    for node in graph.nodes:
        if node.op_type not in shapes:
            continue
        known = graph.symbolic_shape(node.output[0])
        dims = shapes[node.op_type](node, graph)
        if dims is None and node.op_type == "Reshape":
            dims = _read_width(node.output[0], graph)
        elem = graph.elem_type(node.input[0])
        if dims is not None and elem and _more_known(dims, known):
            infos.append(onnx.helper.make_tensor_value_info(node.output[0], elem, dims))
    return infos


def _read_width(name: str, graph: Graph) -> list[Dim] | None:
    """`name`'s shape with its last dimension set by a reader that fixes it: a MatMul with
    a constant 2-D weight of K rows runs only on inputs whose last dimension is K. The
    merge back of attention heads ``[B', T, H, d] -> [B, T, -1]`` (B' and B symbols that
    inference cannot tell equal) then has a known width, so B' = B (reshape_map.unify)."""
    dims = graph.symbolic_shape(name)
    if not dims or isinstance(dims[-1], int):
        return None
    for user in graph.consumers.get(name, []):
        weight = graph.const(user.input[1]) if user.op_type == "MatMul" and \
            len(user.input) > 1 and user.input[0] == name else None
        if weight is not None and weight.ndim == 2:
            return [*dims[:-1], int(weight.shape[0])]
    return None


def _gemm_shape(node: onnx.NodeProto, graph: Graph) -> list[Dim] | None:
    """[M, N] with A's row symbol: inference names M afresh, losing ``'B*16'``."""
    a, b = graph.symbolic_shape(node.input[0]), graph.symbolic_shape(node.input[1])
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    return [a[1] if attr(node, "transA", 0) else a[0], b[0] if attr(node, "transB", 0) else b[1]]


def expanded_shape(node: onnx.NodeProto, graph: Graph) -> list[Dim] | None:
    """Output shape of an Expand by broadcasting: an attention mask expanded to
    ``[B, 1, T, T]`` with a computed shape keeps its 1 on the head axis, which tells
    that the mask is the same for every head (channels/handlers/attention.py)."""
    src, target = graph.symbolic_shape(node.input[0]), value_of(node.input[1], graph)
    if src is None or target is None:
        return None
    n = max(len(src), len(target))
    a, b = [1] * (n - len(src)) + list(src), [1] * (n - len(target)) + list(target)
    out: list[Dim] = []
    for x, y in zip(a, b, strict=True):
        if x == 1 or x == y:
            out.append(y)
        elif y == 1 or (isinstance(y, str) and isinstance(x, int)):
            out.append(x)
        elif isinstance(y, int):
            out.append(y)  # a valid model: the symbol is 1 or y
        else:
            out.append(f"max({x},{y})")  # two symbols: a fresh one, equal to neither
    return out


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
    """Whether `dims` tells something `known` (shape inference's answer) does not: a
    number for a symbol, or a product of symbols (``'B*16'``, GPT-2's ``x.view(-1, C)``
    before its Gemm) for a fresh one, so the Reshape back to ``[B, 16, C']`` is told."""
    if known is None:
        return True
    return len(dims) == len(known) and any(
        (isinstance(d, int) and not isinstance(k, int)) or
        (isinstance(d, str) and "*" in d and isinstance(k, str) and "*" not in k
         and k not in dims) for d, k in zip(dims, known, strict=True))
