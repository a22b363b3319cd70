"""Task metrics for the fixtures whose output is not one class per sample (numpy only).

CTC recognisers are compared by their greedy-decoded strings, text detectors by the F1 of
their binarized probability map; both are what OCR users look at, where top-1 agreement
over an output axis would be meaningless.
"""

from __future__ import annotations

import numpy as np

BLANK = 0


def ctc_paths(scores: np.ndarray, blank: int = BLANK) -> list[tuple[int, ...]]:
    """Best-path decoding of ``[N, T, C]`` scores: arg-max per step, collapse repeats, drop
    blanks. Class ids, for recognisers whose character table is not at hand."""
    best = np.asarray(scores).argmax(axis=-1)
    out = []
    for path in best:
        keep = np.ones(len(path), bool)
        keep[1:] = path[1:] != path[:-1]
        out.append(tuple(int(c) for c in path[keep] if c != blank))
    return out


def ctc_greedy_decode(scores: np.ndarray, blank: int = BLANK, offset: int = 1,
                      charset: str = "0123456789") -> list[str]:
    """Greedy CTC strings; class ``c`` (``c != blank``) is ``charset[c - offset]``."""
    return ["".join(charset[c - offset] for c in path if 0 <= c - offset < len(charset))
            for path in ctc_paths(scores, blank)]


def label_strings(labels: np.ndarray, charset: str = "0123456789") -> list[str]:
    """Padded label rows (``-1`` after the end) as strings."""
    return ["".join(charset[c] for c in row if c >= 0) for row in np.asarray(labels)]


def string_match(a: list, b: list) -> float:
    """Share of identical strings (or class-id paths)."""
    return float(np.mean([x == y for x, y in zip(a, b, strict=True)]))


def mask_f1(prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    """Pixel F1 of ``prob > threshold`` against a binary mask (a DB detector's shrunk map)."""
    pred = np.asarray(prob) > threshold
    truth = np.asarray(mask) > 0.5
    tp = float(np.logical_and(pred, truth).sum())
    denom = float(pred.sum() + truth.sum())
    return 2 * tp / denom if denom else 1.0


def top1(scores: np.ndarray) -> np.ndarray:
    """Class per sample of ``[N, C]`` (or ``[N, C, 1, ...]``) scores."""
    s = np.asarray(scores)
    return s.reshape(s.shape[0], s.shape[1], -1)[:, :, 0].argmax(axis=1)
