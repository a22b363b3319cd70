"""LayerNormalization and GroupNormalization: normalizations whose statistics read several
channels at once, so a removed channel would change every output (ConvNeXt's
channels-last LayerNorm, a transformer's pre-norm, GroupNorm in diffusion UNets).

They freeze the channels they read with a reason that says so. The output is untracked: a
residual Add of it with tracked channels then freezes those too, which is right, since the
normalized channels feed the same trunk.

Below opset 18 exporters write GroupNorm as ``Reshape [N, G, -1] -> InstanceNormalization
-> Reshape back -> Mul gamma -> Add beta``; that Reshape freezes with the same reason.
"""

from __future__ import annotations

import onnx

from ...graph import Graph
from ..context import AnalysisContext
from ..structures import Unsupported
from .base import OpHandler, attr


class LayerNormHandler(OpHandler):
    ops = ("LayerNormalization",)

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        lay = ctx.layout(node.input[0])
        rank = ctx.rank(node.input[0])
        start = int(attr(node, "axis", -1)) % max(rank, 1)
        if lay is not None and lay.axis >= start:
            raise Unsupported("LayerNormalization over the channel axis: its mean and variance "
                              "read every channel")
        raise Unsupported("LayerNormalization of tracked channels over other axes")


GROUP_NORM = "GroupNormalization: each group's mean and variance read several channels"
GROUP_NORM_DECOMPOSED = ("GroupNormalization (Reshape [N, G, -1] -> InstanceNormalization): "
                         "each group's mean and variance read several channels")


def decomposed_group_norm(node: onnx.NodeProto, graph: Graph) -> bool:
    """A Reshape read only by InstanceNormalization: GroupNorm below opset 18."""
    users = graph.consumers.get(node.output[0], [])
    return node.op_type == "Reshape" and bool(users) and \
        all(u.op_type == "InstanceNormalization" for u in users)


class GroupNormHandler(OpHandler):
    ops = ("GroupNormalization",)

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        raise Unsupported(GROUP_NORM)


#: Handlers that only freeze, with the reason (not in SUPPORTED_OPS).
FREEZING = (LayerNormHandler(), GroupNormHandler())
