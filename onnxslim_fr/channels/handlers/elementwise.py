"""Element-wise activations: channels pass unchanged in position, each through f.

`kind` tells exact lumping what survives f: positive multiples through positively
homogeneous f (ReLU, LeakyReLU), sign flips through odd f (tanh, erf), exact duplicates
through any f. `fn` evaluates f on constants so constant channels fold exactly: with the
op's own formula (Gelu's tanh approximation) and rounding (Cast to float16 / bfloat16).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from scipy.special import erf

from ...graph import Graph
from ..context import AnalysisContext
from ..structures import Unsupported
from .base import Activation, OpHandler, Transfer, attr

Fn = Callable[[np.ndarray], np.ndarray]


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _activation(node: onnx.NodeProto, graph: Graph) -> Activation:
    op = node.op_type
    a = float(attr(node, "alpha", {"LeakyRelu": 0.01, "HardSigmoid": 0.2, "Elu": 1.0,
                                   "Selu": 1.67326319217681884765625,
                                   "Celu": 1.0}.get(op, 0.0)))
    if op in ("Relu", "LeakyRelu"):
        return Activation(lambda x: np.where(x > 0, x, a * x), "homogeneous")
    if op in ("Identity", "Dropout"):
        return Activation(lambda x: x, "homogeneous")
    if op in ("Tanh", "Erf", "Softsign", "Neg", "Sin", "Asinh", "Atan"):
        fns: dict[str, Fn] = {"Tanh": np.tanh, "Erf": erf, "Neg": np.negative,
                              "Softsign": lambda x: x / (1 + np.abs(x)), "Sin": np.sin,
                              "Asinh": np.arcsinh, "Atan": np.arctan}
        return Activation(fns[op], "odd")
    return Activation(_general(node, graph, a), "general")


def _general(node: onnx.NodeProto, graph: Graph, a: float) -> Fn:
    op = node.op_type
    if op == "HardSigmoid":
        b = float(attr(node, "beta", 0.5))
        return lambda x: np.clip(a * x + b, 0.0, 1.0)
    if op == "Elu":
        return lambda x: np.where(x > 0, x, a * (np.exp(np.minimum(x, 0)) - 1))
    if op == "Selu":
        g = float(attr(node, "gamma", 1.05070102214813232421875))
        return lambda x: g * np.where(x > 0, x, a * (np.exp(np.minimum(x, 0)) - 1))
    if op == "Clip":
        lo, hi = _clip_bounds(node, graph)
        return lambda x: np.clip(x, lo, hi)
    if op == "Gelu":
        if _text(attr(node, "approximate", "none")) == "tanh":
            return lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
        return lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2)))
    if op == "Cast":
        return _cast(int(attr(node, "to", onnx.TensorProto.FLOAT)))
    if op == "Pow":  # x ** 3 of a decomposed tanh GELU (GPT-2's gelu_new)
        e = float(graph.const(node.input[1]).reshape(-1)[0])
        return lambda x: np.power(x, e)
    table: dict[str, Fn] = {
        "Sigmoid": _sigmoid,
        "HardSwish": lambda x: x * np.clip(x / 6 + 0.5, 0.0, 1.0),
        "Softplus": _softplus,
        "Mish": lambda x: x * np.tanh(_softplus(x)),
        "Exp": np.exp,
        "Abs": np.abs,
    }
    return table[op]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cast(to: int) -> Fn:
    """Round a constant through the target type, as the runtime will (round to nearest
    even; bfloat16 keeps float32's exponent and 7 mantissa bits)."""
    if to == onnx.TensorProto.FLOAT16:
        return lambda x: np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float64)
    if to == onnx.TensorProto.BFLOAT16:
        return _to_bfloat16
    if to == onnx.TensorProto.FLOAT:
        return lambda x: np.asarray(x, dtype=np.float32).astype(np.float64)
    return lambda x: np.asarray(x, dtype=np.float64)


def _to_bfloat16(x: np.ndarray) -> np.ndarray:
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    finite = np.isfinite(np.asarray(x, dtype=np.float32))
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    out = np.where(finite, rounded, bits).astype(np.uint32).view(np.float32)
    return out.astype(np.float64)


def _clip_bounds(node: onnx.NodeProto, graph: Graph) -> tuple[float, float]:
    if len(node.input) == 1 and node.attribute:
        return float(attr(node, "min", -np.inf)), float(attr(node, "max", np.inf))
    bounds = []
    for i, default in ((1, -np.inf), (2, np.inf)):
        if len(node.input) > i and node.input[i]:
            value = graph.const(node.input[i])
            if value is None:
                raise Unsupported("Clip bounds are not constant")
            bounds.append(float(value))
        else:
            bounds.append(default)
    return bounds[0], bounds[1]


class ActivationHandler(OpHandler):
    ops = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu",
           "Softplus", "Softsign", "Clip", "Gelu", "Erf", "Mish", "Identity", "Dropout",
           "Neg", "Abs", "Exp", "Sin", "Asinh", "Atan", "Cast", "Pow")

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        if node.op_type == "Dropout" and len([o for o in node.output if o]) > 1 \
                and ctx.graph.consumers.get(node.output[1]):
            raise Unsupported("Dropout mask is used")
        if node.op_type == "Cast" and int(attr(node, "to", 1)) not in (1, 10, 11, 16):
            raise Unsupported("Cast to a non-float type")
        if node.op_type == "Clip":
            _clip_bounds(node, ctx.graph)
        if node.op_type == "Pow" and (ctx.layout(node.input[1]) is not None or
                                      ctx.graph.const(node.input[1]) is None or
                                      ctx.graph.const(node.input[1]).size != 1):
            raise Unsupported("Pow with an exponent that is not one constant")
        ctx.set_layout(node.output[0], ctx.layout(node.input[0]))

    def transfer(self, node: onnx.NodeProto, graph: Graph) -> Transfer:
        return _activation(node, graph)


HANDLERS = (ActivationHandler(),)
