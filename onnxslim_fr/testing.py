"""Public helpers to check a slimmed model: seeded random inputs and a function comparison."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from .runtime import input_specs, run

__all__ = ["assert_same_function", "input_specs", "random_feeds", "run"]


def random_feeds(model: onnx.ModelProto, *, shapes: Mapping[str, tuple[int, ...]] | None = None,
                 seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    """Standard-normal inputs; dynamic dims become `batch` on axis 0 and 1 elsewhere."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (dims, dtype) in input_specs(model).items():
        default = (d if d is not None else (batch if i == 0 else 1) for i, d in enumerate(dims))
        shape = tuple((shapes or {}).get(name) or default)
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = np.zeros(shape, dtype=dtype)
    return feeds


def assert_same_function(original: onnx.ModelProto, slimmed: onnx.ModelProto, *,
                         feeds: Mapping[str, np.ndarray] | None = None,
                         rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Both models give the same outputs on `feeds` (seeded random batch of 4 by default)."""
    feeds = feeds if feeds is not None else random_feeds(original, batch=4)
    for a, b in zip(run(original, feeds), run(slimmed, feeds), strict=True):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol * max(1.0, float(np.abs(a).max())))
