"""PaddleOCR v4 models shipped by ``rapidocr-onnxruntime``, with data cut from a scanned page.

``pip install --no-deps rapidocr-onnxruntime scikit-image`` brings real paddle2onnx exports
(text detector, recogniser, direction classifier) and ``skimage.data.page()``, a scanned text
page. Nothing here is committed: the models stay in site-packages.

Text lines for the recogniser and classifier come from running the detector on the whole
page (threshold, connected components, a few pixels of margin, as RapidOCR's DB
post-processing does); lines alternate between calibration and test, so no line is in both.
Preprocessing follows PaddleOCR: detector ImageNet mean/std on RGB, recogniser and
classifier ``(x / 255 - 0.5) / 0.5`` at height 48, right-padded with zeros.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort

FILES = {"ppocrv4_det": "ch_PP-OCRv4_det_infer.onnx", "ppocrv4_rec": "ch_PP-OCRv4_rec_infer.onnx",
         "ppocr_mobile_cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx"}
METRICS = {"ppocrv4_det": "mask", "ppocrv4_rec": "ctc_ids", "ppocr_mobile_cls": "top1"}
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def model_paths() -> dict[str, Path]:
    """Paths of the shipped models, or {} when the package is not installed."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        return {}
    folder = Path(spec.origin).parent / "models"
    return {k: folder / f for k, f in FILES.items() if (folder / f).exists()}


def _page() -> np.ndarray:
    import skimage.data

    return skimage.data.page().astype(np.float32)


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from skimage.transform import resize

    return resize(image, shape, preserve_range=True, anti_aliasing=True).astype(np.float32)


def det_input(gray: np.ndarray) -> np.ndarray:
    rgb = np.repeat(gray[None] / 255.0, 3, axis=0)
    return ((rgb - MEAN[:, None, None]) / STD[:, None, None]).astype(np.float32)


def det_sets(counts: tuple[int, int] = (128, 64), size: tuple[int, int] = (96, 160)
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Random crops of the page at scales 0.8-1.6: calibration and test (other seeds)."""
    page = _page()
    sets = []
    for seed, count in enumerate(counts):
        rng = np.random.default_rng(seed)
        crops = []
        for _ in range(count):
            s = rng.uniform(0.8, 1.6)
            scaled = _resize(page, (round(page.shape[0] * s), round(page.shape[1] * s)))
            r = int(rng.integers(0, max(1, scaled.shape[0] - size[0])))
            c = int(rng.integers(0, max(1, scaled.shape[1] - size[1])))
            crop = np.full(size, 255.0, np.float32)
            part = scaled[r: r + size[0], c: c + size[1]]
            crop[: part.shape[0], : part.shape[1]] = part
            crops.append(det_input(crop))
        sets.append({"x": np.stack(crops)})
    return sets[0], sets[1]


def text_boxes(det_path: Path, threshold: float = 0.3, margin: int = 3
               ) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of text regions the detector finds on the whole page."""
    from scipy import ndimage

    page = _page()
    h, w = (page.shape[0] + 31) // 32 * 32, (page.shape[1] + 31) // 32 * 32
    padded = np.full((h, w), 255.0, np.float32)
    padded[: page.shape[0], : page.shape[1]] = page
    sess = ort.InferenceSession(str(det_path), providers=["CPUExecutionProvider"])
    prob = sess.run(None, {sess.get_inputs()[0].name: det_input(padded)[None]})[0][0, 0]
    labels, _ = ndimage.label(prob > threshold)
    boxes = []
    for sl in ndimage.find_objects(labels):
        top, bottom, left, right = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        if bottom - top >= 6 and right - left >= 12:
            boxes.append((max(0, top - margin), min(page.shape[0], bottom + margin),
                          max(0, left - margin), min(page.shape[1], right + margin)))
    return sorted(boxes)


def line_input(gray: np.ndarray, width: int) -> np.ndarray:
    """PaddleOCR rec/cls preprocessing: height 48, aspect kept up to ``width``, zero-padded."""
    w = min(width, max(1, round(gray.shape[1] * 48 / gray.shape[0])))
    line = (_resize(gray, (48, w)) / 255.0 - 0.5) / 0.5
    out = np.zeros((3, 48, width), np.float32)
    out[:, :, :w] = line
    return out


def _windows(page: np.ndarray, box: tuple[int, int, int, int], rng: np.random.Generator,
             count: int) -> list[np.ndarray]:
    """Line crops with jittered margins; long lines also as random sub-windows."""
    top, bottom, left, right = box
    crops = []
    for i in range(count):
        t = max(0, top + int(rng.integers(-2, 3)))
        b = min(page.shape[0], bottom + int(rng.integers(-2, 3)))
        span = right - left
        if i and span > 4 * (b - t):
            width = int(rng.integers(2 * (b - t), span))
            start = left + int(rng.integers(0, span - width + 1))
            crops.append(page[t:b, start: start + width])
        else:
            crops.append(page[t:b, left:right])
    return crops


def line_sets(det_path: Path, width: int, per_line: int, flips: bool
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Calibration (even lines) and test (odd lines) sets; with ``flips`` every crop also
    appears rotated by 180 degrees, labelled 1 (the direction classifier's classes)."""
    page = _page()
    rng = np.random.default_rng(0)
    parts: list[tuple[list[np.ndarray], list[int]]] = [([], []), ([], [])]
    for i, box in enumerate(text_boxes(det_path)):
        xs, ys = parts[i % 2]
        for crop in _windows(page, box, rng, per_line):
            xs.append(line_input(crop, width))
            ys.append(0)
            if flips:
                xs.append(line_input(crop[::-1, ::-1], width))
                ys.append(1)
    return tuple({"x": np.stack(xs), "labels": np.array(ys)} for xs, ys in parts)


def datasets(paths: dict[str, Path]) -> dict[str, tuple[dict, dict]]:
    """Calibration and test feeds (input ``x``) per shipped model."""
    det = paths.get("ppocrv4_det")
    if det is None:
        return {}
    out = {"ppocrv4_det": det_sets()}
    if "ppocrv4_rec" in paths:
        calib, test = line_sets(det, width=320, per_line=32, flips=False)
        out["ppocrv4_rec"] = ({"x": calib["x"]}, {"x": test["x"]})
    if "ppocr_mobile_cls" in paths:
        out["ppocr_mobile_cls"] = line_sets(det, width=192, per_line=16, flips=True)
    return out
