"""Train small digit classifiers and export them as ONNX test fixtures.

Run from the repository root::

    pip install -e .[tools] && python tools/train_models.py

(``torch==2.13.0`` lives in the ``tools`` extra of ``pyproject.toml``.)

The script is deterministic (fixed seeds, CPU only, deterministic algorithms) and
takes well under three minutes on two cores. It trains on scikit-learn's
``load_digits`` (8x8 grey digits, 10 classes) and writes into ``models/``:

* ``digits_{flat,img}_{calib,test}.npz`` - calibration / test splits
  (``input`` float32, ``labels`` int64), disjoint from the training split;
* ``digits_mlp.onnx`` / ``digits_mlp_dynamo.onnx`` - MLP 64-256-128-10;
* ``digits_cnn.onnx`` / ``digits_cnn_dynamo.onnx`` - small ResNet-style CNN
  (BatchNorm fused into Conv by the exporters);
* ``digits_cnn_bn.onnx`` - the same CNN with BatchNormalization nodes kept;
* ``digits_cnn_masked.onnx`` - the CNN with structurally zeroed filters/neurons;
* ``MODELS.md`` - a summary table (accuracies measured with onnxruntime).

Every exported file is checked with ``onnx.checker`` (full check), run in
onnxruntime at batch sizes 1 and 7 and compared with the torch logits.
"""

from __future__ import annotations

import copy
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.utils import prune

SEED = 0
ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "models"
LEGACY_OPSET = 17
FALLBACK_IR_VERSION = 10
ATOL = 1e-4
MAX_FILE_BYTES = 1 << 20
IO_NAMES = {"input_names": ["input"], "output_names": ["logits"]}
DYNAMIC_AXES = {"input": {0: "batch"}, "logits": {0: "batch"}}


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Split:
    """Flat digits (``[N, 64]`` float32 in [0, 1]) with int64 labels."""

    x: np.ndarray
    y: np.ndarray

    def images(self) -> np.ndarray:
        return self.x.reshape(-1, 1, 8, 8)


@dataclass(frozen=True)
class Data:
    train: Split
    calib: Split
    test: Split


def seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def load_data() -> Data:
    """Stratified 60/20/20 train/calibration/test split of ``load_digits``."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_rest, y_tr, y_rest = train_test_split(
        x, y, test_size=0.4, stratify=y, random_state=SEED
    )
    x_ca, x_te, y_ca, y_te = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=SEED
    )
    return Data(Split(x_tr, y_tr), Split(x_ca, y_ca), Split(x_te, y_te))


def save_splits(data: Data) -> list[Path]:
    paths = []
    for name, split in (("calib", data.calib), ("test", data.test)):
        for kind, x in (("flat", split.x), ("img", split.images())):
            path = MODELS_DIR / f"digits_{kind}_{name}.npz"
            np.savez_compressed(path, input=np.ascontiguousarray(x), labels=split.y)
            paths.append(path)
    return paths


# ------------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    )


class ResBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual Add (identity or 1x1 projection)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        needs_projection = stride != 1 or c_in != c_out
        self.shortcut = conv_bn(c_in, c_out, 1, stride) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 16, 3)
        self.block_a = ResBlock(16, 16)
        self.block_b = ResBlock(16, 32, stride=2)
        self.block_c = ResBlock(32, 32)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def blocks(self) -> list[ResBlock]:
        return [self.block_a, self.block_b, self.block_c]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = self.block_c(self.block_b(self.block_a(x)))
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


# ----------------------------------------------------------------------- training

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each 8x8 image by up to one pixel in each direction (zero fill)."""
    padded = F.pad(x, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (x.shape[0], 2), generator=gen)
    out = torch.empty_like(x)
    for dy in range(3):
        for dx in range(3):
            sel = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
            out[sel] = padded[sel, :, dy : dy + 8, dx : dx + 8]
    return out


def batches(
    x: torch.Tensor, y: torch.Tensor, size: int, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(x.shape[0], generator=gen)
    for start in range(0, x.shape[0], size):
        idx = order[start : start + size]
        yield x[idx], y[idx]


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    lr: float = 2e-3,
    augment: Augment | None = None,
) -> nn.Module:
    """Adam + cosine schedule, cross-entropy, batch size 64."""
    gen = torch.Generator().manual_seed(SEED)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    model.train()
    for _ in range(epochs):
        for xb, yb in batches(xt, yt, 64, gen):
            inputs = augment(xb, gen) if augment else xb
            loss = F.cross_entropy(model(inputs), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    return model(torch.from_numpy(x)).numpy()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


# ------------------------------------------------------------------------ masking


def mask_channels(module: nn.Module, name: str, channel_mask: torch.Tensor) -> None:
    """Apply a per-output-channel mask to ``module.<name>`` (any rank)."""
    param = getattr(module, name)
    shape = (-1,) + (1,) * (param.dim() - 1)
    prune.custom_from_mask(module, name, channel_mask.reshape(shape).expand_as(param))


def structured_prune(module: nn.Module, amount: float) -> torch.Tensor:
    """L1-structured pruning of output channels; returns the kept-channel mask."""
    prune.ln_structured(module, "weight", amount=amount, n=1, dim=0)
    return module.weight_mask.flatten(1).amax(dim=1)


def make_masked_cnn(cnn: DigitsCNN, data: Data, epochs: int = 8) -> tuple[DigitsCNN, int, int]:
    """Zero half the block-internal filters and a quarter of fc1's neurons, then fine-tune.

    Returns the masked model, the number of zeroed conv filters and of zeroed fc1 neurons.
    """
    model = copy.deepcopy(cnn)
    masked: list[tuple[nn.Module, list[str]]] = []
    for block in model.blocks():
        keep = structured_prune(block.conv1, amount=0.5)
        mask_channels(block.bn1, "weight", keep)
        mask_channels(block.bn1, "bias", keep)
        masked += [(block.conv1, ["weight"]), (block.bn1, ["weight", "bias"])]
    keep = structured_prune(model.fc1, amount=0.25)
    mask_channels(model.fc1, "bias", keep)
    masked.append((model.fc1, ["weight", "bias"]))

    train(model, data.train.images(), data.train.y, epochs, lr=5e-4, augment=random_shift)
    for module, names in masked:
        for name in names:
            prune.remove(module, name)

    zero_filters = sum(zero_rows(b.conv1.weight) for b in model.blocks())
    zero_neurons = zero_rows(model.fc1.weight)
    return model.eval(), zero_filters, zero_neurons


def zero_rows(weight: torch.Tensor) -> int:
    return int((weight.detach().flatten(1).abs().amax(dim=1) == 0).sum())


# ------------------------------------------------------------------------- export


def export_legacy(model: nn.Module, example: torch.Tensor, path: Path, **kwargs: object) -> None:
    torch.onnx.export(
        model.eval(),
        (example,),
        str(path),
        dynamo=False,
        opset_version=LEGACY_OPSET,
        dynamic_axes=DYNAMIC_AXES,
        **IO_NAMES,
        **kwargs,
    )
    finalize(path)


def export_dynamo(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        model.eval(),
        (example,),
        str(path),
        dynamo=True,
        external_data=False,
        dynamic_shapes=({0: batch},),
        **IO_NAMES,
    )
    finalize(path)


def ort_supports(model: onnx.ModelProto) -> bool:
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        if "ir version" in str(exc).lower():
            return False
        raise
    return True


def finalize(path: Path) -> None:
    """Re-save with all weights embedded and an IR version onnxruntime can read."""
    model = onnx.load(str(path), load_external_data=True)
    if not ort_supports(model):
        model.ir_version = FALLBACK_IR_VERSION
    onnx.save(model, str(path), save_as_external_data=False)
    stray = path.with_name(path.name + ".data")
    if stray.exists():
        stray.unlink()


# --------------------------------------------------------------------- validation


@dataclass
class Report:
    file: str
    architecture: str
    exporter: str
    torch_params: int
    onnx_weights: int
    accuracy: float
    max_abs_diff: float
    op_types: Counter[str]
    opset: int
    ir_version: int
    constant_weights: int
    size: int
    notes: str = ""


def run_ort(path: Path, x: np.ndarray, batch_size: int) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = [
        sess.run(["logits"], {"input": x[i : i + batch_size]})[0]
        for i in range(0, x.shape[0], batch_size)
    ]
    return np.concatenate(outs)


def onnx_weight_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def constant_weight_count(model: onnx.ModelProto) -> int:
    """Number of Constant nodes that hold a tensor with more than one element."""
    count = 0
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        for attr in node.attribute:
            if attr.name == "value" and int(np.prod(attr.t.dims)) > 1:
                count += 1
    return count


def validate(
    path: Path, model: nn.Module, split: Split, image: bool, architecture: str, exporter: str
) -> Report:
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    size = path.stat().st_size
    assert size < MAX_FILE_BYTES, f"{path.name} is {size} bytes"
    assert not path.with_name(path.name + ".data").exists(), f"{path.name} has external data"

    x = split.images() if image else split.x
    expected = torch_logits(model, x)
    max_diff = 0.0
    for batch_size in (1, 7):
        got = run_ort(path, x, batch_size)
        assert got.shape == expected.shape, (path.name, got.shape)
        max_diff = max(max_diff, float(np.abs(got - expected).max()))
    assert max_diff <= ATOL, f"{path.name}: max |onnx - torch| = {max_diff:.2e}"

    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return Report(
        file=path.name,
        architecture=architecture,
        exporter=exporter,
        torch_params=sum(p.numel() for p in model.parameters()),
        onnx_weights=onnx_weight_count(proto),
        accuracy=accuracy(run_ort(path, x, 64), split.y),
        max_abs_diff=max_diff,
        op_types=Counter(n.op_type for n in proto.graph.node),
        opset=opset,
        ir_version=proto.ir_version,
        constant_weights=constant_weight_count(proto),
        size=size,
    )


def zeroed_in_onnx(path: Path) -> tuple[int, int]:
    """All-zero output channels of Conv weights and all-zero rows of Gemm weights."""
    proto = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    conv = gemm = 0
    for node in proto.graph.node:
        weight = inits.get(node.input[1]) if len(node.input) > 1 else None
        if weight is None:
            continue
        rows = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1) == 0
        if node.op_type == "Conv":
            conv += int(rows.sum())
        elif node.op_type == "Gemm":
            gemm += int(rows.sum())
    return conv, gemm


# ------------------------------------------------------------------------ reports

CNN_ARCH = (
    "ResNet-style CNN: stem 1->16, res blocks 16->16, 16->32 (stride 2, 1x1 projection), "
    "32->32; flatten 512 -> FC 64 -> 10"
)
NOTES = {
    "digits_mlp_dynamo.onnx": "weights as initializers; no Shape ops",
    "digits_cnn_dynamo.onnx": "BN folded by the onnxscript optimizer; flatten is "
    "`Reshape(x, [-1, 512])` (constant shape initializer, allowzero=1), no Shape ops",
    "digits_cnn_bn.onnx": "8 BatchNormalization nodes; `block_b.bn2.bias` and "
    "`block_b.shortcut.1.bias` train to identical values, so the exporter dedups them "
    "into one initializer plus an `Identity` node",
}
MLP_ARCH = "MLP 64-256-128-10 (ReLU)"


def print_summary(reports: list[Report]) -> None:
    header = f"{'file':<24} {'exporter':<34} {'opset':>5} {'ir':>3} {'weights':>7} {'acc':>7}"
    print(header + f" {'max|diff|':>9} {'bytes':>7}")
    print("-" * (len(header) + 18))
    for r in reports:
        print(
            f"{r.file:<24} {r.exporter:<34} {r.opset:>5} {r.ir_version:>3} {r.onnx_weights:>7} "
            f"{r.accuracy:>7.2%} {r.max_abs_diff:>9.1e} {r.size:>7}"
        )
    for r in reports:
        ops = ", ".join(f"{k}x{v}" for k, v in sorted(r.op_types.items()))
        print(f"  {r.file}: {ops}; Constant weight tensors: {r.constant_weights}")


def write_models_md(reports: list[Report], data_files: list[Path]) -> Path:
    lines = [
        "# Test models",
        "",
        "Generated by `tools/train_models.py` (`pip install -e .[tools] && "
        "python tools/train_models.py`). Deterministic: seed 0, CPU, torch 2.13.0.",
        "",
        "Data: scikit-learn `load_digits`, pixels / 16 as float32; stratified split "
        "(seed 0) 60% train / 20% calibration / 20% test. Flat models take `[N, 64]`, "
        "image models `[N, 1, 8, 8]`; the batch dimension is dynamic in every file. "
        "Input `input`, output `logits` (`[N, 10]`).",
        "",
        "| file | architecture | exporter | torch params | ONNX weights | opset | "
        "test acc (onnxruntime) | notes |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in reports:
        lines.append(
            f"| `{r.file}` | {r.architecture} | {r.exporter} | {r.torch_params} | "
            f"{r.onnx_weights} | {r.opset} | {r.accuracy:.2%} | {r.notes} |"
        )
    lines += ["", "Data files:", ""]
    lines += [f"- `{p.name}`: keys `input`, `labels`" for p in data_files]
    lines += [
        "",
        '"ONNX weights" counts initializer elements (BatchNorm running statistics '
        "included where BN nodes are kept). All files pass `onnx.checker.check_model("
        "full_check=True)` and match the torch logits to 1e-4 in onnxruntime at batch "
        "sizes 1 and 7.",
        "",
    ]
    path = MODELS_DIR / "MODELS.md"
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------------- main


def build_mlp(data: Data) -> MLP:
    seed_everything()
    model = train(MLP(), data.train.x, data.train.y, epochs=60)
    print(f"MLP torch test accuracy: {accuracy(torch_logits(model, data.test.x), data.test.y):.2%}")
    return model


def build_cnn(data: Data) -> DigitsCNN:
    seed_everything()
    model = train(DigitsCNN(), data.train.images(), data.train.y, 40, augment=random_shift)
    acc = accuracy(torch_logits(model, data.test.images()), data.test.y)
    print(f"CNN torch test accuracy: {acc:.2%}")
    return model


def main() -> None:
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    data = load_data()
    data_files = save_splits(data)

    mlp = build_mlp(data)
    cnn = build_cnn(data)
    seed_everything()
    masked, zero_filters, zero_neurons = make_masked_cnn(cnn, data)
    print(f"Masked CNN: {zero_filters} conv filters and {zero_neurons} fc1 neurons zeroed")

    x_flat = torch.from_numpy(data.test.x[:4])
    x_img = torch.from_numpy(data.test.images()[:4])
    legacy = f"torchscript, opset {LEGACY_OPSET}"
    jobs = [
        ("digits_mlp.onnx", mlp, False, MLP_ARCH, legacy),
        ("digits_mlp_dynamo.onnx", mlp, False, MLP_ARCH, "dynamo"),
        ("digits_cnn.onnx", cnn, True, CNN_ARCH, legacy + " (BN fused)"),
        ("digits_cnn_dynamo.onnx", cnn, True, CNN_ARCH, "dynamo (BN fused)"),
        ("digits_cnn_bn.onnx", cnn, True, CNN_ARCH, legacy + ", BN kept"),
        ("digits_cnn_masked.onnx", masked, True, CNN_ARCH, legacy + " (BN fused)"),
    ]
    reports = []
    for name, model, image, arch, exporter in jobs:
        path = MODELS_DIR / name
        example = x_img if image else x_flat
        if "dynamo" in name:
            export_dynamo(model, example, path)
        elif name == "digits_cnn_bn.onnx":
            export_legacy(model, example, path, training=torch.onnx.TrainingMode.PRESERVE)
        else:
            export_legacy(model, example, path)
        reports.append(validate(path, model, data.test, image, arch, exporter))

    by_name = {r.file: r for r in reports}
    for name, note in NOTES.items():
        by_name[name].notes = note
    assert by_name["digits_cnn_bn.onnx"].op_types["BatchNormalization"] > 0
    assert by_name["digits_cnn.onnx"].op_types["BatchNormalization"] == 0
    onnx_filters, onnx_neurons = zeroed_in_onnx(MODELS_DIR / "digits_cnn_masked.onnx")
    assert (onnx_filters, onnx_neurons) == (zero_filters, zero_neurons)
    by_name["digits_cnn_masked.onnx"].notes = (
        f"{zero_filters} of 80 block-internal conv filters zeroed (50% of each block's "
        f"first conv), {zero_neurons} of 64 fc1 neurons zeroed (weights and bias)"
    )

    print_summary(reports)
    md = write_models_md(reports, data_files)
    for path in [*data_files, *(MODELS_DIR / r.file for r in reports), md]:
        print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
