"""Train a small Keras CNN on NHWC digits and convert it with the real tf2onnx.

Runs in its own virtual environment (TensorFlow does not share one with torch here)::

    python3.11 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu tf2onnx \\
        onnxruntime
    python tools/exporter_models.py            # writes the data this script reads
    /tmp/tfenv/bin/python tools/exporter_keras.py

Keras 3 breaks ``tf2onnx.convert.from_keras``; the model is converted with
``tf2onnx.convert.from_function(tf.function(...), input_signature=...)``. Two files:

* ``models/keras_cnn.onnx``: tf2onnx with its default optimizers (what a user gets);
* ``models/keras_cnn_transposes.onnx``: the same conversion with tf2onnx's
  ``TransposeOptimizer`` left out, so every Conv keeps the NHWC->NCHW / NCHW->NHWC
  Transpose pair tf2onnx writes around it before optimizing.

The Dense layer applied to each of the 4 feature rows is one Keras layer: its kernel is one
initializer read by 4 MatMuls (a time-distributed Dense unrolled).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
import tf2onnx
import tf2onnx.optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exporter_data import TRAIN_CACHE  # numpy only at import time

MODELS = Path(__file__).resolve().parent.parent / "models"
ROWS = 4


def build() -> tf.keras.Model:
    layers = tf.keras.layers
    inp = tf.keras.Input((8, 8, 1), name="input")
    x = inp
    for filters, stride in ((16, 1), (32, 2), (32, 1)):
        x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
    shared = layers.Dense(32, activation="relu", name="row_dense")
    rows = [shared(layers.Flatten()(x[:, r])) for r in range(ROWS)]
    out = layers.Dense(10, name="logits")(layers.Concatenate()(rows))
    return tf.keras.Model(inp, out)


def convert(model: tf.keras.Model, path: Path, transposes: bool) -> None:
    spec = (tf.TensorSpec([None, 8, 8, 1], tf.float32, name="input"),)
    fn = tf.function(lambda x: model(x, training=False))
    saved = tf2onnx.optimizer._optimizers.copy()
    if transposes:
        tf2onnx.optimizer._optimizers.pop("optimize_transpose")
    try:
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17)
    finally:
        tf2onnx.optimizer._optimizers.clear()
        tf2onnx.optimizer._optimizers.update(saved)
    proto.ir_version = min(proto.ir_version, 10)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def main() -> None:
    tf.keras.utils.set_random_seed(0)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    train = np.load(TRAIN_CACHE)
    x_tr = train["digits_x"].transpose(0, 2, 3, 1)
    test = np.load(MODELS / "keras_digits_test.npz")
    model = build()
    model.compile(optimizer=tf.keras.optimizers.Adam(3e-3),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x_tr, train["digits_y"], epochs=40, batch_size=64, verbose=0)
    want = model.predict(test["input"], verbose=0)
    print(f"keras test accuracy {np.mean(want.argmax(1) == test['labels']):.4f}")
    for name, transposes in (("keras_cnn.onnx", False), ("keras_cnn_transposes.onnx", True)):
        path = MODELS / name
        convert(model, path, transposes)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: test["input"]})[0]
        diff = float(np.abs(got - want).max())
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        print(f"{name}: max |onnx - keras| {diff:.2e}, accuracy "
              f"{np.mean(got.argmax(1) == test['labels']):.4f}, Transpose x{ops.count('Transpose')}"
              f", {len(ops)} nodes")
        assert diff < 1e-4, diff


if __name__ == "__main__":
    sys.exit(main())
