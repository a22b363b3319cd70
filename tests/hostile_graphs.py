"""The graph builder of the hostile-model tests: nodes by op name, initializers by value.

Unlike builders.Net it tracks no shapes: shape inference types the outputs, so any legal
op goes in as written (computed Splits, ai.onnx.ml, GroupNormalization-21).

    g = OpBuilder()
    a = g.op("Relu", [g.conv("x", 8, 8, plant=[(1, 4, 2.0)])])   # filter 4 := 2 x filter 1
    model = g.build([g.conv(a, 8, 4)])                            # x [b, 8, 6, 6]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

#: (src, dst, f): output filter dst := f x filter src (weights and bias).
Plant = Sequence[tuple[int, int, float]]


class OpBuilder:
    """Named nodes with seeded weights; every node named after its op and position."""

    def __init__(self, opset: int = 17, seed: int = 0, rank: int = 4,
                 x: Sequence[int | str | None] = ("b", 8, 6, 6)) -> None:
        self.rng, self.opset, self.rank = np.random.default_rng(seed), opset, rank
        self.x = list(x)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def c(self, value: object) -> str:
        """An initializer holding `value` as given (dtype included)."""
        name = f"c{len(self.inits)}"
        self.inits.append(nh.from_array(np.asarray(value), name))
        return name

    def op(self, op: str, inputs: list[str], outputs: int = 1, **attrs: object
           ) -> str | list[str]:
        name = f"{op.lower()}{len(self.nodes)}"
        outs = [name] if outputs == 1 else [f"{name}_{i}" for i in range(outputs)]
        self.nodes.append(h.make_node(op, inputs, outs, name=name, **attrs))
        return name if outputs == 1 else outs

    def conv(self, x: str, cin: int, cout: int, group: int = 1, plant: Plant = ()) -> str:
        """3x3 conv, padded to keep the size. The plant is applied in float32: exact for the
        factors 1, -1, 2 and 1/2, and the float32 multiple for any other."""
        w = self.rng.standard_normal((cout, cin // group, 3, 3)) / np.sqrt(9 * cin / group)
        w = w.astype(np.float32)
        b = (0.1 * self.rng.standard_normal(cout)).astype(np.float32)
        for src, dst, f in plant:
            w[dst], b[dst] = f * w[src], f * b[src]
        return self.op("Conv", [x, self.c(w), self.c(b)], pads=[1] * 4, kernel_shape=[3, 3],
                       group=group)

    def build(self, outputs: list[str], inputs: list[onnx.ValueInfoProto] | None = None,
              domains: Sequence[str] = ()) -> onnx.ModelProto:
        """The checked model; `inputs` default to one float `x` of the constructor's shape.
        Outputs are typed by shape inference; one it cannot shape (a computed Split,
        GroupNormalization-21) gets float and the builder's rank."""
        inputs = inputs or [h.make_tensor_value_info("x", T.FLOAT, self.x)]
        outs = [h.make_tensor_value_info(o, T.FLOAT, None) for o in outputs]
        opsets = [h.make_opsetid("", self.opset)] + [h.make_opsetid(d, 1) for d in domains]
        model = h.make_model(h.make_graph(self.nodes, "hostile", inputs, outs, self.inits),
                             opset_imports=opsets, ir_version=10)
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.output}
        for out in model.graph.output:
            out.type.CopyFrom(inferred[out.name].type)
            if not out.type.tensor_type.HasField("shape"):
                out.type.tensor_type.elem_type = T.FLOAT
                out.type.tensor_type.shape.dim.extend([onnx.TensorShapeProto.Dimension()] *
                                                      self.rank)
        onnx.checker.check_model(model, full_check=True)
        return model
