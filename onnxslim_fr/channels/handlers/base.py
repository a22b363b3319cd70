"""The handler contract and the per-channel transfer vocabulary exact lumping reads.

A handler knows one op family: how channels flow through it (`propagate`), which
initializers a rewrite would edit (`params`), what it does to each channel (`transfer`),
how to apply a plan to its weights (`rewrite`), and what one run of the op costs and how
many channels it writes (`cost`, `out_channels`), so the report and the budget count
exactly what the rewrite changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import onnx

from ...graph import Graph
from ..context import AnalysisContext
from ..layout import Layout
from ..structures import Unsupported


class RewriteContext(Protocol):
    """What a handler's `rewrite` may use: read arrays, stage replacements, fold plans.
    Declared here so the handler contract owns its interface (rewrite.py implements it)."""

    graph: Graph
    analysis: Graph  # the graph the groups were built on: shapes, shape arithmetic
    bias_after: dict[str, np.ndarray]

    def touched(self, tensor: str) -> bool: ...
    def array(self, name: str) -> np.ndarray: ...
    def stage(self, name: str, value: np.ndarray) -> None: ...
    def add_input(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None: ...
    def set_attr(self, node: onnx.NodeProto, name: str, value: object) -> None: ...
    def layout(self, tensor: str) -> Layout: ...
    def new_layout(self, tensor: str) -> Layout: ...
    def keep_index(self, tensor: str) -> np.ndarray: ...
    def fold(self, weight: np.ndarray, tensor: str) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class Affine:
    """y_c = scale_c * x_c + shift_c (BatchNormalization, bias Add, per-channel Mul...)."""

    scale: np.ndarray
    shift: np.ndarray


@dataclass(frozen=True)
class Activation:
    """y = f(x) element-wise. `homogeneous`: f(λt) = λ f(t) for λ > 0; `odd`: f(-t) = -f(t).
    `params` (C, k) are per-channel parameters two channels must share to stay related."""

    fn: Callable[[np.ndarray], np.ndarray]
    kind: Literal["homogeneous", "odd", "general"]
    params: np.ndarray | None = None


@dataclass(frozen=True)
class Spatial:
    """Pooling, Pad, Resize: per-channel maps over positions. `linear` ops commute with
    scaling of either sign, max-like ones only with positive scaling; `keeps_offset` is
    False when padding makes borders differ from a constant shift. The padded borders hold
    `border` (Pad's constant value): ``P_c(x) = P_0(x - c) + c``."""

    linear: bool
    keeps_offset: bool
    border: float = 0.0


@dataclass(frozen=True)
class Depthwise:
    """One spatial filter per channel: y_c = w_c * x_c + b_c."""

    weight: np.ndarray
    bias: np.ndarray
    padded: bool


@dataclass(frozen=True)
class Normalize:
    """Per-channel normalization over positions (InstanceNormalization): scale-invariant."""

    scale: np.ndarray
    shift: np.ndarray


@dataclass(frozen=True)
class Join:
    """Element-wise combination of two tracked tensors (residual Add/Sub, gating Mul)."""

    op: Literal["add", "sub", "mul"]


@dataclass(frozen=True)
class Take:
    """Split / Slice: output k is the element range ``ranges[k][axis]`` of the input along
    each axis it cuts with step 1. On the channel axis that is a run of channels (a slice
    of the input's relations); on any other axis it maps each channel over positions alone
    and keeps every relation, offsets included."""

    ranges: tuple[dict[int, tuple[int, int]], ...]


class Passthrough:
    """Channels are moved (Flatten, Transpose, Concat...) but not changed."""


Transfer = Affine | Activation | Spatial | Depthwise | Normalize | Join | Take | Passthrough

#: Shape of a tensor at the sizes being costed (None: unknown rank or dimension).
ShapeOf = Callable[[str], tuple[int | None, ...] | None]


class OpHandler:
    """Default: an op that only moves channels. Subclasses override what they know."""

    ops: tuple[str, ...] = ()

    def starts_group(self, node: onnx.NodeProto, graph: Graph) -> bool:
        """True for producers, which create channels from untracked inputs."""
        return False

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        raise Unsupported(f"no channel rule for {node.op_type}")

    def params(self, node: onnx.NodeProto, graph: Graph) -> list[str]:
        """Initializers a rewrite of this node edits; one shared by several nodes makes them
        take one plan (channels/groups.py)."""
        return []

    def transfer(self, node: onnx.NodeProto, graph: Graph) -> Transfer:
        return Passthrough()

    def rewrite(self, node: onnx.NodeProto, rw: RewriteContext) -> None:
        """Apply the plans to this node's parameters; default: nothing to edit."""

    def cost(self, node: onnx.NodeProto, graph: Graph, shape_of: ShapeOf
             ) -> tuple[int, int] | None:
        """(multiply-accumulates, weight elements) of one run at the shapes `shape_of` gives;
        `graph` tells which inputs are constant. None: the op is not counted (element-wise
        and per-channel ops cost next to nothing against the linear ops)."""
        return None

    def out_channels(self, node: onnx.NodeProto, graph: Graph) -> int | None:
        """Channels this node writes when it is a producer with constant weights, else None."""
        return None

    def input_share(self, node: onnx.NodeProto, graph: Graph) -> float:
        """Share of `cost`'s MACs that shrink with the input channels (LSTM: not the
        recurrent projection); the budget scales only that share."""
        return 1.0


def known(shape: tuple[int | None, ...] | None) -> bool:
    """A shape whose every dimension is known."""
    return shape is not None and all(d is not None for d in shape)


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def require_plain(ctx: AnalysisContext, name: str) -> None:
    """Per-channel parameters only make sense on an un-flattened channel axis."""
    lay = ctx.layout(name)
    if lay is not None and (lay.outer != 1 or any(s.stride != 1 for s in lay.segments)):
        raise Unsupported(f"per-channel op on flattened features of {name}")


def per_channel(value: np.ndarray, rank: int, axis: int, channels: int) -> np.ndarray | None:
    """A constant broadcast along the channel axis as a (C,) vector, or None if it is not
    per-channel (varies along another axis). Uniform constants come back with shape (1,)."""
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    for ax, n in enumerate(shape):
        if ax != axis and n != 1:
            return None
    n = shape[axis]
    if n not in (1, channels):
        return None
    return value.reshape(n).astype(np.float64)
