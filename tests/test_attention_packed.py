"""Stock nn.MultiheadAttention exports: packed in-projection and heads merged with batch.

The tiny onnx.helper graphs of these patterns (as the dynamo exporter writes them, with
the merged-batch Kᵀ) are in test_attention_dynamo.py; here the shipped torchscript export.
"""

from pathlib import Path

import pytest

from onnxslim_fr import analyze

MODEL = Path(__file__).resolve().parent.parent / "models" / "vit_mnist_p4.onnx"


@pytest.mark.skipif(not MODEL.exists(), reason="shipped model missing")
def test_heads_of_packed_in_projection_are_free():
    """[T,B,3D] -> [T,B,3,D] -> Gather k, then [T,B*H,d]: every layer's heads are a group."""
    groups, _ = analyze(str(MODEL))
    heads = [g for g in groups.groups.values() if g.unit == 12]
    assert len(heads) == 4
    assert all(g.frozen is None and g.size == 4 for g in heads)
