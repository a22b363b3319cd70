"""Reshape targets made private to their Reshape before analysis, so a rewrite of one
view's channel count never reaches another view that reads the same computed target."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx


def _readers(g: onnx.GraphProto) -> Counter[str]:
    """How many of this graph's node inputs read each tensor. Reads inside subgraphs are not
    counted; they are safe because the originals are never edited, only copied."""
    return Counter(name for node in g.node for name in node.input)


def unshare_reshape_targets(model: onnx.ModelProto) -> None:
    """Give every Reshape whose computed target (a Concat of shape values) other nodes read
    too its own copy of that Concat, in place.

    The dynamo exporter computes `Concat(N, T, C)` once and feeds it to several Reshapes
    (GPT-2's views before and after attention); a Reshape whose channel count changes
    needs its target rewritten, which a shared value cannot take, so the group froze.
    Copies compute the same values: the function is unchanged."""
    g = model.graph
    readers = _readers(g)
    made = {n.output[0]: n for n in g.node if n.op_type == "Concat" and len(n.output) == 1}
    nodes: list[onnx.NodeProto] = []
    copies = 0
    for node in g.node:
        target = node.input[1] if node.op_type == "Reshape" and len(node.input) > 1 else ""
        if target in made and readers[target] > 1:
            copy = onnx.NodeProto()
            copy.CopyFrom(made[target])
            copies += 1
            copy.name, copy.output[0] = "", f"{target}__private{copies}"
            del copy.metadata_props[:]  # dynamo's stack traces: 2 kB a node, the file grew
            copy.doc_string = ""
            node.input[1] = copy.output[0]
            readers[target] -= 1
            nodes.append(copy)
        nodes.append(node)
    if copies:
        del g.node[:]
        g.node.extend(nodes)
    _private_literals(model)


def _private_literals(model: onnx.ModelProto) -> None:
    """The small constant parts of Reshape-only Concat targets, copied where other nodes
    read them too (the dynamo exporter shares one `[64]` among every view of a width), so
    the literal channel count can be rewritten in this target alone."""
    g = model.graph
    readers = _readers(g)
    inits = {t.name: t for t in g.initializer}
    targets = {n.input[1] for n in g.node if n.op_type == "Reshape" and len(n.input) > 1}
    copies = 0
    for node in g.node:
        if node.op_type != "Concat" or node.output[0] not in targets:
            continue
        for k, name in enumerate(node.input):
            t = inits.get(name)
            if t is None or readers[name] <= 1 or np.prod(t.dims) > 8:
                continue
            copy = onnx.TensorProto()
            copy.CopyFrom(t)
            copies += 1
            copy.name = f"{name}__private{copies}"
            g.initializer.append(copy)
            node.input[k] = copy.name
            readers[name] -= 1
