"""What the consumers of a read point see: their weight blocks per channel of a group."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..channels.handlers import handler_for
from ..channels.handlers.linear import LinearHandler
from ..channels.structures import GroupSet, Role
from ..graph import Graph


@dataclass
class ConsumerView:
    node: onnx.NodeProto
    handler: LinearHandler
    block: np.ndarray  # (out, C, q, *kernel): weights reading each channel of the group

    @property
    def folds_offset(self) -> bool:
        return self.handler.can_fold_offset(self.node)

    def column_matrix(self) -> np.ndarray:
        """(C, out*q*kernel): everything channel c feeds, one row per channel."""
        b = np.moveaxis(self.block, 1, 0)
        return b.reshape(b.shape[0], -1)


def occurrences(groups: GroupSet, tensor: str, group: int) -> list[tuple[int, int]]:
    """(segment index, first channel) of every place `group` holds in `tensor`. A group can
    repeat in one tensor (a Concat of time steps that share a weight): one plan then holds
    at every occurrence, and statistics pool over them."""
    lay = groups.layouts[tensor]
    offsets = lay.channel_offsets()
    return [(k, int(offsets[k])) for k, s in enumerate(lay.segments) if s.group == group]


def consumers(graph: Graph, groups: GroupSet, tensor: str, group: int) -> list[ConsumerView]:
    """The weight blocks reading `group` in `tensor`: one view per consumer and occurrence."""
    lay = groups.layouts[tensor]
    views = []
    for node in graph.consumers.get(tensor, []):
        members = groups.roles.get(node.name, [])
        if any(m.role is Role.CONSUMER and m.tensor == tensor for m in members):
            handler = handler_for(node)
            w = handler.weight(node, graph).astype(np.float64)
            for k, _ in occurrences(groups, tensor, group):
                views.append(ConsumerView(node, handler, w[:, lay.feature_index(k)]))
    return views
