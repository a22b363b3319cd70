"""Reshapes of torch's ``nn.MultiheadAttention`` that no Layout can describe in between.

Packed in-projection: one MatMul writes q, k and v side by side (3D channels); a Reshape
``[T, B, 3D] -> [T, B, 3, D]``, Unsqueeze / Transpose / Squeeze, then ``Gather(axis of
the 3, index k)`` picks one part. Each part is a piece of the producer's group (as a
Split would make it); the pieces are united, since one Reshape into ``(3, D')`` needs
every part to keep as many channels.

Heads merged with the batch: ``[T, B, H*d] -> [T, B*H, d]``, Transposes, then a Reshape
back to ``[B, H, T, d]``. The channels become heads (coarsened, channels/context.py) and
reappear on the head axis of the last Reshape.

In both chains the tensors in between get no layout: every one of them must have a
single reader of the chain (or a Shape reading only other dimensions), and the rewrite
gives the first and last Reshapes private targets.

    qkv (G, 144) -> Reshape [50, B, 3, 48] -> ... -> Gather k   => (G_k, 48), G_0=G_1=G_2
    q (Q, 48) -> Reshape [50, B*4, 12] -> Transpose -> Reshape [B, 4, 50, 12] => (Q, 4) axis 1
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from ...graph import Graph
from ...shape_taint import entry_taints
from ...shape_values import target_shape, value_of
from ..context import AnalysisContext
from ..layout import Layout, Segment
from ..structures import Unsupported
from .base import attr

Dim = int | str
_DYNAMIC = ("Reshape merges attention heads with the batch with a target no constant can "
            "replace (a dynamic sequence length; export with a static one to slim heads)")


def _dst(node: onnx.NodeProto, graph: Graph) -> list[Dim] | None:
    dst = target_shape(node, graph) or graph.symbolic_shape(node.output[0])
    return list(dst) if dst is not None else None


def _axes_of(node: onnx.NodeProto, graph: Graph) -> list[int] | None:
    axes = attr(node, "axes", None)
    if axes is None and len(node.input) > 1:
        value = graph.const(node.input[1])
        axes = value.tolist() if value is not None else None
    return list(axes) if axes is not None else None


def _moved(node: onnx.NodeProto, graph: Graph, axes: tuple[int, ...], rank: int
           ) -> tuple[tuple[int, ...], int] | None:
    """Where tracked `axes` land through a Transpose / Unsqueeze / Squeeze, and the rank."""
    if node.op_type == "Transpose":
        perm = list(attr(node, "perm", None) or range(rank - 1, -1, -1))
        return tuple(perm.index(a) for a in axes), rank
    ax = _axes_of(node, graph)
    if ax is None:
        return None
    if node.op_type == "Unsqueeze":
        new = rank + len(ax)
        kept = [i for i in range(new) if i not in {a % new for a in ax}]
        return tuple(kept[a] for a in axes), new
    if node.op_type == "Squeeze":
        gone = {a % rank for a in ax}
        if gone & set(axes):
            return None
        return tuple(a - sum(1 for g in gone if g < a) for a in axes), rank - len(gone)
    return None


def _harmless_shape(user: onnx.NodeProto, axes: tuple[int, ...], graph: Graph) -> bool:
    """A Shape whose values read only dimensions other than the tracked `axes`."""
    if user.op_type != "Shape" or attr(user, "start", None) is not None or \
            attr(user, "end", None) is not None or user.output[0] in graph.graph_outputs:
        return False
    rank = len(graph.shape(user.input[0]) or ())
    for reader in graph.consumers.get(user.output[0], []):
        index = graph.const(reader.input[1]) if reader.op_type == "Gather" else None
        if index is None or int(attr(reader, "axis", 0)) != 0 or \
                {int(i) % rank for i in index.ravel()} & set(axes):
            return False
    return True


def _chain(graph: Graph, name: str, axes: tuple[int, ...], rank: int
           ) -> tuple[str, tuple[int, ...], list[onnx.NodeProto]] | None:
    """Follow `name` through single-reader Transpose / Unsqueeze / Squeeze nodes; returns
    the last tensor, where the tracked axes are there, and its readers."""
    while True:
        if name in graph.graph_outputs:
            return None
        users = graph.consumers.get(name, [])
        main = [u for u in users if not _harmless_shape(u, axes, graph)]
        if len(main) != 1 or main[0].op_type not in ("Transpose", "Unsqueeze", "Squeeze"):
            return name, axes, main
        moved = _moved(main[0], graph, axes, rank)
        if moved is None:
            return None
        (axes, rank), name = moved, main[0].output[0]


def packed_split(node: onnx.NodeProto, ctx: AnalysisContext, parts: int, width: int,
                 head_axis: int) -> bool:
    """``[.., n*m, ..] -> [.., n, m, ..]`` whose n axis is only ever indexed by Gathers:
    each Gather output gets piece k of the channels. False when the pattern is not there."""
    graph, lay = ctx.graph, ctx.layout(node.input[0])
    found = _chain(graph, node.output[0], (head_axis, head_axis + 1), len(_dst(node, graph)))
    if found is None or not found[2]:
        return False
    _, (pn, pm), gathers = found
    picks = []
    for g in gathers:
        index = graph.const(g.input[1]) if g.op_type == "Gather" else None
        rank = len(graph.shape(g.input[0]) or ())
        if index is None or index.ndim != 0 or int(attr(g, "axis", 0)) % max(rank, 1) != pn:
            return False
        picks.append(int(index) % parts)
    if packed_target(node, graph, lay.axis) is None:
        raise Unsupported("Reshape into stacked parts with dimensions that cannot be copied")
    if lay.outer != 1 or any(s.stride != 1 for s in lay.segments) or \
            any(ctx.unit(g) != 1 for g in lay.groups()):
        raise Unsupported("Reshape into stacked parts of flattened features or heads")
    cut = ctx.cut(lay, [k * width for k in range(1, parts)])
    pieces = [cut.take(k * width, (k + 1) * width) for k in range(parts)]
    for piece in pieces[1:]:
        ctx.unify(pieces[0], piece, "Reshape into equal parts")
    axis = pm - (1 if pm > pn else 0)
    for g, k in zip(gathers, picks, strict=True):
        ctx.set_layout(g.output[0], ctx.expand(pieces[k]).with_axis(axis))
    return True


def packed_target(node: onnx.NodeProto, graph: Graph, axis: int) -> list[int] | None:
    """Private target of the stacking Reshape: copies before, n, -1, literals after."""
    src, dst = graph.symbolic_shape(node.input[0]), _dst(node, graph)
    if src is None or dst is None or len(dst) != len(src) + 1:
        return None
    after = dst[axis + 2:]
    if any(src[i] != dst[i] for i in range(axis)) or not isinstance(dst[axis], int) or \
            not all(isinstance(d, int) and d > 0 for d in after):
        return None
    return [0] * axis + [int(dst[axis]), -1] + [int(d) for d in after]


def merged_heads(node: onnx.NodeProto, ctx: AnalysisContext) -> bool:
    """``[.., B, H*d, ..] -> [.., B*H, d, ..]`` then Transposes and a Reshape back to
    ``[.., B, H, ..]``: the channels are heads on the last Reshape's head axis."""
    graph, lay = ctx.graph, ctx.layout(node.input[0])
    src, dst = graph.symbolic_shape(node.input[0]), _dst(node, graph)
    a = lay.axis
    if src is None or dst is None or len(src) != len(dst) or a == 0:
        return False
    d, size = dst[a], src[a]
    if not isinstance(d, int) or not isinstance(size, int) or d < 2 or size % d or \
            size // d < 2:
        return False
    heads = size // d
    if any(src[i] != dst[i] for i in range(len(src)) if i not in (a - 1, a)):
        return False
    if isinstance(dst[a - 1], int) and dst[a - 1] != (src[a - 1] if isinstance(
            src[a - 1], int) else -1) * heads:
        return False
    found = _chain(graph, node.output[0], (a - 1, a), len(dst))
    if found is None or len(found[2]) != 1 or found[2][0].op_type != "Reshape":
        return False
    end, (q, _), (last,) = found
    if last.input[0] != end or (_dst(last, graph) or [None] * (q + 2))[q + 1] != heads or \
            end_target(last, graph, q + 1, heads) is None or \
            start_target(node, graph, a) is None:
        raise Unsupported(_DYNAMIC)
    lay = ctx.coarsen(lay, d)
    segs = tuple(Segment(s.group, s.length, s.stride // d) if s.group is not None
                 else Segment(None, s.length * s.stride // d) for s in lay.segments)
    ctx.set_layout(last.output[0], Layout(q + 1, segs))
    return True


def batch_heads(node: onnx.NodeProto, ctx: AnalysisContext) -> bool:
    """``[.., B, H, X..] -> [.., B*H, X..]`` of heads, Transposes, then a Reshape back to
    ``[.., B, H, ..]`` (the dynamo exporter's Kᵀ inside scaled_dot_product_attention:
    ``[B, H, T, d] -> [B*H, T, d] -> [B*H, d, T] -> [B, H, d, T]``). The heads come back on
    the last Reshape's head axis; both targets become private constants."""
    graph, lay = ctx.graph, ctx.layout(node.input[0])
    src, dst = graph.symbolic_shape(node.input[0]), _dst(node, graph)
    a = lay.axis
    if src is None or dst is None or len(dst) != len(src) - 1 or a == 0 or \
            not lay.groups() or any(ctx.unit(g) == 1 for g in lay.groups()) or \
            lay.outer != 1 or any(s.stride != 1 for s in lay.segments):
        return False
    if list(dst[:a - 1]) != list(src[:a - 1]) or list(dst[a:]) != list(src[a + 1:]):
        return False
    merged, heads = dst[a - 1], src[a]
    if isinstance(merged, int) and not (isinstance(src[a - 1], int) and
                                        merged == src[a - 1] * heads):
        return False
    found = _chain(graph, node.output[0], (a - 1,), len(dst))
    if found is None or len(found[2]) != 1 or found[2][0].op_type != "Reshape":
        return False
    end, (q,), (last,) = found
    if last.input[0] != end or (_dst(last, graph) or [None] * (q + 2))[q + 1] != heads:
        return False
    if not _rewritable(last, graph, ctx.layout, lay, q + 1, heads) or \
            not _rewritable(node, graph, ctx.layout, lay, None, a - 1):
        raise Unsupported(_DYNAMIC)
    ctx.set_layout(last.output[0], Layout(q + 1, lay.segments))
    return True


LayoutOf = Callable[[str], Layout | None]


def _rewritable(node: onnx.NodeProto, graph: Graph, layout_of: LayoutOf, lay: Layout,
                head_axis: int | None, arg: int) -> bool:
    """A chain end Reshape gets a private constant target, or keeps a computed one that
    follows the head count by itself (`follows_heads`)."""
    if head_axis is None:
        return start_target(node, graph, arg) is not None or \
            follows_heads(node, graph, layout_of, lay, None, arg)
    return end_target(node, graph, head_axis, arg) is not None or \
        follows_heads(node, graph, layout_of, lay, head_axis, arg)


def follows_heads(node: onnx.NodeProto, graph: Graph, layout_of: LayoutOf, lay: Layout,
                  head_axis: int | None, arg: int) -> bool:
    """A computed target that needs no rewrite, with a dynamic sequence length T (dynamo's
    Kᵀ: ``[B, H, T, d] -> [-1, T, d]``, then ``Concat(Shape(k)[:2], d, T)``). Start
    (`head_axis` None, `arg` the merged axis): -1 there, every other entry reads no
    channels. End (`arg` the head count): the head entry is -1 or reads the head axis of a
    tensor with the same heads through Shape (so it follows their new count); the others
    read no channels. Reads of other channels, or 0 entries, are refused."""
    value = value_of(node.input[1], graph)
    if value is None or 0 in value or (head_axis is not None and head_axis >= len(value)):
        return False
    taints = entry_taints(node.input[1], graph, _seeds(node.input[1], graph, layout_of, lay))
    if taints is None or len(taints) != len(value):
        return False
    if head_axis is None:
        return value[arg] == -1 and value.count(-1) == 1 and not any(taints)
    rest = [t for i, t in enumerate(taints) if i != head_axis]
    head_follows = (value[head_axis] == -1 and value.count(-1) == 1) or \
        (value[head_axis] == arg and taints[head_axis] and -1 not in value)
    return head_follows and not any(rest)


def _seeds(target: str, graph: Graph, layout_of: LayoutOf, lay: Layout
           ) -> dict[str, int | None]:
    """Tensors with channels whose Shape the target reads: their channel axis when they
    carry the chain's heads (`lay`'s groups, whole heads), None for any other channels."""
    seeds: dict[str, int | None] = {}
    todo, seen = [target], set()
    while todo and len(seen) < 256:
        node = graph.producer.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type not in ("Shape", "Size"):
            todo.extend(i for i in node.input if i)
            continue
        other = layout_of(node.input[0])
        if other is not None:
            same = other.segments == lay.segments and other.outer == lay.outer
            seeds[node.input[0]] = other.axis if same and node.op_type == "Shape" else None
    return seeds


def start_target(node: onnx.NodeProto, graph: Graph, axis: int) -> list[int] | None:
    """Private target of ``[.., B, H*d, ..] -> [.., B*H, d, ..]``: -1 on the merged axis."""
    src, dst = graph.symbolic_shape(node.input[0]), _dst(node, graph)
    if src is None or dst is None or any(src[i] != dst[i] for i in range(axis - 1)):
        return None
    rest = dst[axis:]
    if not all(isinstance(v, int) and v > 0 for v in rest):
        return None
    return [0] * (axis - 1) + [-1] + [int(v) for v in rest]


def end_target(node: onnx.NodeProto, graph: Graph, head_axis: int, heads: int
               ) -> list[int] | None:
    """Private target of ``[.., B*H, ..] -> [.., B, H, ..]``: -1 for B, `heads`, and the
    other dimensions copied (same size at the same index) or literal."""
    src, dst = graph.symbolic_shape(node.input[0]), _dst(node, graph)
    q = head_axis - 1
    if src is None or dst is None or len(dst) != len(src) + 1 or not 0 <= q < len(src):
        return None
    if any(src[i] != dst[i if i < q else i + 1] for i in range(len(src)) if i != q):
        return None
    out = []
    for i, v in enumerate(dst):
        if i == q:
            out.append(-1)
        elif i == head_axis:
            out.append(heads)
        elif i < len(src) and src[i] == v:
            out.append(0)
        elif isinstance(v, int) and v > 0:
            out.append(v)
        else:
            return None
    return out
