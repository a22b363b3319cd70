"""Tiny graph builders with known answers: plant redundancy, slim, check it is gone.

    b = Net((None, 3, 8, 8))           x ─ conv ─ relu ─ conv ─ (output)
    h = b.relu(b.conv(b.x, 6))         plant: filter 4 := 2.5 x filter 1
    y = b.conv(h, 4)                   => slimming removes exactly 1 channel
    b.scale_filter(h_conv, src=1, dst=4, factor=2.5)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Net:
    """Builds an ONNX graph node by node with seeded random weights kept editable."""

    def __init__(self, input_shape: Sequence[int | None], seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.weights: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple[int | None, ...]] = {"x": tuple(input_shape)}
        self.x = "x"
        self._n = 0

    # bookkeeping ---------------------------------------------------------------------
    def _name(self, op: str) -> str:
        self._n += 1
        return f"{op.lower()}{self._n}"

    def _const(self, base: str, value: np.ndarray) -> str:
        self.weights[base] = np.asarray(value, dtype=np.float32)
        return base

    def op(self, op: str, inputs: list[str], shape: tuple, domain: str = "", **attrs) -> str:
        out = self._name(op)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        self.shapes[out] = shape
        return out

    def channels(self, x: str) -> int:
        return int(self.shapes[x][1] if len(self.shapes[x]) != 3 else self.shapes[x][-1])

    # layers -------------------------------------------------------------------------
    def conv(self, x: str, out: int, k: int = 3, pad: int | None = None, bias: bool = True,
             group: int = 1, stride: int = 1) -> str:
        n, c, h, w = self.shapes[x]
        pad = k // 2 if pad is None else pad
        name = self._name("conv")
        wt = self.rng.standard_normal((out, c // group, k, k)) / np.sqrt(c // group * k * k)
        inputs = [x, self._const(f"{name}.w", wt)]
        if bias:
            inputs.append(self._const(f"{name}.b", 0.1 * self.rng.standard_normal(out)))
        ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        self.nodes.append(helper.make_node("Conv", inputs, [name], name=name, pads=[pad] * 4,
                                           group=group, strides=[stride, stride],
                                           kernel_shape=[k, k]))
        self.shapes[name] = (n, out, ho, wo)
        return name

    def gemm(self, x: str, out: int, trans_b: bool = True) -> str:
        n, k = self.shapes[x]
        name = self._name("gemm")
        wt = self.rng.standard_normal((out, k)) / np.sqrt(k)
        w = self._const(f"{name}.w", wt if trans_b else wt.T)
        b = self._const(f"{name}.b", 0.1 * self.rng.standard_normal(out))
        self.nodes.append(helper.make_node("Gemm", [x, w, b], [name], name=name,
                                           transB=int(trans_b)))
        self.shapes[name] = (n, out)
        return name

    def matmul(self, x: str, out: int, bias: bool = True) -> str:
        k = self.shapes[x][-1]
        name = self._name("matmul")
        w = self._const(f"{name}.w", self.rng.standard_normal((k, out)) / np.sqrt(k))
        self.nodes.append(helper.make_node("MatMul", [x, w], [name], name=name))
        self.shapes[name] = (*self.shapes[x][:-1], out)
        if not bias:
            return name
        return self.bias(name, axis=-1)

    def bias(self, x: str, axis: int = 1) -> str:
        c = self.shapes[x][axis]
        shape = [1] * len(self.shapes[x])
        shape[axis] = c
        b = self._const(f"{x}.bias", 0.1 * self.rng.standard_normal(shape))
        return self.op("Add", [x, b], self.shapes[x])

    def bn(self, x: str) -> str:
        c = self.shapes[x][1]
        name = self._name("bn")
        params = [self._const(f"{name}.scale", 1 + 0.2 * self.rng.standard_normal(c)),
                  self._const(f"{name}.bias", 0.1 * self.rng.standard_normal(c)),
                  self._const(f"{name}.mean", 0.1 * self.rng.standard_normal(c)),
                  self._const(f"{name}.var", 1 + 0.2 * self.rng.random(c))]
        return self.op("BatchNormalization", [x, *params], self.shapes[x])

    def act(self, x: str, op: str = "Relu", **attrs) -> str:
        return self.op(op, [x], self.shapes[x], **attrs)

    def relu(self, x: str) -> str:
        return self.act(x, "Relu")

    def add(self, a: str, b: str) -> str:
        return self.op("Add", [a, b], self.shapes[a])

    def concat(self, xs: list[str], axis: int = 1) -> str:
        shape = list(self.shapes[xs[0]])
        shape[axis] = sum(self.shapes[x][axis] for x in xs)
        return self.op("Concat", xs, tuple(shape), axis=axis)

    def flatten(self, x: str) -> str:
        n, *rest = self.shapes[x]
        return self.op("Flatten", [x], (n, int(np.prod(rest))), axis=1)

    def reshape_flat(self, x: str) -> str:
        n, *rest = self.shapes[x]
        size = int(np.prod(rest))
        shape = self._const(f"{x}.shape", np.array([-1, size]))
        self.weights[shape] = np.array([-1, size], dtype=np.int64)
        return self.op("Reshape", [x, shape], (n, size))

    def gap(self, x: str) -> str:
        n, c, *_ = self.shapes[x]
        return self.op("GlobalAveragePool", [x], (n, c, 1, 1))

    def maxpool(self, x: str) -> str:
        n, c, h, w = self.shapes[x]
        return self.op("MaxPool", [x], (n, c, h // 2, w // 2), kernel_shape=[2, 2],
                       strides=[2, 2])

    # planting -------------------------------------------------------------------------
    def _rows(self, layer: str) -> tuple[np.ndarray, np.ndarray | None, int]:
        """Weight, bias, and the axis of output channels of a producer."""
        node = next(n for n in self.nodes if n.output[0] == layer)
        w = self.weights[node.input[1]]
        b = self.weights.get(node.input[2]) if len(node.input) > 2 else None
        if node.op_type == "MatMul":
            bias_node = next((n for n in self.nodes if n.input[0] == layer and
                              n.op_type == "Add"), None)
            b = self.weights[bias_node.input[1]].reshape(-1) if bias_node else None
            return w, b, 1
        trans = any(a.name == "transB" and a.i for a in node.attribute)
        return w, b, 0 if node.op_type == "Conv" or trans else 1

    def scale_filter(self, layer: str, src: int, dst: int, factor: float) -> None:
        """Make output channel `dst` of `layer` exactly `factor` times channel `src`."""
        w, b, axis = self._rows(layer)
        np.moveaxis(w, axis, 0)[dst] = factor * np.moveaxis(w, axis, 0)[src]
        if b is not None:
            b[dst] = factor * b[src]

    def kill_filter(self, layer: str, ch: int, bias: float = 0.0) -> None:
        """Zero the weights of output channel `ch` (a constant channel equal to `bias`)."""
        w, b, axis = self._rows(layer)
        np.moveaxis(w, axis, 0)[ch] = 0
        if b is not None:
            b[ch] = bias

    # output ---------------------------------------------------------------------------
    def build(self, outputs: Sequence[str] | str, opset: int = 17,
              domains: Sequence[str] = ()) -> onnx.ModelProto:
        outputs = [outputs] if isinstance(outputs, str) else list(outputs)
        inits = [numpy_helper.from_array(v, k) for k, v in self.weights.items()]
        graph = helper.make_graph(
            self.nodes, "net",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(self.shapes["x"]))],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, list(self.shapes[o]))
             for o in outputs], inits)
        opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 10
        onnx.checker.check_model(model, full_check=True)
        return model


def cnn_input(c: int = 3, hw: int = 8) -> tuple[None, int, int, int]:
    return (None, c, hw, hw)
