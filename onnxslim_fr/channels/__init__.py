"""Channel analysis: pure functions of the graph, never editing it."""

from .groups import ChannelGroup, GroupSet, Member, Role, build_groups

__all__ = ["ChannelGroup", "GroupSet", "Member", "Role", "build_groups"]
