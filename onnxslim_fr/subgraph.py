"""Pieces of a graph as runnable models: extra outputs for read points, and the slice that
computes some tensors from others (a stage pays only for the layers since its inputs)."""

from __future__ import annotations

import onnx

from .graph import Graph


def with_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs `tensors`, each declared with its real element
    type (a float16 read point declared FLOAT is rejected by onnxruntime)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    types = _ElemTypes(model)
    for name in tensors:
        if name not in have:
            out.graph.output.append(onnx.helper.make_tensor_value_info(
                name, types[name], None))
    return out


_INT64_OPS = ("Shape", "Size", "ArgMax", "ArgMin", "NonZero")
_BOOL_OPS = ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or",
             "Xor", "IsNaN", "IsInf")


class _ElemTypes:
    """Element type of a tensor by name: declared (inputs, outputs, value_info), an
    initializer's, or derived from the node that writes it; FLOAT when nothing says."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.known = {t.name: t.data_type for t in g.initializer}
        for vi in [*g.input, *g.value_info, *g.output]:
            if vi.type.tensor_type.elem_type:
                self.known[vi.name] = vi.type.tensor_type.elem_type
        self.producer = {o: n for n in g.node for o in n.output if o}

    def __getitem__(self, name: str) -> int:
        for _ in range(64):  # walk back through type-preserving ops
            if name in self.known:
                return self.known[name]
            node = self.producer.get(name)
            if node is None:
                break
            if node.op_type == "Cast":
                return next(a.i for a in node.attribute if a.name == "to")
            if node.op_type in _INT64_OPS:
                return onnx.TensorProto.INT64
            if node.op_type in _BOOL_OPS:
                return onnx.TensorProto.BOOL
            name = node.input[1] if node.op_type == "CastLike" else \
                next((i for i in node.input if i), "")
        return onnx.TensorProto.FLOAT


def slice_of(graph: Graph, outputs: list[str], available: frozenset[str] | set[str]
             ) -> tuple[list[onnx.NodeProto], list[str]]:
    """The nodes computing `outputs` from the graph inputs and the `available` tensors, in
    graph order, and the tensors among those that they read (the slice's inputs)."""
    declared = {i.name for i in graph.model.graph.input if i.name not in graph.initializers}
    wanted, todo, seen, frontier = [], list(outputs), set(), {}
    while todo:
        name = todo.pop()
        if name in available or name in declared:
            frontier[name] = None
            continue
        node = graph.producer.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        wanted.append(node)
        todo.extend(graph.inputs_of(node))
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    made = {o for n in wanted for o in n.output}  # a Split computing one output makes all
    return sorted(wanted, key=lambda n: order[id(n)]), [t for t in frontier if t not in made]


def cut(graph: Graph, outputs: list[str], available: frozenset[str] | set[str] = frozenset()
        ) -> onnx.ModelProto:
    """The slice computing `outputs` as a model whose inputs are the tensors it reads: a
    stage that reads one layer pays for the layers since the last values it has, not for
    the whole model."""
    model = graph.model
    nodes, reads = slice_of(graph, outputs, available)
    declared = {i.name: i for i in model.graph.input}
    names = {t for n in nodes for t in graph.inputs_of(n)}
    types = _ElemTypes(model)
    g = onnx.helper.make_graph(
        nodes, model.graph.name,
        [declared.get(t) or onnx.helper.make_tensor_value_info(t, types[t], None)
         for t in reads],
        [onnx.helper.make_tensor_value_info(t, types[t], None) for t in outputs],
        [graph.initializers[n] for n in sorted(names) if n in graph.initializers])
    return onnx.helper.make_model(g, opset_imports=model.opset_import,
                                  ir_version=model.ir_version)
