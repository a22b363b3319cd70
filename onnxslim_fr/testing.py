"""Public helpers to check a slimmed model: seeded random inputs and a function comparison."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from . import feeds as _feeds
from .runtime import input_specs, run

__all__ = ["assert_same_function", "input_specs", "random_feeds", "run"]


def random_feeds(model: onnx.ModelProto, *, shapes: Mapping[str, tuple[int, ...]] | None = None,
                 seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    """Seeded inputs: standard-normal floats, random booleans, integer ids within the table
    they index (small non-negative values otherwise); dynamic dims become `batch` on axis 0
    and 1 elsewhere. For inputs checked to run, see `onnxslim_fr.feeds.validation_feeds`."""
    return _feeds.random_feeds(model, shapes=shapes, seed=seed, batch=batch)


def assert_same_function(original: onnx.ModelProto, slimmed: onnx.ModelProto, *,
                         feeds: Mapping[str, np.ndarray] | None = None,
                         rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Both models give the same outputs on `feeds` (seeded random batch of 4 by default)."""
    feeds = feeds if feeds is not None else random_feeds(original, batch=4)
    for a, b in zip(run(original, feeds), run(slimmed, feeds), strict=True):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol * max(1.0, float(np.abs(a).max())))
