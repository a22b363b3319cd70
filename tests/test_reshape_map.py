"""Where a Reshape sends the channel axis, from symbolic shapes (channels/reshape_map.py)."""

import pytest

from onnxslim_fr.channels.reshape_map import move_axis


@pytest.mark.parametrize(("src", "dst", "axis", "out_axes", "outer", "inner", "split"), [
    (["B", 64, 4, 4], ["B", 1024], 1, (1,), 1, 16, ()),  # flatten after the batch
    ([1, 64, 4, 4], [1, 1024], 1, (1,), 1, 16, ()),  # static batch 1 is not merged
    (["B", 64, 1, "W"], ["B", 64, "W"], 1, (1,), 1, 1, ()),  # CRNN: squeeze the height
    (["B", 64], ["B", 64, 1, 1], 1, (1,), 1, 1, ()),  # unsqueeze by reshape
    (["B", "T", 64], ["B", "T", 4, 16], 2, (2, 3), 1, 1, (4, 16)),  # attention heads
    (["B", "T", 4, 16], ["B", "T", 64], 2, (2,), 1, 16, ()),  # heads merged back
    (["B", "T", 4, 16], ["B", "T", 64], 3, (2,), 4, 1, ()),  # head dim merged back
    (["unk0", 6, 8, 8], ["unk1", 384], 1, (1,), 1, 64, ()),  # a -1 batch gets a new symbol
    (["X", 48], ["B", 16, 48], 1, (2,), 1, 1, ()),  # tf2onnx Dense: MatMul rows X = B*16
    (["X", 48], ["B", 16, 48], 0, None, None, None, None),  # the rows hold no channels
    # after an exact rewrite GPT-2's rows are named from other symbols than the view's
    (["u0*u2*1", 192], ["N", "T", 192], 1, (2,), 1, 1, ()),
    (["u0*u2*1", 16, 4], ["N", "T", 16, 4], 1, (2,), 1, 1, ()),
])
def test_channel_axis_is_followed_through_reshape(src, dst, axis, out_axes, outer, inner, split):
    move = move_axis(src, dst, axis)
    if out_axes is None:  # a dynamic axis: never a channel axis
        assert move is None
        return
    assert move is not None
    assert (move.out_axes, move.outer, move.inner, move.split) == (out_axes, outer, inner, split)


@pytest.mark.parametrize(("src", "dst", "axis"), [
    (["B", 64, "H", "W"], ["B", "flat"], 1),  # dynamic positions: the product is unknown
    (["B", 4, 16], ["B", 8, 8], 1),  # channels and positions interleave
    (["B", 64], ["C", "D"], 1),  # unmatched symbols on one side cannot be told apart
    (["B", "C"], ["B", "C"], 1),  # a symbolic channel count cannot be sliced
    (["u0*u2", 16, 4], ["N", "T", 64], 1),  # merged with what follows, rows unknown
    (["u0*u2", 16, 4], ["N", "T", 4, 16], 1),  # the same tail in another order
])
def test_reshape_that_mixes_channels_is_not_followed(src, dst, axis):
    assert move_axis(src, dst, axis) is None
