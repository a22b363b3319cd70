"""Second held-out set: exporters and architectures the first set (heldout_export.py) lacks.

    python tools/heldout_export2.py torch  --out /tmp/heldout2
    /tmp/venv-exp/bin/python    tools/heldout_export2.py paddle  --out /tmp/heldout2
    /tmp/venv-exp-tf/bin/python tools/heldout_export2.py keras   --out /tmp/heldout2
    /tmp/venv-skl/bin/python    tools/heldout_export2.py sklearn --out /tmp/heldout2

scikit-learn MLPs through skl2onnx (ZipMap / label outputs), Keras DenseNet / Xception /
autoencoder / BN-after-Dense / MultiHeadAttention / Embedding+Conv1D text models through
tf2onnx, Paddle MobileNetV1, a PP-LCNet-like net, a dense block and a U-Net with
conv2d_transpose through paddle2onnx, and ``heldout_torch2``'s nets with both torch exporters.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import heldout_export as first

IMG = first.IMG


def export_torch(out: Path) -> None:
    from heldout_torch2 import build_all

    first.torch_models = lambda: build_all(IMG)
    first.export_torch(out)


# ----------------------------------------------------------------------------- sklearn


def export_sklearn(out: Path) -> None:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    fit = {"max_iter": 60, "random_state": 0}
    fit = {"max_iter": 60, "random_state": 0}
    models = {f"mlp_{a}": MLPClassifier(hidden_layer_sizes=(48, 32), activation=a, **fit)
              for a in ("relu", "tanh", "logistic")}
    models["mlp_regressor"] = MLPRegressor(hidden_layer_sizes=(48, 32), **fit)
    models["pipeline_scaler_mlp"] = make_pipeline(
        StandardScaler(), MLPClassifier(hidden_layer_sizes=(64,), **fit))
    models["mlp_nozipmap"] = MLPClassifier(hidden_layer_sizes=(48,), **fit)
    for name, est in models.items():
        path = out / f"sklearn_{name}.onnx"
        if path.exists():
            continue
        target = y.astype(np.float32) if "regressor" in name else y
        est.fit(x, target)
        opts = {id(est): {"zipmap": False}} if "nozipmap" in name else None
        proto = to_onnx(est, x[:1], target_opset=17, options=opts)
        first.finish(proto, path)
        want = est.predict(x[:8])
        import onnxruntime as ort

        got = ort.InferenceSession(str(path)).run(None, {proto.graph.input[0].name: x[:8]})[0]
        ok = np.allclose(np.ravel(got), np.ravel(want), rtol=1e-3, atol=1e-3)
        print(f"{path.name}: {'ok' if ok else 'MISMATCH'}", flush=True)
        if not ok:
            path.unlink()


# ------------------------------------------------------------------------------- keras


def keras_models() -> dict:
    import tensorflow as tf

    layers = tf.keras.layers

    def densenet():
        img = tf.keras.Input((IMG, IMG, 3), name="x")
        h = layers.Conv2D(24, 3, 2, padding="same", use_bias=False)(img)
        for block in range(2):
            for _ in range(3):
                y = layers.ReLU()(layers.BatchNormalization()(h))
                y = layers.Conv2D(32, 1, use_bias=False)(y)
                y = layers.ReLU()(layers.BatchNormalization()(y))
                y = layers.Conv2D(12, 3, padding="same", use_bias=False)(y)
                h = layers.Concatenate()([h, y])
            if block == 0:
                h = layers.Conv2D(h.shape[-1] // 2, 1, use_bias=False)(
                    layers.ReLU()(layers.BatchNormalization()(h)))
                h = layers.AveragePooling2D(2)(h)
        h = layers.GlobalAveragePooling2D()(layers.ReLU()(layers.BatchNormalization()(h)))
        return tf.keras.Model(img, layers.Dense(10)(h))

    def xception():
        img = tf.keras.Input((IMG, IMG, 3), name="x")
        h = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(32, 3, 2, "same")(img)))
        for f in (48, 64):
            skip = layers.BatchNormalization()(layers.Conv2D(f, 1, 2, use_bias=False)(h))
            y = layers.BatchNormalization()(layers.SeparableConv2D(f, 3, padding="same")(h))
            y = layers.BatchNormalization()(layers.SeparableConv2D(f, 3, padding="same")(
                layers.ReLU()(y)))
            h = layers.Add()([layers.MaxPooling2D(3, 2, "same")(y), skip])
        return tf.keras.Model(img, layers.Dense(10)(layers.GlobalAveragePooling2D()(h)))

    def autoencoder():
        img = tf.keras.Input((IMG, IMG, 3), name="x")
        h = layers.Conv2D(16, 3, 2, "same", activation="relu")(img)
        h = layers.Conv2D(32, 3, 2, "same", activation="relu")(h)
        h = layers.Conv2DTranspose(32, 3, 2, "same", activation="relu")(h)
        h = layers.Conv2DTranspose(16, 3, 2, "same", activation="relu")(h)
        return tf.keras.Model(img, layers.Conv2D(3, 3, padding="same")(h))

    def bn_mlp():
        inp = tf.keras.Input((40,), name="x")
        h = inp
        for w in (64, 48):
            h = layers.ReLU()(layers.BatchNormalization()(layers.Dense(w)(h)))
        return tf.keras.Model(inp, layers.Dense(6, activation="softmax")(h))

    def mha():
        inp = tf.keras.Input((16, 24), name="x")
        h = layers.LayerNormalization()(inp + layers.MultiHeadAttention(4, 8)(inp, inp))
        h = layers.Dense(24)(layers.Dense(48, activation="relu")(h)) + h
        return tf.keras.Model(inp, layers.Dense(5)(layers.GlobalAveragePooling1D()(h)))

    def text_cnn():
        inp = tf.keras.Input((40,), dtype="int32", name="x")
        h = layers.Embedding(200, 32)(inp)
        h = layers.Conv1D(48, 5, activation="relu")(h)
        h = layers.GlobalMaxPooling1D()(h)
        return tf.keras.Model(inp, layers.Dense(4)(layers.Dense(32, "relu")(h)))

    return {"densenet_small": densenet, "xception_small": xception,
            "conv_transpose_ae": autoencoder, "bn_after_dense_mlp": bn_mlp,
            "mha_small": mha, "text_cnn_globalmax": text_cnn}


def export_keras(out: Path) -> None:
    first.keras_models = keras_models
    first.export_keras(out)


# ------------------------------------------------------------------------------ paddle


def paddle_nets() -> dict:
    import paddle
    from paddle import nn
    from paddle.vision import models as pm

    def cbr(a, b, k=3, s=1, g=1, act=nn.ReLU):
        return nn.Sequential(nn.Conv2D(a, b, k, s, k // 2, groups=g, bias_attr=False),
                             nn.BatchNorm2D(b), act())

    class LCNet(nn.Layer):
        """PP-LCNet-like: depthwise + hardswish + SE (hardsigmoid) + pointwise."""

        def __init__(self):
            super().__init__()
            self.stem = cbr(3, 16, 3, 2, act=nn.Hardswish)
            blocks, c = [], 16
            for w, s, se in ((32, 2, False), (48, 2, True), (48, 1, True)):
                blocks += [cbr(c, c, 3, s, c, nn.Hardswish)]
                if se:
                    blocks += [SE(c)]
                blocks += [cbr(c, w, 1, act=nn.Hardswish)]
                c = w
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(c, 10)

        def forward(self, x):
            return self.fc(self.blocks(self.stem(x)).mean([2, 3]))

    class SE(nn.Layer):
        def __init__(self, c):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2D(1)
            self.a, self.b = nn.Conv2D(c, c // 4, 1), nn.Conv2D(c // 4, c, 1)

        def forward(self, x):
            return x * nn.functional.hardsigmoid(self.b(nn.functional.relu(self.a(self.pool(x)))))

    class Dense(nn.Layer):
        def __init__(self):
            super().__init__()
            self.stem = cbr(3, 24, 3, 2)
            self.layers = nn.LayerList([cbr(24 + 12 * i, 12) for i in range(3)])
            self.fc = nn.Linear(60, 10)

        def forward(self, x):
            h = self.stem(x)
            for layer in self.layers:
                h = paddle.concat([h, layer(h)], 1)
            return self.fc(h.mean([2, 3]))

    class UNet(nn.Layer):
        def __init__(self, c=16):
            super().__init__()
            self.d1, self.d2 = cbr(3, c), cbr(c, 2 * c, 3, 2)
            self.up = nn.Conv2DTranspose(2 * c, c, 2, 2)
            self.c1 = cbr(2 * c, c)
            self.out = nn.Conv2D(c, 2, 1)

        def forward(self, x):
            a = self.d1(x)
            return self.out(self.c1(paddle.concat([self.up(self.d2(a)), a], 1)))

    return {"mobilenet_v1_x025": lambda: pm.mobilenet_v1(scale=0.25, num_classes=10),
            "lcnet_like": LCNet, "dense_block": Dense, "unet_convtranspose": UNet}


def export_paddle(out: Path) -> None:
    import tempfile

    import paddle
    import paddle2onnx

    paddle.seed(0)
    paddle.set_device("cpu")
    x = np.random.default_rng(0).standard_normal((2, 3, IMG, IMG)).astype(np.float32)
    for name, make in paddle_nets().items():
        path = out / f"paddle_{name}.onnx"
        if path.exists():
            continue
        try:
            net = make()
            first._randomize_bn_paddle(net)
            net.eval()
            want = net(paddle.to_tensor(x)).numpy()
            spec = [paddle.static.InputSpec([None, 3, IMG, IMG], "float32", "x")]
            with tempfile.TemporaryDirectory() as tmp:
                paddle.jit.save(net, f"{tmp}/m", input_spec=spec)
                program = next(p for p in Path(tmp).iterdir()
                               if p.suffix in (".json", ".pdmodel"))
                raw = paddle2onnx.export(str(program), f"{tmp}/m.pdiparams", None,
                                         opset_version=11, optimize_tool="None")
            first.finish(first.onnx.load_from_string(raw), path)
            first.check(path, {"x": x}, want)
        except Exception as exc:
            print(f"{path.name}: export failed: {type(exc).__name__}: {exc}"[:300])
            path.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("framework", choices=("torch", "paddle", "keras", "sklearn"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/heldout2"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    {"torch": export_torch, "paddle": export_paddle, "keras": export_keras,
     "sklearn": export_sklearn}[args.framework](args.out)


if __name__ == "__main__":
    main()
