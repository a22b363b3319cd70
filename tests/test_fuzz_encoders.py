"""Exact mode on random small transformer encoders (tests/fuzz_encoders.py): 1-2 layers,
2-4 heads, Relu / Gelu op / Erf GELU, LayerNormalization op or decomposed, pre- or
post-norm, optional additive mask, Reshape targets constant or computed from Shape.

Planted FFN neurons (duplicates, dead, positive multiples through Relu) and planted heads
(a copy of another head's Q, K, V; a head whose V is zero) are all removed, nothing else is,
and the function is unchanged (rtol/atol 1e-5, checked by conftest.slim_exact)."""

from __future__ import annotations

from conftest import slim_exact
from fuzz_encoders import Encoder, Spec, build, encoders, width
from hypothesis import HealthCheck, example, given, settings

SETTINGS = settings(max_examples=14, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def explicit(activation: str, norm_op: bool, pre_norm: bool, mask: bool,
             reshape: str) -> Encoder:
    """A fixed 2-layer encoder with every kind of plant, so each form runs at least once."""
    spec = Spec(layers=2, d_model=8, heads=4, head_dim=3, ffn=12, activation=activation,
                norm_op=norm_op, pre_norm=pre_norm, mask=mask, reshape=reshape, seed=7)
    mult = "mult" if activation == "Relu" else "dup"
    ffn = [("dup", 5, 2, 1.0), ("dead", 7, 0, 1.0), (mult, 9, 1, 2.5)]
    heads = [("dup", 3, 0), ("dead", 1, 2)]
    return build(spec, [(ffn, heads), (ffn[:1], heads[1:])])


EXAMPLES = (
    explicit("Relu", norm_op=True, pre_norm=False, mask=True, reshape="computed"),
    explicit("Gelu", norm_op=False, pre_norm=True, mask=False, reshape="zeros"),
    explicit("GeluErf", norm_op=False, pre_norm=False, mask=True, reshape="minus_one"),
)


def with_examples(test):
    for enc in EXAMPLES:
        test = example(enc)(test)
    return test


@SETTINGS
@given(encoders())
@with_examples
def test_planted_ffn_neurons_are_removed_and_nothing_else(enc: Encoder) -> None:
    result = slim_exact(enc.model)
    spec = enc.spec
    for i, planted in enumerate(enc.planted.ffn):
        assert width(result.model, f"l{i}.ffn1") == spec.ffn - planted, f"layer {i}"
        assert width(result.model, f"l{i}.ffn2") == spec.d_model  # residual width stays


@SETTINGS
@given(encoders())
@with_examples
def test_planted_heads_are_removed(enc: Encoder) -> None:
    result = slim_exact(enc.model)
    spec = enc.spec
    for i, planted in enumerate(enc.planted.heads):
        kept = (spec.heads - planted) * spec.head_dim
        for proj in ("q", "k", "v"):
            assert width(result.model, f"l{i}.{proj}") == kept, f"layer {i} {proj}"
