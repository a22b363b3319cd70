"""Held-out Hugging Face transformers: tiny random-init models, both PyTorch exporters.

Real users export Hugging Face models, whose attention is written with view / transpose /
permute, masks built from ``attention_mask`` (Unsqueeze, Cast, Sub, Mul, Where, Expand),
position ids gathered from a constant, and ``scaled_dot_product_attention``. This script
builds small models from configs (hidden 64, 2 layers, 4 heads), exports each with
``torch.onnx.export`` (TorchScript, ``dynamo=False``, and the dynamo exporter), with a
static and a dynamic sequence length, then sweeps them like ``tools/heldout_sweep.py``
(exact mode with an independent error check, ``--inspect``, calibrated ``--ratio 0.3``
on random token data; coverage and freeze reasons). The ``insp`` column holds the free
attention-head groups over all head groups when ``--inspect`` exits 0.

Two steps, two environments (transformers and torch stay out of the project's deps)::

    python -m venv /tmp/venv-hf && /tmp/venv-hf/bin/pip install torch==2.13.0 \
        transformers onnx onnxscript onnxruntime
    /tmp/venv-hf/bin/python tools/heldout_hf.py export [--out /tmp/heldout_hf]
    python tools/heldout_hf.py sweep [--out /tmp/heldout_hf] [--models NAME ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx

T, VOCAB, N_CALIB, N_TEST = 16, 200, 256, 64
IMG = 32

# ------------------------------------------------------------------------------ export


def _text_config(kind: str, attn: str):
    """A tiny config of a text model (2 layers, 4 heads, hidden 64, FFN 128)."""
    import transformers as tf

    common = {"vocab_size": VOCAB, "num_labels": 3, "attn_implementation": attn}
    if kind == "distilbert":
        return tf.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                   max_position_embeddings=64, **common)
    if kind == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=64,
                             use_cache=False, pad_token_id=0, **common)
    cls = tf.RobertaConfig if kind == "roberta" else tf.BertConfig
    return cls(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128, max_position_embeddings=64, **common)


def build(name: str):
    """(module, example inputs, input names, dynamic sequence axes) for one model name:
    ``<kind>[_eager]`` where kind is bert, bertmodel, distilbert, roberta, gpt2, vit."""
    import torch
    import transformers as tf

    kind, _, attn = name.partition("_")
    attn = attn or "sdpa"
    torch.manual_seed(0)
    if kind == "vit":
        cfg = tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, image_size=IMG, patch_size=8, num_labels=10,
                           attn_implementation=attn)
        net = tf.ViTForImageClassification(cfg)
        return net, (torch.randn(2, 3, IMG, IMG),), ["pixel_values"], {}
    cfg = _text_config(kind if kind != "bertmodel" else "bert", attn)
    net = (tf.BertModel(cfg, add_pooling_layer=True) if kind == "bertmodel" else
           tf.AutoModelForSequenceClassification.from_config(cfg))
    ids = torch.randint(1, VOCAB, (2, T))
    mask = torch.ones(2, T, dtype=torch.int64)
    mask[1, T - 5:] = 0
    return net, (ids, mask), ["input_ids", "attention_mask"], {0: "N", 1: "T"}


def _wrap(net, inputs: int):
    """The model's first output (logits or last hidden state), positional inputs."""
    import torch

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x, return_dict=False)[0]

    class Two(One):
        def forward(self, ids, mask):
            return self.net(ids, attention_mask=mask, return_dict=False)[0]

    return (One if inputs == 1 else Two)()


def _perturb(net) -> None:
    """Hugging Face initialises biases to 0 and LayerNorm to (1, 0); equal tensors that
    the dynamo exporter then shares between layers, which a trained model never has."""
    import torch

    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))


def export_one(name: str, dynamo: bool, dynamic_t: bool, path: Path) -> None:
    import torch

    net, args, names, seq = build(name)
    _perturb(net)
    net.eval()
    wrap = _wrap(net, len(args)).eval()
    with torch.no_grad():
        want = wrap(*args).numpy()
    if dynamo:
        batch = torch.export.Dim("N", max=1024)
        tdim = torch.export.Dim("T", min=2, max=64)
        dims = {0: batch, 1: tdim} if (dynamic_t and seq) else {0: batch}
        kw = {"dynamo": True, "dynamic_shapes": tuple(dims for _ in args)}
    else:
        axes = dict(seq) if dynamic_t and seq else {0: "N"}
        kw = {"dynamo": False, "dynamic_axes": {**{n: axes for n in names}, "y": {0: "N"}}}
    torch.onnx.export(wrap, args, str(path), input_names=names, output_names=["y"],
                      opset_version=18 if dynamo else 17, **kw)
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, 10)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    _check(path, {n: a.numpy() for n, a in zip(names, args, strict=True)}, want)


def _check(path: Path, feeds: dict[str, np.ndarray], want: np.ndarray) -> None:
    import onnxruntime as ort

    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, feeds)[0]
    err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))
    print(f"{path.name}: rel err vs torch {err:.1e} {'ok' if err < 1e-3 else 'MISMATCH'}",
          flush=True)
    if err >= 1e-3:
        path.unlink()


MODELS = ("bert", "bert_eager", "bertmodel", "distilbert", "roberta", "gpt2", "vit",
          "vit_eager")


def export(out: Path, only: list[str] | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        if only and not any(m in name for m in only):
            continue
        for dynamo in (False, True):
            for dynamic_t in ((False, True) if not name.startswith("vit") else (False,)):
                tag = f"hf_{name}{'_dynamo' if dynamo else ''}{'_dynT' if dynamic_t else ''}"
                path = out / f"{tag}.onnx"
                if path.exists():
                    continue
                try:
                    export_one(name, dynamo, dynamic_t, path)
                except Exception as exc:  # an exporter failure is a row, not a stop
                    print(f"{path.name}: export failed: {type(exc).__name__}: {exc}"[:300])
                    path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------- sweep


def make_feeds(model: onnx.ModelProto, n: int, seed: int) -> dict[str, np.ndarray]:
    """Random token ids with right padding (a mask of ones then zeros), or images."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in model.graph.input:
        dims = [d.dim_value or T for d in inp.type.tensor_type.shape.dim][1:]
        if inp.name == "pixel_values":
            feeds[inp.name] = rng.standard_normal((n, *dims)).astype(np.float32)
        elif inp.name == "input_ids":
            feeds[inp.name] = rng.integers(1, VOCAB, (n, *dims)).astype(np.int64)
        elif inp.name == "attention_mask":
            lengths = rng.integers(dims[0] // 2, dims[0] + 1, n)
            feeds[inp.name] = (np.arange(dims[0])[None] < lengths[:, None]).astype(np.int64)
    return feeds


def _heads(model: onnx.ModelProto) -> str:
    """Free attention-head groups / all of them (the insp column): the coverage share
    counts a head group as its head count, which hides them among the FFN widths."""
    from onnxslim_fr import analyze

    rows = [r for r in analyze(model)[1] if r.get("unit", 1) > 1]
    return f"{sum(r['frozen'] is None for r in rows)}/{len(rows)}"


def sweep(out: Path, only: list[str] | None, calibrated: bool) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import heldout_sweep as hs

    rows = []
    for path in sorted(out.glob("*.onnx")):
        if only and not any(m in path.name for m in only):
            continue
        result, inspect, ex, cal = hs.sweep_one(path, calibrated, make_feeds, (N_CALIB, N_TEST))
        heads = _heads(onnx.load(str(path))) if inspect == "0" else inspect
        rows.append((result, heads, ex, cal))
        print(hs.render(rows[-1:]).splitlines()[2], file=sys.stderr, flush=True)
    print(hs.render(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=("export", "sweep"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/heldout_hf"))
    parser.add_argument("--models", nargs="*", help="only names containing one of these")
    parser.add_argument("--no-calibrated", action="store_true")
    args = parser.parse_args()
    if args.step == "export":
        export(args.out, args.models)
    else:
        sweep(args.out, args.models, not args.no_calibrated)


if __name__ == "__main__":
    main()
