"""Registry of the model fixtures in ``models/``: their data files and how to score them.

One place that says which calibration/test files go with which model and which metric
applies, read by ``tools/exporter_models.py`` (the MODELS.md section) and
``tools/bench_coverage.py``. numpy and onnxruntime only: no torch needed.

Data files hold one array per model input (a single-input model's array is fed under that
model's input name whatever its key), plus targets that are not inputs: ``labels``
(class ids, or for CTC lines padded digit rows with ``label_lengths``) or ``mask`` (text
masks of the detector pages).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from fixture_metrics import (
    ctc_greedy_decode,
    ctc_paths,
    label_strings,
    mask_f1,
    string_match,
    top1,
)

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
TARGET_KEYS = ("labels", "label_lengths", "mask")


@dataclass(frozen=True)
class Fixture:
    model: str
    data: str  # prefix: <data>_calib.npz and <data>_test.npz in models/
    metric: str  # "top1" (classifier), "ctc" (decoded strings), "mask" (F1 of the map), or
    # "auto" (unregistered models: arg-max over the last axis, every position must agree)
    architecture: str = ""
    exporter: str = ""
    notes: str = ""

    def path(self) -> Path:
        return MODELS / self.model

    def data_path(self, split: str) -> Path:
        return MODELS / f"{self.data}_{split}.npz"


YOLO = ("Focus 1->16, Conv s2 ->32, C2f (chunk), Conv s2 ->64, C2f (split, n=2), C3, SPPF, "
        "Classify (Conv 1x1 ->128, GAP, Linear 10); SiLU")
MOBILE = ("MobileNetV3-small style: stem s2 ->16, 5 inverted residuals (expand / depthwise "
          "3x3-5x5 / SE on 4 / project), last conv ->96, GAP, Conv 1x1 ->128, Linear 10")
FIXTURES: tuple[Fixture, ...] = (
    Fixture("yolo_c2f.onnx", "mnist_img", "top1", YOLO, "torchscript, opset 17 (BN fused)",
            "SiLU as Sigmoid+Mul; C2f `chunk` as Shape/Gather/Div/Mul/Slice, `split` as Split; "
            "Focus as 4 strided Slices + Concat"),
    Fixture("yolo_c2f_dynamo.onnx", "mnist_img", "top1", YOLO, "dynamo (BN fused)",
            "`chunk` and `split` both as Split; global pool as ReduceMean, flatten as Reshape"),
    Fixture("semobile_hswish.onnx", "mnist_img", "top1", MOBILE,
            "torchscript, opset 17 (BN fused)", "HardSwish and HardSigmoid ops; SE gate Mul"),
    Fixture("semobile_hswish_dynamo.onnx", "mnist_img", "top1", MOBILE, "dynamo (BN fused)",
            "global pools as ReduceMean, flatten as Reshape"),
    Fixture("semobile_decomposed.onnx", "mnist_img", "top1", MOBILE,
            "torchscript, opset 17, BN kept",
            "the same weights with hardswish written x*clip(x+3,0,6)/6 (Add/Clip/Mul/Div) and "
            "BatchNormalization nodes kept, as paddle2onnx writes PP-LCNet/MobileNetV3"),
    Fixture("ocr_crnn.onnx", "ocr_lines", "ctc",
            "CRNN: 5 conv-BN-ReLU (16..64) with 3 max-pools -> computed Reshape [N, 128, W/4] "
            "-> BiLSTM 48 -> Linear 11 -> Softmax; input [N, 1, 16, W]",
            "torchscript, opset 17 (BN fused)",
            "dynamic width: Reshape target from Shape/Gather/Mul/Unsqueeze/Concat; output "
            "[N, W/4, 11] CTC probabilities (class 0 = blank, d+1 = digit d)"),
    Fixture("dbnet_fpn.onnx", "db_pages", "mask",
            "DB text detector: 5-stage conv backbone (/32), DBFPN neck (1x1 laterals, nearest "
            "Resize x2/x4/x8 + Add, Concat), DB head (Conv-BN-ReLU, 2 ConvTranspose s2)",
            "torchscript, opset 17 (BN fused)",
            "input [N, 1, H, W], H and W multiples of 32; output the text probability map"),
    Fixture("audio_conv1d.onnx", "audio_tones", "top1",
            "Conv1d front end 1->16 (k9 s2)->32->64->64 with BN, ReLU, MaxPool1d; GAP, "
            "Squeeze, Linear 64->32->8", "torchscript, opset 17 (BN fused)",
            "input [N, 1, L], L dynamic (>= 64 samples)"),
    Fixture("paddle_lcnet.onnx", "mnist_img", "top1",
            "PP-LCNet style: stem s2 ->16, 5 depthwise-separable blocks (dw 3x3/5x5, SE on the "
            "last two), GAP, Conv 1x1 ->128, hardswish, Linear 10", "paddle2onnx (opset 11)",
            "real paddle2onnx output: weights in Constant nodes, biases Constant -> Reshape "
            "-> Add, BatchNormalization kept, hardswish as HardSigmoid + Mul, flatten as "
            "Shape -> Slice -> Concat -> Reshape; input `x`"),
    Fixture("keras_cnn.onnx", "keras_digits", "top1",
            "Keras CNN on NHWC digits: 3 Conv2D-BN-ReLU (16, 32 s2, 32), a Dense 128->32 "
            "shared by the 4 feature rows, Concatenate, Dense 10", "tf2onnx 1.17 (opset 17)",
            "real tf2onnx output with its default optimizers: NCHW inside (one Reshape for "
            "the NHWC input), a Transpose before each row's flatten; the row Dense is one "
            "weight and one bias read by 4 MatMuls and 4 Adds"),
    Fixture("keras_cnn_transposes.onnx", "keras_digits", "top1",
            "the same Keras model", "tf2onnx 1.17 (opset 17), TransposeOptimizer off",
            "a Transpose pair around every Conv, as tf2onnx writes them before (or without) "
            "its transpose optimizer; BN shift Add and ReLU in NHWC, rows sliced on the NHWC "
            "height axis"),
)


def fixture_for(name: str) -> Fixture | None:
    """The registered fixture of a model file, the digits convention of train_models.py, or
    for other models the longest ``<prefix>_calib.npz`` / ``_test.npz`` pair naming it."""
    for fx in FIXTURES:
        if fx.model == name:
            return fx
    if name.startswith("digits_"):
        return Fixture(name, "digits_flat" if "mlp" in name else "digits_img", "top1")
    prefixes = [p.name[: -len("_calib.npz")] for p in MODELS.glob("*_calib.npz")]
    known = [p for p in prefixes if name.startswith(p) and (MODELS / f"{p}_test.npz").exists()]
    return Fixture(name, max(known, key=len), "auto") if known else None


def load_split(path: Path, model: onnx.ModelProto
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Model feeds (keyed by the model's input names) and targets from one .npz file."""
    arrays = dict(np.load(path))
    targets = {k: arrays.pop(k) for k in TARGET_KEYS if k in arrays}
    inputs = [i.name for i in model.graph.input
              if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) == 1 and len(arrays) == 1:
        return {inputs[0]: next(iter(arrays.values()))}, targets
    return {name: arrays[name] for name in inputs}, targets


def run(model: onnx.ModelProto | Path | str, feeds: dict[str, np.ndarray],
        batch: int = 64) -> np.ndarray:
    """First output of the model over all samples, in batches."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    n = len(next(iter(feeds.values())))
    outs = [sess.run(None, {k: v[i: i + batch] for k, v in feeds.items()})[0]
            for i in range(0, n, batch)]
    return np.concatenate(outs)


def score(metric: str, output: np.ndarray, targets: dict[str, np.ndarray]) -> float | None:
    """Task quality against the targets: accuracy, decoded-string accuracy or mask F1."""
    if metric == "top1" and "labels" in targets:
        return float((top1(output) == targets["labels"]).mean())
    if metric == "ctc" and "labels" in targets:
        return string_match(ctc_greedy_decode(output), label_strings(targets["labels"]))
    if metric == "mask" and "mask" in targets:
        return mask_f1(output, targets["mask"])
    if metric == "auto" and "labels" in targets:
        pred = _auto_prediction(output)
        if pred.shape == targets["labels"].shape:
            return float((pred == targets["labels"]).reshape(len(pred), -1).all(1).mean())
    return None


def _auto_prediction(output: np.ndarray) -> np.ndarray:
    """Unregistered models: class per sample ([N, C]) or per position ([N, ..., C])."""
    return top1(output) if output.ndim == 2 else output.argmax(axis=-1)


def agreement(metric: str, before: np.ndarray, after: np.ndarray) -> float:
    """How often the slimmed model gives the original's answer: top-1, identical greedy CTC
    paths (``ctc``, or ``ctc_ids`` for a recogniser whose character table is not at hand),
    or the F1 of the binarized map against the original's (``mask``)."""
    if metric in ("ctc", "ctc_ids"):
        return string_match(ctc_paths(before), ctc_paths(after))
    if metric == "mask":
        return mask_f1(after, (before > 0.5).astype(np.uint8))
    if metric == "auto":
        same = _auto_prediction(before) == _auto_prediction(after)
        return float(same.reshape(len(same), -1).all(1).mean())
    return float((top1(before) == top1(after)).mean())


