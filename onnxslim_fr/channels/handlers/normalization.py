"""LayerNormalization and GroupNormalization: normalizations whose statistics read several
channels at once, so a removed channel would change every output (ConvNeXt's
channels-last LayerNorm, a transformer's pre-norm, GroupNorm in diffusion UNets).

They freeze the channels they read with a reason that says so. The output is untracked: a
residual Add of it with tracked channels then freezes those too, which is right, since the
normalized channels feed the same trunk.
"""

from __future__ import annotations

import onnx

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


class GroupNormHandler(OpHandler):
    ops = ("GroupNormalization",)

    def propagate(self, node: onnx.NodeProto, ctx: AnalysisContext) -> None:
        raise Unsupported("GroupNormalization: each group's mean and variance read several "
                          "channels")


#: Handlers that only freeze, with the reason (not in SUPPORTED_OPS).
FREEZING = (LayerNormHandler(), GroupNormHandler())
