"""Where a Reshape sends the channel axis, from symbolic input and output shapes alone.

Exporters compute Reshape targets (``Shape -> Gather -> Concat -> Reshape``), so the target
is rarely a constant; onnx's data propagation still gives the output shape with symbols
for the dynamic dimensions (``['B', 'T', 4, 16]``). Matching the two shapes block by block
(runs of axes with equal products; a symbol only matches itself) tells whether the channel
axis is kept, merged with its neighbours (a flatten) or split into two axes (attention
heads), which is all the channel analysis needs.

Worked example: ``[B, 64, 4, 4] -> [B, 1024]`` is the blocks ``[B] -> [B]`` and
``[64, 4, 4] -> [1024]``: channel axis 1 is merged with 16 positions after it.
"""

from __future__ import annotations

from dataclasses import dataclass

Dim = int | str


@dataclass(frozen=True)
class AxisMove:
    """What happens to input axis `axis`: it lands in output axes `out_axes` (one axis
    when kept or merged, two or more when split); `outer` / `inner` are the static element
    counts merged before / after it (1 when kept or split)."""

    out_axes: tuple[int, ...]
    outer: int
    inner: int
    split: tuple[int, ...] = ()

    @property
    def kept(self) -> bool:
        return len(self.out_axes) == 1 and self.outer == 1 and self.inner == 1


def blocks(src: list[Dim], dst: list[Dim]) -> list[tuple[range, range]] | None:
    """Pair runs of input and output axes with equal products; None when they do not
    line up (an unknown or mismatched symbol, or different totals)."""
    out: list[tuple[range, range]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and j < len(dst) and isinstance(src[i], str) and src[i] == dst[j]:
            out.append((range(i, i + 1), range(j, j + 1)))
            i, j = i + 1, j + 1
            continue
        merged = _product_run(src, i, dst, j)  # [B, C, H, W] -> [B, C, 'H*W*1']
        if merged is not None:
            out.append(merged)
            i, j = merged[0].stop, merged[1].stop
            continue
        start_i, start_j, a, b = i, j, 1, 1
        while True:
            if a == b and i > start_i and j > start_j:
                break
            if a <= b and i < len(src) and isinstance(src[i], int):
                a, i = a * src[i], i + 1
            elif j < len(dst) and isinstance(dst[j], int):
                b, j = b * dst[j], j + 1
            elif i < len(src) and isinstance(src[i], int):
                a, i = a * src[i], i + 1
            else:
                return None
        # size-1 axes on either side join the block before them
        while i < len(src) and src[i] == 1 and not (j < len(dst) and dst[j] == 1):
            i += 1
        while j < len(dst) and dst[j] == 1 and not (i < len(src) and src[i] == 1):
            j += 1
        out.append((range(start_i, i), range(start_j, j)))
    return out


def _product_run(src: list[Dim], i: int, dst: list[Dim], j: int
                 ) -> tuple[range, range] | None:
    """A run of axes on one side whose product is the other side's one product symbol
    (``'H*W*1'``, as shape_values.reshaped names a -1 over dynamic axes)."""
    for many, k, one, m, flip in ((src, i, dst, j, False), (dst, j, src, i, True)):
        if m >= len(one) or not isinstance(one[m], str) or "*" not in one[m]:
            continue
        factors = one[m].split("*")
        symbols = sorted(f for f in factors if not f.lstrip("-").isdigit())
        static = _prod(int(f) for f in factors if f.lstrip("-").isdigit())
        for end in range(k + 1, len(many) + 1):
            run = many[k:end]
            if sorted(d for d in run if isinstance(d, str)) == symbols and \
                    _prod(d for d in run if isinstance(d, int)) == static:
                while end < len(many) and many[end] == 1 and \
                        not (m + 1 < len(one) and one[m + 1] == 1):
                    end += 1  # size-1 axes join the block before them
                stop = m + 1
                while stop < len(one) and one[stop] == 1 and \
                        not (end < len(many) and many[end] == 1):
                    stop += 1
                pair = (range(k, end), range(m, stop))
                return (pair[1], pair[0]) if flip else pair
    return None


def unify(src: list[Dim], dst: list[Dim]) -> list[Dim]:
    """`dst` with its one unmatched symbol renamed to `src`'s one unmatched symbol when the
    static parts have equal products: both hold the same number of elements, so the two
    symbols are equal (a ``-1`` target entry gets a fresh symbol from shape inference)."""
    only_src = [d for d in src if isinstance(d, str) and d not in dst]
    only_dst = [d for d in dst if isinstance(d, str) and d not in src]
    static = [_prod(d for d in dims if isinstance(d, int)) for dims in (src, dst)]
    if len(only_src) == 1 and len(only_dst) == 1 and static[0] == static[1]:
        return [only_src[0] if d == only_dst[0] else d for d in dst]
    if len(only_src) == 1 and len(only_dst) == 1 and "*" not in only_src[0] and \
            static[0] % static[1] == 0:  # [T, B, H, d] -> [X, H*d]: X = B*T
        return [f"{only_src[0]}*{static[0] // static[1]}" if d == only_dst[0] else d
                for d in dst]
    return dst


def _unified_src(src: list[Dim], dst: list[Dim]) -> list[Dim]:
    """`src` with its one unmatched symbol written as `dst`'s times a number, when `dst`'s
    static part is that multiple of `src`'s: shape inference gives a MatMul's rows a fresh
    symbol, so tf2onnx's Dense on a sequence reads ``['X', 48] -> [B, 16, 48]`` (X = B*16)."""
    only_src = [d for d in src if isinstance(d, str) and d not in dst]
    only_dst = [d for d in dst if isinstance(d, str) and d not in src]
    low, high = (_prod(d for d in dims if isinstance(d, int)) for dims in (src, dst))
    if len(only_src) == 1 and len(only_dst) == 1 and "*" not in only_dst[0] and \
            0 < low < high and high % low == 0:
        return [f"{only_dst[0]}*{high // low}" if d == only_src[0] else d for d in src]
    return src


def move_axis(src: list[Dim], dst: list[Dim], axis: int) -> AxisMove | None:
    """Where `axis` of `src` goes in `dst`; None when it cannot be told (then channels
    may mix and the caller freezes)."""
    if not isinstance(src[axis], int):
        return None
    dst = unify(src, dst)
    pairs = blocks(_unified_src(src, dst), dst)
    if pairs is None:
        return _same_tail(src, dst, axis)
    for ins, outs in pairs:
        if axis not in ins:
            continue
        real_in = [a for a in ins if src[a] != 1 or a == axis]
        real_out = [b for b in outs if dst[b] != 1]
        if not real_out:  # a single channel: nothing tells which size-1 axis holds it
            return None
        if len(real_in) == 1 and len(real_out) == 1:
            return AxisMove((real_out[0],), 1, 1)
        if len(real_in) == 1:  # one axis split into several
            return AxisMove(tuple(real_out), 1, 1, tuple(int(dst[b]) for b in real_out))
        if len(real_out) <= 1:  # several axes merged into one
            if any(isinstance(src[a], str) for a in ins):
                return None  # with a dynamic axis: features per channel unknown
            outer = _prod(src[a] for a in ins if a < axis)
            inner = _prod(src[a] for a in ins if a > axis)
            target = real_out[0] if real_out else outs.start
            return AxisMove((target,), outer, inner)
        return None  # several into several: channels and positions interleave
    return None


def _same_tail(src: list[Dim], dst: list[Dim], axis: int) -> AxisMove | None:
    """The channel axis and the static axes after it, unchanged at the end of `dst`, while
    the axes before it regroup in ways the symbols cannot tell (after an exact rewrite,
    shape inference names GPT-2's rows ``'unk__0*unk__2*1'`` where the view reads
    ``[N, T]``): both hold the same elements, so each leading index keeps its channels."""
    tail = src[axis:]
    if len(tail) > len(dst) or not all(isinstance(d, int) for d in tail) or \
            list(dst[len(dst) - len(tail):]) != list(tail):
        return None
    return AxisMove((len(dst) - len(tail),), 1, 1)


def _prod(dims) -> int:
    total = 1
    for d in dims:
        total *= int(d)
    return total
