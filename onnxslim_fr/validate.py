"""Compare the slimmed model with the original by running both in onnxruntime."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .graph import check
from .runtime import run, session


@dataclass
class Comparison:
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float | None
    accuracy_before: float | None = None
    accuracy_after: float | None = None


def compare(original: onnx.ModelProto, slimmed: onnx.ModelProto,
            batches: Sequence[Mapping[str, np.ndarray]],
            labels: np.ndarray | None = None) -> Comparison:
    """Errors are relative to the largest output magnitude; top-1 and accuracy use the first
    output when it looks like class scores (batch, classes)."""
    check(slimmed, "slimmed model fails the checker")
    abs_err, scale, agree, n = 0.0, 0.0, 0, 0
    preds_a, preds_b = [], []
    sess_a, sess_b = session(original), session(slimmed)
    for feeds in batches:
        outs_a, outs_b = run(sess_a, feeds), run(sess_b, feeds)
        for a, b in zip(outs_a, outs_b, strict=True):
            a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            abs_err = max(abs_err, float(np.max(np.abs(a64 - b64), initial=0.0)))
            scale = max(scale, float(np.max(np.abs(a64), initial=0.0)))
        first_a, first_b = np.asarray(outs_a[0]), np.asarray(outs_b[0])
        if first_a.ndim == 2 and first_a.shape[1] > 1:
            preds_a.append(first_a.argmax(1))
            preds_b.append(first_b.argmax(1))
            agree += int((preds_a[-1] == preds_b[-1]).sum())
            n += len(first_a)
    result = Comparison(abs_err, abs_err / max(scale, 1e-12), agree / n if n else None)
    if labels is not None and preds_a:
        pa, pb = np.concatenate(preds_a), np.concatenate(preds_b)
        if len(pa) == len(labels):
            result.accuracy_before = float((pa == labels).mean())
            result.accuracy_after = float((pb == labels).mean())
    return result


def output_error_probe(model: onnx.ModelProto, graph, groups, batches: Sequence[Mapping]):
    """A function plans -> relative squared output error of `model` slimmed by them."""
    from .rewrite import apply

    reference = [run(model, feeds) for feeds in batches]
    energy = sum(float(np.sum(np.square(o, dtype=np.float64))) for outs in reference
                 for o in outs) or 1.0

    def probe(plans) -> float:
        sess = session(apply(model, graph, groups, plans, finalize=False))
        err = 0.0
        for feeds, ref in zip(batches, reference, strict=True):
            for a, b in zip(ref, sess.run(None, dict(feeds)), strict=True):
                err += float(np.sum(np.square(a.astype(np.float64) - b)))
        return err / energy

    return probe
