"""Export real architectures with real exporters into a scratch directory (a held-out set).

Each framework is imported only inside its own function, because each lives in its own
virtual environment here (torch in the project's .venv; Paddle and TensorFlow elsewhere)::

    python tools/heldout_export.py torch  --out /tmp/heldout
    /tmp/venv-exp/bin/python    tools/heldout_export.py paddle --out /tmp/heldout
    /tmp/venv-exp-tf/bin/python tools/heldout_export.py keras  --out /tmp/heldout

Random initialisation (exact mode needs only the function; BatchNorm statistics are
randomised so no layer is an identity). Every file is checked against its framework in
onnxruntime before it is kept. ``tools/heldout_sweep.py`` runs the sweep over the result.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

IMG = 64  # image side of every image model: small enough for a 2-core sweep


def check(path: Path, feeds: dict[str, np.ndarray], want: np.ndarray) -> None:
    """Keep the file only if onnxruntime reproduces the framework's output."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)[0]
    err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))
    status = "ok" if err < 1e-3 else "MISMATCH"
    print(f"{path.name}: rel err vs framework {err:.1e} {status}", flush=True)
    if err >= 1e-3:
        path.unlink()


def finish(proto: onnx.ModelProto, path: Path) -> None:
    proto.ir_version = min(proto.ir_version, 10)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


# ------------------------------------------------------------------------------- torch


def torch_models() -> dict:
    """Name -> (module, input shape); plain torch, no torchvision."""
    from heldout_torch import build_all

    return build_all(IMG)


def export_torch(out: Path) -> None:
    import torch

    torch.manual_seed(0)
    for name, (net, shape) in torch_models().items():
        net.eval()
        x = torch.randn(*shape)
        with torch.no_grad():
            want = net(x).numpy()
        for dynamo in (False, True):
            path = out / f"torch_{name}{'_dynamo' if dynamo else ''}.onnx"
            if path.exists():
                continue
            try:
                kw = {"dynamo": dynamo, "input_names": ["x"], "output_names": ["y"]}
                if dynamo:
                    kw["dynamic_shapes"] = ({0: torch.export.Dim("N", max=1024)},)
                else:
                    kw["dynamic_axes"] = {"x": {0: "N"}, "y": {0: "N"}}
                torch.onnx.export(net, (x,), str(path), opset_version=17, **kw)
                finish(onnx.load(str(path)), path)
                check(path, {"x": x.numpy()}, want)
            except Exception as exc:  # an exporter failure is a row, not a stop
                print(f"{path.name}: export failed: {type(exc).__name__}: {exc}"[:300])
                path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ paddle


def export_paddle(out: Path) -> None:
    import paddle
    import paddle2onnx
    from paddle.vision import models as pm

    paddle.seed(0)
    paddle.set_device("cpu")
    nets = {"mobilenet_v3_small": lambda: pm.mobilenet_v3_small(num_classes=10),
            "shufflenet_v2_x0_25": lambda: pm.shufflenet_v2_x0_25(num_classes=10),
            "squeezenet1_0": lambda: pm.squeezenet1_0(num_classes=10),
            "mobilenet_v2": lambda: pm.mobilenet_v2(scale=0.5, num_classes=10),
            "resnet18": lambda: pm.resnet18(num_classes=10)}
    x = np.random.default_rng(0).standard_normal((2, 3, IMG, IMG)).astype(np.float32)
    for name, make in nets.items():
        path = out / f"paddle_{name}.onnx"
        if path.exists():
            continue
        net = make()
        _randomize_bn_paddle(net)
        net.eval()
        want = net(paddle.to_tensor(x)).numpy()
        spec = [paddle.static.InputSpec([None, 3, IMG, IMG], "float32", "x")]
        with tempfile.TemporaryDirectory() as tmp:
            paddle.jit.save(net, f"{tmp}/m", input_spec=spec)
            program = next(p for p in Path(tmp).iterdir() if p.suffix in (".json", ".pdmodel"))
            raw = paddle2onnx.export(str(program), f"{tmp}/m.pdiparams", None,
                                     opset_version=11, optimize_tool="None")
        finish(onnx.load_from_string(raw), path)
        check(path, {"x": x}, want)


def _randomize_bn_paddle(net) -> None:
    import paddle

    rng = np.random.default_rng(1)
    for layer in net.sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):
            c = layer._mean.shape[0]
            layer._mean.set_value(rng.normal(0, 0.1, c).astype(np.float32))
            layer._variance.set_value(rng.uniform(0.5, 1.5, c).astype(np.float32))
            layer.weight.set_value(rng.uniform(0.5, 1.5, c).astype(np.float32))
            layer.bias.set_value(rng.normal(0, 0.1, c).astype(np.float32))


# ------------------------------------------------------------------------------- keras


def keras_models() -> dict:
    import tensorflow as tf

    apps, layers = tf.keras.applications, tf.keras.layers
    shape = (IMG, IMG, 3)
    models = {
        "mobilenetv2_a035": lambda: apps.MobileNetV2(shape, alpha=0.35, weights=None,
                                                     classes=10),
        "efficientnetb0": lambda: apps.EfficientNetB0(weights=None, input_shape=shape,
                                                      classes=10),
        "nasnetmobile": lambda: apps.NASNetMobile(shape, weights=None, classes=10)}

    def text(cell):
        def make():
            inp = tf.keras.Input((20,), dtype="int32", name="x")
            h = layers.Embedding(200, 32)(inp)
            h = cell(48, return_sequences=True)(h)
            h = cell(32)(h)
            return tf.keras.Model(inp, layers.Dense(5)(layers.Dense(24, "relu")(h)))
        return make

    def conv1d():
        inp = tf.keras.Input((128, 4), name="x")
        h = inp
        for f in (16, 32, 32):
            h = layers.Conv1D(f, 5, padding="same")(h)
            h = layers.ReLU()(layers.BatchNormalization()(h))
            h = layers.MaxPooling1D(2)(h)
        h = layers.GlobalAveragePooling1D()(h)
        return tf.keras.Model(inp, layers.Dense(6)(layers.Dense(32, "relu")(h)))

    models.update(lstm_text=text(layers.LSTM), gru_text=text(layers.GRU), conv1d=conv1d)
    return models


def export_keras(out: Path) -> None:
    import tensorflow as tf
    import tf2onnx

    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    for name, make in keras_models().items():
        path = out / f"keras_{name}.onnx"
        if path.exists():
            continue
        try:
            model = make()
            _randomize_bn_keras(model)
            shape, dtype = model.inputs[0].shape, model.inputs[0].dtype
            if "int" in str(dtype):
                x = rng.integers(0, 200, (2, *shape[1:])).astype(np.int32)
            else:
                x = rng.standard_normal((2, *shape[1:])).astype(np.float32)
            want = model(x, training=False).numpy()
            spec = (tf.TensorSpec([None, *shape[1:]], dtype, name="x"),)
            fn = tf.function(lambda t, m=model: m(t, training=False))
            proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17)
            finish(proto, path)
            check(path, {proto.graph.input[0].name: x}, want)
        except Exception as exc:
            print(f"{path.name}: export failed: {type(exc).__name__}: {exc}"[:300])
            path.unlink(missing_ok=True)


def _randomize_bn_keras(model) -> None:
    import tensorflow as tf

    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.Normalization):
            # Keras 3 keeps mean / variance as eager tensors, which tf2onnx turns into
            # graph inputs: variables get frozen into constants instead
            layer.finalize_state()
            for name in ("mean", "variance"):
                value = tf.Variable(getattr(layer, name), trainable=False)
                object.__setattr__(layer, name, value)
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            g, b, m, v = (w.numpy() for w in layer.weights)
            layer.set_weights([rng.uniform(0.5, 1.5, g.shape), rng.normal(0, 0.1, b.shape),
                               rng.normal(0, 0.1, m.shape), rng.uniform(0.5, 1.5, v.shape)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("framework", choices=("torch", "paddle", "keras"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/heldout"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    {"torch": export_torch, "paddle": export_paddle, "keras": export_keras}[args.framework](
        args.out)


if __name__ == "__main__":
    main()
