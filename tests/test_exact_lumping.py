"""Exact lumping: planted redundancy disappears and the function stays the same."""

from __future__ import annotations

import numpy as np
import pytest
from builders import Net, cnn_input
from conftest import removed, slim_exact


def _mlp():
    b = Net((None, 12))
    hidden = b.gemm(b.x, 16)
    return b, hidden, b.gemm(b.relu(hidden), 5)


def test_duplicate_neuron_is_removed_through_any_activation():
    b = Net((None, 12))
    h1 = b.gemm(b.x, 16)
    y = b.gemm(b.act(h1, "Sigmoid"), 5)
    b.scale_filter(h1, src=2, dst=9, factor=1.0)
    assert removed(slim_exact(b.build(y))) == 1


def test_positive_multiple_is_removed_through_relu():
    b, gemm, y = _mlp()
    b.scale_filter(gemm, src=3, dst=7, factor=2.5)
    b.scale_filter(gemm, src=3, dst=11, factor=0.25)
    assert removed(slim_exact(b.build(y))) == 2


def test_a_neuron_that_differs_only_in_a_tiny_weight_is_not_a_duplicate():
    """Neuron 9 is neuron 2 plus 1e-5 times input 0 (a zero weight in neuron 2). Merged, the
    model is off by that weight times the input: 1e-5 on standard-normal inputs, under
    the exact tolerance, but as large as the output on a raw feature of 1e5."""
    b = Net((None, 12))
    h1 = b.gemm(b.x, 16)
    y = b.gemm(b.relu(h1), 5)
    w, _, axis = b._rows(h1)
    np.moveaxis(w, axis, 0)[2, 0] = 0.0
    b.scale_filter(h1, src=2, dst=9, factor=1.0)
    np.moveaxis(w, axis, 0)[9, 0] = 1e-5 * np.abs(w).max()
    result = slim_exact(b.build(y))
    assert removed(result) == 0


def test_a_neuron_50_roundings_from_another_in_every_weight_is_not_a_duplicate():
    """Merged, a consumer that takes the two neurons' difference (weights -1 and +1) loses
    its whole output: 5e-6 of the neuron, far above float32's rounding of it."""
    b = Net((None, 12))
    h1 = b.gemm(b.x, 16)
    y = b.gemm(b.relu(h1), 5)
    b.scale_filter(h1, src=2, dst=9, factor=1.0)
    w, _, axis = b._rows(h1)
    rows = np.moveaxis(w, axis, 0)
    rows[9] += 50 * np.spacing(np.abs(rows[9]))  # up 50 roundings: not a multiple of row 2
    assert removed(slim_exact(b.build(y))) == 0


def test_copies_of_a_filter_rounded_apart_by_float32_are_still_duplicates():
    b, gemm, y = _mlp()
    b.scale_filter(gemm, src=3, dst=7, factor=0.7)  # 0.7 * w rounds each weight to float32
    w, _, axis = b._rows(gemm)
    rows = np.moveaxis(w, axis, 0)
    assert not np.array_equal(rows[7] / 0.7, rows[3])
    assert removed(slim_exact(b.build(y))) == 1


def test_positive_multiple_is_kept_through_sigmoid():
    b = Net((None, 12))
    h1 = b.gemm(b.x, 16)
    y = b.gemm(b.act(h1, "Sigmoid"), 5)
    b.scale_filter(h1, src=2, dst=9, factor=2.0)
    assert removed(slim_exact(b.build(y))) == 0


def test_negative_multiple_is_kept_through_relu_but_removed_through_tanh():
    for op, expected in (("Relu", 0), ("Tanh", 1)):
        b = Net((None, 12))
        h1 = b.gemm(b.x, 16)
        y = b.gemm(b.act(h1, op), 5)
        b.scale_filter(h1, src=2, dst=9, factor=-1.0)
        assert removed(slim_exact(b.build(y))) == expected, op


def test_dead_and_constant_neurons_fold_into_the_next_bias():
    b = Net((None, 12))
    h1 = b.gemm(b.x, 16)
    y = b.gemm(b.act(h1, "Sigmoid"), 5)
    b.kill_filter(h1, 0, bias=0.0)
    b.kill_filter(h1, 5, bias=1.7)
    result = slim_exact(b.build(y))
    assert removed(result) == 2
    assert result.report.after.params < result.report.before.params


def test_cnn_with_batchnorm_removes_scaled_filter_and_zero_filter():
    b = Net(cnn_input())
    c1 = b.conv(b.x, 8)
    h = b.relu(b.bn(c1))
    y = b.gemm(b.flatten(b.conv(h, 4)), 3)
    b.kill_filter(c1, 6)
    b.weights[b.nodes[1].input[2]][6] = 0.0  # BN shift 0 and mean 0: the channel is 0
    b.weights[b.nodes[1].input[3]][6] = 0.0
    result = slim_exact(b.build(y))
    assert removed(result) == 1


def test_constant_channel_before_padded_conv_stays_unless_it_is_zero():
    for const, expected in ((0.8, 0), (-0.8, 1)):  # ReLU(-0.8) = 0 everywhere
        b = Net(cnn_input())
        c1 = b.conv(b.x, 6)
        y = b.conv(b.relu(c1), 4, pad=1)
        b.kill_filter(c1, 2, bias=const)
        assert removed(slim_exact(b.build(y))) == expected, const


def test_constant_channel_folds_into_unpadded_conv():
    b = Net(cnn_input())
    c1 = b.conv(b.x, 6)
    y = b.conv(b.relu(c1), 4, k=1, pad=0)
    b.kill_filter(c1, 2, bias=0.8)
    assert removed(slim_exact(b.build(y))) == 1


def test_residual_channel_needs_the_same_relation_in_every_producer():
    for both, expected in ((False, 0), (True, 1)):
        b = Net(cnn_input(c=4))
        a = b.conv(b.x, 6)
        c = b.conv(b.x, 6, k=1, pad=0)
        y = b.conv(b.relu(b.add(a, c)), 3)
        b.scale_filter(a, src=1, dst=4, factor=3.0)
        if both:
            b.scale_filter(c, src=1, dst=4, factor=3.0)
        assert removed(slim_exact(b.build(y))) == expected


def test_concat_offsets_and_flatten_blocks_are_folded():
    b = Net(cnn_input())
    a = b.conv(b.x, 4)
    c = b.conv(b.x, 5)
    cat = b.concat([b.relu(a), b.relu(c)])
    y = b.gemm(b.flatten(b.maxpool(cat)), 3)
    b.scale_filter(c, src=0, dst=3, factor=2.0)
    b.scale_filter(a, src=1, dst=2, factor=1.0)
    assert removed(slim_exact(b.build(y))) == 2


def test_reshape_flatten_constant_is_rewritten():
    b = Net(cnn_input())
    c1 = b.conv(b.x, 6)
    y = b.gemm(b.reshape_flat(b.relu(c1)), 3)
    b.scale_filter(c1, src=0, dst=5, factor=1.5)
    result = slim_exact(b.build(y))
    assert removed(result) == 1
    shapes = [i for i in result.model.graph.initializer if i.data_type == 7]
    assert any(list(np.frombuffer(s.raw_data, dtype=np.int64)) == [-1, 5 * 64] or
               list(s.int64_data) == [-1, 5 * 64] for s in shapes)


def test_depthwise_conv_carries_the_channels():
    b = Net(cnn_input())
    c1 = b.conv(b.x, 6)
    d = b.conv(b.relu(c1), 6, group=6)
    y = b.conv(b.relu(d), 4)
    b.kill_filter(c1, 3)
    b.kill_filter(d, 3)
    result = slim_exact(b.build(y))
    assert removed(result) == 1  # one channel of the group, sliced in both convs


def test_matmul_consumer_gets_a_bias_for_constant_offsets():
    b = Net((None, 7, 12))
    h = b.matmul(b.x, 10)
    y = b.matmul(b.relu(h), 4, bias=False)
    b.kill_filter(b.nodes[0].output[0], 2, bias=0.5)
    result = slim_exact(b.build(y))
    assert removed(result) == 1
    assert [n.op_type for n in result.model.graph.node].count("Add") == 2


@pytest.mark.parametrize("op", ["LeakyRelu", "Elu", "HardSigmoid", "Gelu", "Softplus", "Clip"])
def test_duplicates_pass_every_elementwise_activation(op):
    b = Net(cnn_input())
    c1 = b.conv(b.x, 6)
    y = b.conv(b.act(c1, op), 3)
    b.scale_filter(c1, src=0, dst=4, factor=1.0)
    model = b.build(y, opset=20 if op == "Gelu" else 17)
    assert removed(slim_exact(model)) == 1
