"""Every op the channel handlers claim (SUPPORTED_OPS) has a numeric test.

Two guarantees: the differential fuzzer can draw every claimed op (FUZZED_OPS, checked
against what the generator really emits), and each op has a named deterministic test:

    x ─ Conv (ch4 := ch1) ─ <op under test> ─ head ─ (output)
    => exact mode keeps the function and removes the duplicate

A new op added to a handler without a recipe here fails `test_claimed_op_...[NewOp]`.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fuzz_graphs import (
    ACTIVATIONS,
    FUZZED_OPS,
    Builder,
    Case,
    Options,
    Rel,
    output_channels,
    sample_case,
)
from onnx import TensorProto
from test_fuzz_exact import check_exact

from onnxslim_fr.channels.handlers import SUPPORTED_OPS

#: Claimed ops without a fuzzed numeric test, each with the reason. Keep it empty.
EXEMPT: dict[str, str] = {
    "Softmax": "only between attention heads' scores and values: tests/test_attention_heads.py",
    "IsNaN": "only on attention heads (SDPA's NaN guard): tests/test_attention_hf.py",
    "Where": "only on attention heads (SDPA's NaN guard): tests/test_attention_hf.py",
    "Pow": "TODO fuzz it; gelu_new's x**3 in tests/test_attention_hf.py (conv1d_mlp)"}

DUPLICATE = [Rel("dup", 4, 1)]  # channel 4 of the planted producer repeats channel 1


def test_every_claimed_op_is_drawn_by_the_fuzzer() -> None:
    assert set(SUPPORTED_OPS) - FUZZED_OPS - set(EXEMPT) == set()
    assert set(EXEMPT) & FUZZED_OPS == set(), "exempt op is fuzzed: drop the exemption"


def test_the_generator_really_emits_every_op_it_claims_to_draw() -> None:
    seen: set[str] = set()
    for seed in range(400):
        seen |= sample_case(seed).ops
        if seen >= FUZZED_OPS:
            return
    assert FUZZED_OPS - seen == set()


# recipes: a planted producer, the op under test, a head ----------------------------------
def _image(op: Callable[[Builder, str], str], opset: int = 17) -> Case:
    b = Builder(lambda n: 0, opset, 0, "unique", Options(plain=True))
    y = b.conv(b.input(("N", 3, 6, 6)), 6, 3, 1, rels=DUPLICATE)
    y = op(b, y)
    if len(b.shape[y]) == 4:
        b.mark_output(b.conv(y, 3, 1, 0))
    else:
        b.mark_output(b.gemm(y, 3))
    return b.build()


def _dense(producer: str) -> Case:
    b = Builder(lambda n: 0, 17, 0, "unique", Options(plain=True))
    x = b.input(("N", 8))
    y = b.gemm(x, 6, DUPLICATE) if producer == "Gemm" else b.matmul(x, 6, DUPLICATE)
    b.mark_output(b.matmul(b.act(y, "Relu"), 3))
    return b.build()


def _sequence(op: Callable[[Builder, str], str]) -> Case:
    """ids or x (N, T, F) -> planted producer on the last axis -> op -> MatMul head."""
    b = Builder(lambda n: 0, 17, 0, "unique", Options(plain=True))
    y = op(b, b.act(b.matmul(b.input(("N", 4, 5)), 6, DUPLICATE), "Relu"))
    b.mark_output(b.matmul(y, 3))
    return b.build()


def _embedding() -> Case:
    b = Builder(lambda n: 0, 17, 0, "unique", Options(plain=True))
    y = b.take_step(b.act(b.embedding(rels=DUPLICATE), "Relu"))
    b.mark_output(b.matmul(y, 3))
    return b.build()


def _relu(b: Builder, y: str) -> str:
    return b.act(y, "Relu")


def _activation(op: str) -> Callable[[Builder, str], str]:
    if op == "Cast":
        return lambda b, y: b.cast_roundtrip(y, TensorProto.FLOAT16)
    if op == "Gelu":  # both approximations, at the opset that has Gelu
        return lambda b, y: b.set_chan(b.node("Gelu", [b.node("Gelu", [y], b.shape[y],
                                                              approximate="tanh")],
                                              b.shape[y]), b.chan[y])
    return lambda b, y: b.act(y, op)


def _size_read(b: Builder, y: str) -> str:
    """Size(y) > 0 scales another output: a read that does not depend on the channels."""
    b.shape_reader(y, "Size")
    return y


def _global(b: Builder, y: str, op: str) -> str:
    return b._spatial_rels(y, b.node(op, [y], (*b.shape[y][:2], 1, 1)), op, padded=False)


RECIPES: dict[str, Callable[[], Case]] = {
    **{op: (lambda op=op: _image(_activation(op), 20)) for op in ACTIVATIONS},
    "Conv": lambda: _image(lambda b, y: _relu(b, b.depthwise(y))),
    "Gemm": lambda: _dense("Gemm"),
    "MatMul": lambda: _dense("MatMul"),
    **{op: (lambda op=op: _image(lambda b, y: _relu(b, b.carrier(y, op))))
       for op in ("BatchNormalization", "InstanceNormalization", "PRelu", "Add", "Sub",
                  "Mul", "Div")},
    **{op: (lambda op=op: _image(lambda b, y: b.window_pool(_relu(b, y), op)))
       for op in ("MaxPool", "AveragePool", "LpPool")},
    **{op: (lambda op=op: _image(lambda b, y: b.flatten(_global(b, _relu(b, y), op))))
       for op in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")},
    **{op: (lambda op=op: _image(lambda b, y: b.reduce(_relu(b, y), op, [2, 3], False)))
       for op in ("ReduceMean", "ReduceMax", "ReduceSum")},
    "Pad": lambda: _image(lambda b, y: b.pad(_relu(b, y))),
    "Resize": lambda: _image(lambda b, y: b.resize(_relu(b, y))),
    "Upsample": lambda: _image(lambda b, y: b.upsample(_relu(b, y)), opset=9),
    "Flatten": lambda: _image(lambda b, y: b.flatten(_relu(b, y))),
    "Reshape": lambda: _image(lambda b, y: b.reshape(_relu(b, y))),
    "Squeeze": lambda: _image(lambda b, y: b.squeeze_spatial(
        b.reduce(_relu(b, y), "ReduceMean", [2, 3], True))),
    "Unsqueeze": lambda: _image(lambda b, y: b.squeeze_roundtrip(_relu(b, y))),
    "Transpose": lambda: _image(lambda b, y: b.transpose(
        b.transpose(_relu(b, y), [0, 2, 3, 1]), [0, 3, 1, 2])),
    "Concat": lambda: _image(lambda b, y: b.concat([_relu(b, y), b.conv(y, 4, 1, 0)])),
    "Shape": lambda: _image(lambda b, y: b.reshape(_relu(b, y), form="computed")),
    "ConvTranspose": lambda: _image(lambda b, y: _relu(b, b.conv_transpose(_relu(b, y), 4))),
    **{op: (lambda op=op: _sequence(lambda b, y: b.recurrent(y, op)))
       for op in ("LSTM", "GRU", "RNN")},
    "Gather": _embedding,
    "Slice": lambda: _image(lambda b, y: b.slice_channels(_relu(b, y), (1, 6))),
    "Split": lambda: _image(lambda b, y: b.concat(
        [_relu(b, p) for p in b.split(y, [1, 5])])),
    "Size": lambda: _image(lambda b, y: _size_read(b, _relu(b, y))),
}
#: Ops whose read may rightly freeze the group (the value depends on the channel count).
MAY_FREEZE = {"Size"}


@pytest.mark.parametrize("op", SUPPORTED_OPS)
def test_claimed_op_keeps_the_function_and_loses_an_upstream_duplicate(op: str) -> None:
    if op in EXEMPT:
        pytest.skip(EXEMPT[op])
    assert op in RECIPES, f"{op} is claimed by a handler but has no numeric test recipe"
    case = RECIPES[op]()
    assert op in case.ops
    result = check_exact(case)
    assert result is not None, f"exact mode refused a plain graph with {op}"
    planted = [p for p in case.plants if p.expected]
    if op in MAY_FREEZE:
        return
    assert planted, "the recipe lost its planted duplicate"
    for p in planted:
        removed = output_channels(case.model, p.weight, p.op) - \
            output_channels(result.model, p.weight, p.op)
        assert removed >= p.expected, (p, removed)
