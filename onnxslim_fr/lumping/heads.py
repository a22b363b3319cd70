"""Exact lumping of attention heads (data-free): duplicate and dead heads.

A head group's channels are whole heads (channels/context.py, `unit` = head_dim), and
between its producers and its read points every op treats the heads alike: Reshape,
Transpose, the batched MatMuls, a scalar scale, a mask broadcast over heads, Softmax. Only
the members' parameters tell heads apart: the Q, K and V rows of each producer and the
per-channel vectors of each carrier (biases). So

- two heads whose parameters are equal everywhere (every occurrence, every member)
  compute the same values at every tensor of the group: one is removed and its
  consumer columns are added to the other's (mix row 1);
- a head whose values are exactly 0 at a read point (its V rows and V bias are 0, so
  ``P @ V`` is 0 whatever the probabilities) is removed with a zero row.

Positive multiples are not lumped (a scaled Q or K changes the softmax).
"""

from __future__ import annotations

import numpy as np
import onnx

from ..channels.handlers import handler_for
from ..channels.handlers.base import Take, per_channel
from ..channels.structures import ChannelGroup, GroupSet, Role
from ..graph import Graph
from .consumers import occurrences
from .plan import GroupPlan, removal_plan
from .relations import row_labels

#: Ops that move elements without changing them and keep the channel axis's elements.
_MOVES = ("Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout")


def plan_heads(graph: Graph, groups: GroupSet, group: ChannelGroup) -> GroupPlan | None:
    """Remove duplicate and dead heads of a head group; None when nothing is removable."""
    points = group.read_points
    signature = _signatures(graph, groups, group)
    if not points or signature is None:
        return None
    labels = row_labels(signature)
    dead = [all(_zero_head(graph, groups, group, p, h) for p in points)
            for h in range(group.size)]
    targets: dict[int, int | None] = {}
    for h in range(group.size):
        if dead[h]:
            targets[h] = None
        elif labels[h] != h:
            targets[h] = int(labels[h])
    if not targets:
        return None
    keep = np.array([h for h in range(group.size) if h not in targets])
    if keep.size == 0:
        keep = np.array([min(targets)])
        targets.pop(int(keep[0]))
    col = {int(k): i for i, k in enumerate(keep)}
    removed = sorted(targets)
    mix = np.zeros((len(removed), len(keep)))
    for i, h in enumerate(removed):
        if targets[h] is not None:
            mix[i, col[targets[h]]] = 1.0
    rows = {p: (mix, np.zeros(len(removed))) for p in points}
    return removal_plan(group.size, keep, points, rows, "exact")


def _signatures(graph: Graph, groups: GroupSet, group: ChannelGroup) -> np.ndarray | None:
    """(heads, n): every parameter of every producer and carrier that touches each head.
    None when a member's parameters cannot be laid out per head."""
    nodes = {n.name: n for n in graph.nodes}
    parts: list[np.ndarray] = []
    for m in group.members:
        if m.role not in (Role.PRODUCER, Role.CARRIER):
            continue
        node = nodes[m.node]
        handler = handler_for(node)
        lay = groups.layouts[m.tensor]
        if m.role is Role.PRODUCER:
            values = [handler.weight(node, graph), handler.bias(node, graph)]
        else:
            values = [graph.const(n) for n in handler.params(node, graph)]
        for value in values:
            flat = np.asarray(value, dtype=np.float64).reshape(-1)
            if flat.size == 1:
                continue  # the same for every head
            if flat.size % lay.size:
                return None
            per_element = flat.reshape(lay.size, -1)
            for k, _ in occurrences(groups, m.tensor, group.id):
                block = per_element[lay.feature_index(k)]  # (heads, q, m)
                parts.append(block.reshape(group.size, -1))
    return np.concatenate(parts, axis=1) if parts else None


def _zero_head(graph: Graph, groups: GroupSet, group: ChannelGroup, point: str,
               head: int) -> bool:
    """Whether head `head` is exactly 0 at read point `point`, for every input."""
    lay = groups.layouts[point]
    places = occurrences(groups, point, group.id)
    return bool(places) and all(
        _zero(graph, groups, group, point, head, lay.feature_index(k)[head])
        for k, _ in places)


def _zero(graph: Graph, groups: GroupSet, group: ChannelGroup, tensor: str, head: int,
          idx: np.ndarray, depth: int = 0) -> bool:
    """Whether elements `idx` of `tensor`'s channel axis (one head) are exactly 0: walk
    back to the producer through ops that keep zeros (never through a nonlinearity)."""
    node = graph.producer.get(tensor)
    if node is None or depth > 64:
        return False
    if any(m.role is Role.PRODUCER and m.tensor == tensor
           for m in groups.roles.get(node.name, [])):
        handler = handler_for(node)
        return not np.any(handler.weight(node, graph)[idx]) and \
            not np.any(handler.bias(node, graph)[idx])
    tracked = [i for i in node.input if i in groups.layouts]
    if len(tracked) != 1 and not (node.op_type == "MatMul" and len(tracked) == 2):
        return False
    source = tracked[-1]  # MatMul(P, V): V's head is 0, so the product is
    if node.op_type in _MOVES or _scales(graph, node, source):
        return _zero(graph, groups, group, source, head, idx, depth + 1)
    if node.op_type in ("Reshape", "MatMul"):
        return _recompute(graph, groups, group, source, head, depth)
    if node.op_type in ("Add", "Sub"):
        return _zero_shift(graph, groups, node, source, idx) and \
            _zero(graph, groups, group, source, head, idx, depth + 1)
    if node.op_type in ("Split", "Slice"):
        return _zero_taken(graph, groups, group, node, tensor, head, idx, depth)
    return False


def _scales(graph: Graph, node: onnx.NodeProto, source: str) -> bool:
    """A Mul by anything finite, or a Div by a constant with no zero: 0 stays 0."""
    if node.op_type == "Mul":
        return True
    divisor = graph.const(node.input[1]) if node.op_type == "Div" else None
    return node.input[0] == source and divisor is not None and bool(np.all(divisor != 0))


def _recompute(graph: Graph, groups: GroupSet, group: ChannelGroup, source: str, head: int,
               depth: int) -> bool:
    """The head's elements in `source` from its layout (one occurrence of the group)."""
    places = occurrences(groups, source, group.id)
    if len(places) != 1:
        return False
    idx = groups.layouts[source].feature_index(places[0][0])[head]
    return _zero(graph, groups, group, source, head, idx, depth + 1)


def _zero_shift(graph: Graph, groups: GroupSet, node: onnx.NodeProto, source: str,
                idx: np.ndarray) -> bool:
    """An Add / Sub of a constant that is 0 at the head's elements."""
    other = node.input[1] if node.input[0] == source else node.input[0]
    const = graph.const(other)
    lay = groups.layouts[source]
    if const is None:
        return False
    vec = per_channel(const, len(graph.shape(source) or ()), lay.axis, lay.size)
    return vec is not None and not np.any(vec if vec.size == 1 else vec[idx])


def _zero_taken(graph: Graph, groups: GroupSet, group: ChannelGroup, node: onnx.NodeProto,
                tensor: str, head: int, idx: np.ndarray, depth: int) -> bool:
    """Split / Slice: output elements [a, b) of the input along each cut axis."""
    take = handler_for(node).transfer(node, graph)
    if not isinstance(take, Take):
        return False
    ranges = take.ranges[list(node.output).index(tensor)]
    axis = groups.layouts[node.input[0]].axis
    shift = ranges[axis][0] if axis in ranges else 0
    return _zero(graph, groups, group, node.input[0], head, idx + shift, depth + 1)
