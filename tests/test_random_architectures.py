"""Properties on random architectures with planted exact redundancy: exact mode removes at
least every planted channel and the function is unchanged (rtol/atol 1e-5); calibrated
mode (with or without the refit) keeps that exact part exact, produces a model the checker
and onnxruntime accept, and meets its FLOPs budget or says why not."""

from __future__ import annotations

import numpy as np
from builders import Net
from conftest import removed, slim_exact
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxslim_fr import slim
from onnxslim_fr.calibrate import load_data
from onnxslim_fr.channels import build_groups
from onnxslim_fr.graph import Graph, normalize
from onnxslim_fr.refit import refit
from onnxslim_fr.testing import assert_same_function, input_specs

ZERO_AT_ZERO = ("Relu", "LeakyRelu", "Tanh")
HOMOGENEOUS = ("Relu", "LeakyRelu")
ACTIVATIONS = ("Relu", "LeakyRelu", "Tanh", "Sigmoid")


class Planter:
    """Plants one relation per channel group across all its producers (and their BNs)."""

    def __init__(self, net: Net, draw) -> None:
        self.net, self.draw, self.planted = net, draw, 0

    def bn_params(self, bn_out: str | None) -> list[np.ndarray]:
        if bn_out is None:
            return []
        node = next(n for n in self.net.nodes if n.output[0] == bn_out)
        return [self.net.weights[i] for i in node.input[1:]]

    def plant(self, producers: list[tuple[str, str | None]], width: int, act: str,
              padded_consumer: bool = True) -> None:
        kinds = ["dup"] + (["mult"] if act in HOMOGENEOUS else []) + \
            (["dead"] if act in ZERO_AT_ZERO else []) + \
            (["const"] if not padded_consumer else [])
        channels = self.draw(st.permutations(range(width)))
        for n in range(self.draw(st.integers(0, width // 2))):
            src, dst = channels[2 * n], channels[2 * n + 1]
            kind = self.draw(st.sampled_from(kinds))
            factor = 1.0 if kind == "dup" else self.draw(st.floats(0.3, 3.0))
            for conv, bn in producers:
                self._apply(conv, bn, kind, src, dst, factor)
            self.planted += 1

    def _apply(self, conv: str, bn: str | None, kind: str, src: int, dst: int,
               factor: float) -> None:
        params = self.bn_params(bn)
        if kind == "dead" or kind == "const":
            self.net.kill_filter(conv, dst, bias=0.0 if kind == "dead" else factor)
            if params:
                params[1][dst] = 0.0 if kind == "dead" else factor  # BN shift
                params[2][dst] = 0.0  # BN mean
            return
        if not params:
            self.net.scale_filter(conv, src, dst, factor)
            return
        self.net.scale_filter(conv, src, dst, 1.0)
        scale, shift, mean, var = params
        scale[dst], shift[dst] = factor * scale[src], factor * shift[src]
        mean[dst], var[dst] = mean[src], var[src]


@st.composite
def cnn(draw):
    net = Net((None, draw(st.integers(1, 3)), 6, 6), seed=draw(st.integers(0, 1000)))
    planter = Planter(net, draw)
    x = net.x
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["plain", "residual", "concat"]))
        act = draw(st.sampled_from(ACTIVATIONS))
        bn = draw(st.booleans())
        width = draw(st.integers(3, 8))
        branches = [(3, 1), (1, 0)] if kind == "residual" else \
            [(3, 1), (3, 1)] if kind == "concat" else [(3, 1)]
        outs = []
        for k, pad in branches:
            conv = net.conv(x, width, k=k, pad=pad)
            norm = net.bn(conv) if bn else None
            outs.append((conv, norm, norm or conv))
        if kind == "residual":
            x = net.act(net.add(outs[0][2], outs[1][2]), act)
            planter.plant([(c, n) for c, n, _ in outs], width, act)
        else:
            xs = [net.act(z, act) for _, _, z in outs]
            x = net.concat(xs) if kind == "concat" else xs[0]
            for c, n, _ in outs:
                planter.plant([(c, n)], width, act)
    if draw(st.booleans()):
        x = net.gap(x)
    return net.build(net.gemm(net.flatten(x), 3)), planter.planted


@st.composite
def mlp(draw):
    net = Net((None, draw(st.integers(2, 10))), seed=draw(st.integers(0, 1000)))
    planter = Planter(net, draw)
    x = net.x
    for _ in range(draw(st.integers(1, 3))):
        act = draw(st.sampled_from(ACTIVATIONS))
        width = draw(st.integers(3, 12))
        h = net.gemm(x, width)
        x = net.act(h, act)
        planter.plant([(h, None)], width, act, padded_consumer=False)
    return net.build(net.gemm(x, 3)), planter.planted


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(cnn(), mlp()))
def test_exact_mode_removes_every_planted_channel_and_keeps_the_function(case):
    model, planted = case
    result = slim_exact(model)
    assert removed(result) >= planted


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(cnn(), mlp()), st.floats(0.2, 0.6), st.booleans())
def test_calibrated_mode_keeps_the_exact_part_exact_and_meets_or_reports_its_budget(
        case, ratio, refit):
    model, _ = case
    (name, (dims, dtype)), = input_specs(model).items()
    rng = np.random.default_rng(0)
    data = {name: rng.standard_normal((96, *dims[1:])).astype(dtype)}
    rep = slim(model, data=data, ratio=ratio, sequential_refit=refit, latency_runs=0).report
    assert rep.exact_max_rel_error <= 1e-5
    assert np.isfinite(rep.max_rel_error)
    met = rep.after.flops <= (1 - ratio) * rep.before.flops * 1.02
    assert met or any("budget not met" in note for note in rep.notes)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(cnn(), mlp()))
def test_refit_of_an_unslimmed_model_keeps_its_function(case):
    model = normalize(case[0])
    graph = Graph(model)
    groups = build_groups(graph)
    (name, (dims, dtype)), = input_specs(model).items()
    feeds = {name: np.random.default_rng(1).standard_normal((96, *dims[1:])).astype(dtype)}
    active = [g.id for g in groups.active()]
    refit_model, _ = refit(model, graph, groups, {}, load_data(feeds, model), active)
    assert_same_function(model, refit_model, feeds=feeds, rtol=1e-3, atol=1e-3)
