"""Train a small PP-LCNet-style classifier in Paddle and convert it with the real paddle2onnx.

Runs in its own virtual environment::

    python3.11 -m venv /tmp/pdenv && /tmp/pdenv/bin/pip install paddlepaddle paddle2onnx \\
        packaging onnxruntime
    python tools/exporter_models.py            # writes the data this script reads
    /tmp/pdenv/bin/python tools/exporter_paddle.py

Writes ``models/paddle_lcnet.onnx``: ``paddle.jit.save`` then ``paddle2onnx.export`` at
opset 11 (PaddleOCR's published models are opset 11/12) with ``optimize_tool="None"``, i.e.
without the polygraphy constant-folding pass paddle2onnx 2.x runs by default. That is the
graph paddle2onnx itself writes, and what the 1.x releases that exported PaddleOCR's models
shipped: weights in ``Constant`` nodes, each bias ``Constant -> Reshape -> Add``,
BatchNormalization kept, hardswish as ``HardSigmoid`` + ``Mul``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import paddle
import paddle2onnx
from paddle import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exporter_data import TRAIN_CACHE, shift

MODELS = Path(__file__).resolve().parent.parent / "models"


class ConvBNLayer(nn.Layer):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2D(c_in, c_out, k, stride, (k - 1) // 2, groups=groups,
                              bias_attr=False)
        self.bn = nn.BatchNorm2D(c_out)
        self.act = nn.Hardswish()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class SEModule(nn.Layer):
    """PaddleClas PP-LCNet SE: pool, conv, ReLU, conv, Hardsigmoid, multiply."""

    def __init__(self, c: int, reduction: int = 4) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2D(1)
        self.conv1 = nn.Conv2D(c, c // reduction, 1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2D(c // reduction, c, 1)
        self.hardsigmoid = nn.Hardsigmoid()

    def forward(self, x):
        identity = x
        x = self.hardsigmoid(self.conv2(self.relu(self.conv1(self.avg_pool(x)))))
        return paddle.multiply(x=identity, y=x)


class DepthwiseSeparable(nn.Layer):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int, se: bool) -> None:
        super().__init__()
        self.dw_conv = ConvBNLayer(c_in, c_in, k, stride, groups=c_in)
        self.se = SEModule(c_in) if se else None
        self.pw_conv = ConvBNLayer(c_in, c_out, 1, 1)

    def forward(self, x):
        x = self.dw_conv(x)
        if self.se is not None:
            x = self.se(x)
        return self.pw_conv(x)


# (in, out, kernel, stride, SE), a scaled-down PP-LCNet
CFG = ((16, 32, 3, 1, False), (32, 64, 3, 2, False), (64, 64, 3, 1, False),
       (64, 96, 5, 2, True), (96, 96, 5, 1, True))


class LCNet(nn.Layer):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = ConvBNLayer(1, 16, 3, 2)
        self.blocks = nn.Sequential(*(DepthwiseSeparable(*c) for c in CFG))
        self.avg_pool = nn.AdaptiveAvgPool2D(1)
        self.last_conv = nn.Conv2D(96, 128, 1, bias_attr=False)
        self.hardswish = nn.Hardswish()
        self.flatten = nn.Flatten(start_axis=1, stop_axis=-1)
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        x = self.avg_pool(self.blocks(self.conv1(x)))
        return self.fc(self.flatten(self.hardswish(self.last_conv(x))))


def train(net: LCNet, x: np.ndarray, y: np.ndarray, epochs: int = 6) -> None:
    steps = epochs * ((len(x) + 63) // 64)
    sched = paddle.optimizer.lr.OneCycleLR(max_learning_rate=3e-3, total_steps=steps)
    opt = paddle.optimizer.Adam(learning_rate=sched, parameters=net.parameters(),
                                weight_decay=1e-4)
    rng = np.random.default_rng(0)
    net.train()
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), 64):
            idx = order[start: start + 64]
            logits = net(paddle.to_tensor(x[idx]))
            loss = nn.functional.cross_entropy(logits, paddle.to_tensor(y[idx]))
            opt.clear_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()


def export(net: LCNet, path: Path) -> None:
    spec = [paddle.static.InputSpec([None, 1, 28, 28], "float32", "x")]
    with tempfile.TemporaryDirectory() as tmp:
        paddle.jit.save(net, f"{tmp}/lcnet", input_spec=spec)
        program = next(p for p in Path(tmp).iterdir() if p.suffix in (".json", ".pdmodel"))
        raw = paddle2onnx.export(str(program), f"{tmp}/lcnet.pdiparams", None,
                                 opset_version=11, optimize_tool="None")
    proto = onnx.load_from_string(raw)
    proto.ir_version = min(proto.ir_version, 10)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def main() -> None:
    paddle.seed(0)
    paddle.set_device("cpu")
    cache = np.load(TRAIN_CACHE)
    test = np.load(MODELS / "mnist_img_test.npz")
    net = LCNet()
    x = np.concatenate([cache["mnist_x"], shift(cache["mnist_x"], 1)])
    train(net, x, np.concatenate([cache["mnist_y"], cache["mnist_y"]]))
    want = net(paddle.to_tensor(test["input"])).numpy()
    print(f"paddle test accuracy {np.mean(want.argmax(1) == test['labels']):.4f}")
    path = MODELS / "paddle_lcnet.onnx"
    export(net, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = np.concatenate([sess.run(None, {"x": test["input"][i: i + 7]})[0]
                          for i in range(0, len(test["input"]), 7)])
    diff = float(np.abs(got - want).max())
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    print(f"{path.name}: max |onnx - paddle| {diff:.2e}, accuracy "
          f"{np.mean(got.argmax(1) == test['labels']):.4f}, Constant x{ops.count('Constant')}, "
          f"{len(ops)} nodes")
    assert diff < 1e-4, diff


if __name__ == "__main__":
    sys.exit(main())
