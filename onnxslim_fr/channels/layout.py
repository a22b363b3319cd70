"""How a tensor's channel axis maps onto channel groups.

A tensor's channel axis is a sequence of segments, each a run of one group's channels
(`group=None`: channels no group owns, left untouched). Flatten turns one channel into a
block of `stride` features; flattening channels-last data repeats the whole channel axis
`outer` times. Feature index of (repeat o, segment k, channel c, position p) is
``o * unit + offset_k + c * stride_k + p`` with ``unit = sum(length * stride)``.

Worked example: Concat of a 2-channel and a 3-channel map, then Flatten of 4x4 maps:
segments ``(A, 2, 16), (B, 3, 16)``; channel 1 of B covers features 48..63.

Split and Slice take element ranges of the axis (`take`); the analysis first refines the
groups so that every cut falls on a segment boundary (channels/context.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from itertools import pairwise

import numpy as np


@dataclass(frozen=True)
class Segment:
    group: int | None
    length: int
    stride: int = 1


@dataclass(frozen=True)
class Layout:
    axis: int
    segments: tuple[Segment, ...]
    outer: int = 1

    @property
    def channels(self) -> int:
        return sum(s.length for s in self.segments)

    @property
    def unit(self) -> int:
        return sum(s.length * s.stride for s in self.segments)

    @property
    def size(self) -> int:
        """Length of the axis in elements (features after a Flatten)."""
        return self.outer * self.unit

    def groups(self) -> list[int]:
        return [s.group for s in self.segments if s.group is not None]

    def channel_offsets(self) -> list[int]:
        """First channel index of each segment in the per-channel view."""
        return list(np.cumsum([0] + [s.length for s in self.segments[:-1]]))

    def with_axis(self, axis: int) -> Layout:
        return replace(self, axis=axis)

    def flattened(self, inner: int, outer: int) -> Layout:
        """Layout after merging `outer` positions before and `inner` after the channel axis."""
        segs = tuple(replace(s, stride=s.stride * inner) for s in self.segments)
        return Layout(self.axis, segs, self.outer * outer)

    def resized(self, lengths: Mapping[int, int]) -> Layout:
        """The same layout with some groups shortened to a new channel count."""
        segs = tuple(replace(s, length=lengths.get(s.group, s.length)) if s.group is not None
                     else s for s in self.segments)
        return replace(self, segments=segs)

    def boundaries(self) -> list[int]:
        """Element offsets (within one repeat) where segments start, and the unit's end."""
        return [int(x) for x in np.cumsum([0] + [s.length * s.stride for s in self.segments])]

    def take(self, start: int, stop: int) -> Layout:
        """The element range [start, stop) of the axis as a layout of its own. Tracked
        segments must not be cut (refine their groups first); untracked ones are cut at
        whole channels. ValueError otherwise."""
        if self.outer != 1 and (start, stop) != (0, self.size):
            raise ValueError("range of channels-last flattened features")
        segs: list[Segment] = []
        for seg, (lo, hi) in zip(self.segments, pairwise(self.boundaries()), strict=True):
            a, b = max(lo, start), min(hi, stop)
            if a >= b:
                continue
            if (a, b) != (lo, hi) and (seg.group is not None or (a - lo) % seg.stride
                                       or (b - lo) % seg.stride):
                raise ValueError(f"range [{start}, {stop}) cuts a segment")
            segs.append(replace(seg, length=(b - a) // seg.stride))
        return Layout(self.axis, tuple(segs), self.outer if segs else 1)

    def channel_span(self, start: int, stop: int) -> tuple[int, int]:
        """Channel indices (per-channel view) of the element range [start, stop), which
        must fall on whole channels of an axis with no repeats."""
        if self.outer != 1 and (start, stop) != (0, self.size):
            raise ValueError("range of channels-last flattened features")

        def channel(pos: int) -> int:
            first = 0
            for seg, (lo, hi) in zip(self.segments, pairwise(self.boundaries()), strict=True):
                if lo <= pos < hi:
                    return first + (pos - lo) // seg.stride
                first += seg.length
            return first

        return channel(start), channel(stop)

    def feature_index(self, k: int) -> np.ndarray:
        """Element indices along the axis covered by segment k: shape (length, outer*stride)."""
        seg = self.segments[k]
        start = sum(s.length * s.stride for s in self.segments[:k])
        c = np.arange(seg.length)[:, None, None] * seg.stride
        o = np.arange(self.outer)[None, :, None] * self.unit
        p = np.arange(seg.stride)[None, None, :]
        return (start + c + o + p).reshape(seg.length, self.outer * seg.stride)


def concat(layouts: list[Layout], axis: int) -> Layout:
    """Layout of a Concat along the channel axis of inputs with no flattening."""
    segs: list[Segment] = []
    for lay in layouts:
        segs.extend(lay.segments)
    return Layout(axis, tuple(segs))


def opaque(axis: int, length: int) -> Layout:
    """A channel axis no group owns (e.g. a graph input joined by Concat)."""
    return Layout(axis, (Segment(None, length),))
