"""The only pass that edits a model: applies a Plan through the op handlers.

Handlers stage new arrays and attributes here; nothing touches the model until every
handler has run. Then initializers are replaced, stale shapes dropped and re-inferred,
and the checker must accept the result.

An initializer several nodes read is edited per node: each handler computes its new value
from the original. When every reader staged the same value it replaces the original;
otherwise the readers whose value differs get private copies (and readers that did not
edit it keep the original), so no plan can make one node see another node's edit. The
analysis arranges that sharing nodes take the same plan (channels/groups.py), so copies
are the exception, never a wrong model.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from .channels.handlers import handler_for
from .channels.layout import Layout
from .channels.structures import GroupSet
from .errors import InternalError
from .graph import Graph, check, infer_shapes
from .lumping.plan import Plan

log = logging.getLogger(__name__)


class RewriteContext:
    """Staging area handed to handlers: read arrays, stage replacements, fold plans."""

    def __init__(self, graph: Graph, groups: GroupSet, plans: Plan,
                 analysis: Graph | None = None) -> None:
        self.graph = graph
        self.analysis = analysis or graph
        self.groups = groups
        self.plans = {g: p for g, p in plans.items() if p.changes}
        self.staged: dict[str, np.ndarray] = {}  # new initializers, by their new name
        self.edits: dict[str, dict[str, np.ndarray]] = {}  # initializer -> node -> value
        self.node: onnx.NodeProto | None = None  # the node whose handler is rewriting
        self.new_inputs: dict[tuple[str, int], str] = {}
        self.attrs: dict[tuple[str, str], object] = {}
        self.bias_after: dict[str, np.ndarray] = {}

    def touched(self, tensor: str) -> bool:
        lay = self.groups.layouts.get(tensor)
        return lay is not None and any(g in self.plans for g in lay.groups())

    def array(self, name: str) -> np.ndarray:
        """The original value: a node never sees another node's edit of a shared weight."""
        value = self.graph.const(name)
        if value is None:
            raise InternalError(f"{name} is not a constant")
        return value

    def stage(self, name: str, value: np.ndarray) -> None:
        """The current node's new value of initializer `name`."""
        if self.node is None:
            raise InternalError(f"{name} staged outside a handler's rewrite")
        self.edits.setdefault(name, {})[self.node.name] = \
            value.astype(self.graph.const(name).dtype, copy=False)

    def add_input(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
        """Give `node` a new constant input (a bias it lacked, a private Reshape shape)."""
        name = f"{node.name}__slim_in{index}"
        self.staged[name] = value
        self.new_inputs[(node.name, index)] = name

    def set_attr(self, node: onnx.NodeProto, name: str, value: object) -> None:
        """Set an attribute; None removes it (Split's num_outputs once sizes are given)."""
        self.attrs[(node.name, name)] = value

    def layout(self, tensor: str) -> Layout:
        return self.groups.layouts[tensor]

    def new_layout(self, tensor: str) -> Layout:
        lay = self.layout(tensor)
        return lay.resized({g: len(p.keep) for g, p in self.plans.items()})

    def keep_index(self, tensor: str) -> np.ndarray:
        """Element indices along the tensor's channel axis that survive, in order."""
        lay = self.layout(tensor)
        parts = []
        for k, seg in enumerate(lay.segments):
            idx = lay.feature_index(k)
            plan = self.plans.get(seg.group) if seg.group is not None else None
            parts.append((idx[plan.keep] if plan else idx).ravel())
        return np.sort(np.concatenate(parts))

    def fold(self, weight: np.ndarray, tensor: str) -> tuple[np.ndarray, np.ndarray]:
        """Fold the plans into `weight` laid out (out, in, ...) reading `tensor` on axis 1.
        Returns the new weight and the bias change (out,) from the plans' offsets."""
        old, new = self.layout(tensor), self.new_layout(tensor)
        rest = weight.shape[2:]
        out = np.zeros((weight.shape[0], new.size, *rest), dtype=np.float64)
        delta = np.zeros(weight.shape[0], dtype=np.float64)
        w64 = weight.astype(np.float64, copy=False)
        for k, seg in enumerate(old.segments):
            old_idx, new_idx = old.feature_index(k), new.feature_index(k)
            block = w64[:, old_idx]  # (out, C, q, *rest)
            plan = self.plans.get(seg.group) if seg.group is not None else None
            if plan is not None and tensor in plan.features:  # feature by feature (heads)
                mix, offset = plan.features[tensor]
                block = block.reshape(block.shape[0], -1, *rest)  # (out, C*q, *rest)
                delta += np.tensordot(block, offset, axes=([1], [0])).reshape(len(delta), -1).sum(1)
                block = np.moveaxis(np.tensordot(block, mix, axes=([1], [0])), -1, 1)
            elif plan is not None:
                mix, offset = plan.mix[tensor]
                delta += np.tensordot(block, offset, axes=([1], [0])).reshape(len(delta), -1).sum(1)
                block = np.moveaxis(np.tensordot(block, mix, axes=([1], [0])), -1, 1)
            out[:, new_idx.ravel()] = block.reshape(weight.shape[0], -1, *rest)
        return out.astype(weight.dtype), delta


def apply(model: onnx.ModelProto, graph: Graph, groups: GroupSet, plans: Plan, *,
          finalize: bool = True, analysis: Graph | None = None) -> onnx.ModelProto:
    """Return a new model with `plans` applied; `model` is left as it was.

    `finalize=False` skips shape inference and the checker: for intermediate models that
    are only run to gather statistics, never returned to the user. `analysis` is the graph
    the groups were built on, when `model` is only a slice of it (a refit stage): handlers
    read shapes and shape arithmetic there."""
    rw = RewriteContext(graph, groups, plans, analysis)
    if not rw.plans:
        return model
    for node in graph.nodes:
        if any(rw.touched(t) for t in [*node.input, *node.output]):
            rw.node = node
            handler_for(node).rewrite(node, rw)
    rw.node = None
    _resolve_edits(rw)
    return _materialize(model, rw, finalize)


def _resolve_edits(rw: RewriteContext) -> None:
    """Per-node edits of initializers -> replacements under the original name, plus
    private copies for readers whose value differs from it."""
    by_name = {n.name: n for n in rw.graph.nodes}
    for name, values in rw.edits.items():
        distinct: list[np.ndarray] = []
        which: dict[str, int] = {}  # reader -> index of its value in `distinct`
        for node_name, v in values.items():
            which[node_name] = next((i for i, d in enumerate(distinct) if _same(v, d)),
                                    len(distinct))
            if which[node_name] == len(distinct):
                distinct.append(v)
        readers = {n.name for n in rw.graph.consumers.get(name, [])}
        keeps_original = bool(readers - set(values)) or name in rw.graph.graph_outputs
        main = None if keeps_original else Counter(which.values()).most_common(1)[0][0]
        if main is not None:
            rw.staged[name] = distinct[main]
        for node_name, i in which.items():
            if i == main:
                continue
            rw.staged[f"{name}__slim_copy{i}"] = distinct[i]
            for index, inp in enumerate(by_name[node_name].input):
                if inp == name:
                    rw.new_inputs[(node_name, index)] = f"{name}__slim_copy{i}"
        if main is None or len(distinct) > 1:
            log.info("initializer %s: its %d readers take different values; private copies "
                     "written", name, len(readers))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))


def _materialize(model: onnx.ModelProto, rw: RewriteContext, finalize: bool) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for init in g.initializer:
        if init.name in rw.staged:
            init.CopyFrom(numpy_helper.from_array(rw.staged.pop(init.name), init.name))
    for name, value in rw.staged.items():
        g.initializer.append(numpy_helper.from_array(value, name))
    nodes, biases = [], {}
    for node in g.node:
        for (node_name, index), name in rw.new_inputs.items():
            if node_name == node.name:
                while len(node.input) <= index:
                    node.input.append("")
                node.input[index] = name
        for (node_name, attr_name), value in rw.attrs.items():
            if node_name == node.name:
                _set_attr(node, attr_name, value)
        nodes.append(node)
        if node.name in rw.bias_after:
            nodes.append(_bias_node(node, rw.bias_after[node.name], g, biases))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    _drop_dead(out)
    if not finalize:
        return out
    out = infer_shapes(out)
    check(out, "rewrite produced an invalid model")
    return out


def _set_attr(node: onnx.NodeProto, name: str, value: object) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    if value is not None:
        node.attribute.append(onnx.helper.make_attribute(name, value))


def _drop_dead(model: onnx.ModelProto) -> None:
    """Remove what the edits left unread: the originals of privately copied constants, the
    shape arithmetic behind Slice bounds now written as constants. Graph outputs stay."""
    g = model.graph
    graph = Graph(model)
    reads = {id(n): graph.inputs_of(n) for n in graph.nodes}
    nodes = list(g.node)
    while True:
        used = {o.name for o in g.output} | {t for n in nodes for t in reads[id(n)]}
        alive = [n for n in nodes if any(o in used for o in n.output if o)]
        if len(alive) == len(nodes):
            break
        nodes = alive
    if len(nodes) != len(g.node):
        del g.node[:]
        g.node.extend(nodes)
    listed = {i.name for i in g.input}
    inits = [t for t in g.initializer if t.name in used or t.name in listed]
    if len(inits) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(inits)


def _bias_node(node: onnx.NodeProto, bias: np.ndarray, g: onnx.GraphProto,
               biases: dict[tuple, str]) -> onnx.NodeProto:
    """MatMul has no bias input: route its output through a new Add carrying the offset.
    MatMuls sharing a weight take the same plan, so their offsets are equal: one
    initializer (`biases`, by value) serves them all."""
    original = node.output[0]
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    round_ = 0  # a later exact round may add another bias after the same MatMul
    while f"{node.name}__slim_bias{round_ or ''}" in taken or \
            f"{original}__slim_premerge{round_ or ''}" in taken:
        round_ += 1
    node.output[0] = f"{original}__slim_premerge{round_ or ''}"
    add = f"{node.name}__slim_bias{round_ or ''}"
    key = (bias.dtype.str, bias.shape, bias.tobytes())
    if key not in biases:
        biases[key] = add
        g.initializer.append(numpy_helper.from_array(bias, add))
    return onnx.helper.make_node("Add", [node.output[0], biases[key]], [original],
                                 name=f"{add}_add")
