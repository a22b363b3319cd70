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


def segment_of(groups: GroupSet, tensor: str, group: int) -> tuple[int, int] | None:
    """(segment index, first channel) of `group` in `tensor`, None if absent or repeated."""
    lay = groups.layouts[tensor]
    hits = [k for k, s in enumerate(lay.segments) if s.group == group]
    if len(hits) != 1:
        return None
    return hits[0], int(lay.channel_offsets()[hits[0]])


def consumers(graph: Graph, groups: GroupSet, tensor: str, group: int) -> list[ConsumerView]:
    where = segment_of(groups, tensor, group)
    if where is None:
        return []
    idx = groups.layouts[tensor].feature_index(where[0])
    views = []
    for node in graph.consumers.get(tensor, []):
        members = groups.roles.get(node.name, [])
        if any(m.role is Role.CONSUMER and m.tensor == tensor for m in members):
            handler = handler_for(node)
            w = handler.weight(node, graph).astype(np.float64)
            views.append(ConsumerView(node, handler, w[:, idx]))
    return views
