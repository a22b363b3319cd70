"""The results of channel analysis: a leaf module every layer may import.

Groups, their members and roles, and the exception a handler raises when it cannot follow
channels through a node. Nothing here knows about ops or rewriting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .layout import Layout


class Role(Enum):
    PRODUCER = "producer"  # writes the channels: output rows are sliced
    CARRIER = "carrier"  # per-channel parameters are sliced
    CONSUMER = "consumer"  # reads the channels: the plan is folded into its weights


class Unsupported(Exception):
    """A handler cannot follow the channels through this node; the reason is shown to users."""


@dataclass
class Member:
    node: str
    role: Role
    tensor: str


@dataclass
class ChannelGroup:
    id: int
    size: int
    members: list[Member] = field(default_factory=list)
    read_points: list[str] = field(default_factory=list)
    frozen: str | None = None
    #: read points whose consumers share one weight: a plan must be the same at each
    ties: list[list[str]] = field(default_factory=list)
    #: features per channel: 1, or head_dim when a Reshape split the channels into
    #: attention heads (a channel is then a whole head, removed or kept as one)
    unit: int = 1


@dataclass
class GroupSet:
    """Result of the analysis: groups, each tensor's layout, each node's roles."""

    groups: dict[int, ChannelGroup]
    layouts: dict[str, Layout]
    roles: dict[str, list[Member]]

    def active(self) -> list[ChannelGroup]:
        return [g for g in self.groups.values() if g.frozen is None]
