"""Which entries of a small integer value (a Reshape target, a Slice bound) read the
channel axis of a tensor through Shape / Size: those change when channels are removed.
Values are evaluated in shape_values.py; this module only traces dependence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from .shape_values import attr, value_of

if TYPE_CHECKING:
    from .graph import Graph

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


def _computing(target: str, graph: Graph) -> dict[str, onnx.NodeProto]:
    """The nodes `target` is computed by, by name, back to the Shape / Size nodes it reads."""
    todo, needed = [target], {}
    while todo and len(needed) < _MAX_TRACED:
        node = graph.producer.get(todo.pop())
        if node is not None and node.name not in needed:
            needed[node.name] = node
            if node.op_type not in ("Shape", "Size"):
                todo.extend(i for i in node.input if i)
    return needed


def shape_reads(target: str, graph: Graph) -> set[str]:
    """The tensors whose Shape / Size `target` is computed from."""
    return {n.input[0] for n in _computing(target, graph).values()
            if n.op_type in ("Shape", "Size")}


def entry_taints(target: str, graph: Graph, seeds: dict[str, int | None]) -> Taint | None:
    """Per entry of the small integer value `target`: does it read the channel axis of a
    tensor in `seeds` (tensor -> its channel axis) through a Shape? A Shape of a seed
    mapped to None (channels of another group) makes every entry it reaches unknown;
    None: not told. A dynamo Kᵀ target ``Concat(Shape(k)[:2], d, T)`` is
    ``[False, True, False, False]`` when k carries its heads on axis 1."""
    needed = _computing(target, graph)
    taints: dict[str, Taint | None] = {}
    for node in graph.nodes:  # topological: inputs are known before the node
        if node.name not in needed:
            continue
        source = node.input[0] if node.op_type in ("Shape", "Size") else None
        if source in seeds:
            axis = seeds[source]
            taint = None if axis is None else _seed(node, axis, graph)
        elif source is not None:  # the dimensions of a tensor without channels
            taint = _clean(node.output[0], graph)
        else:
            taint = _taint(node, graph, taints)
        for out in node.output:
            taints[out] = taint
    return taints.get(target, _clean(target, graph))
