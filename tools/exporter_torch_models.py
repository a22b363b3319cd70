"""Small torch models written the way the popular architectures write their blocks.

Each block follows its reference implementation's forward closely enough that the
TorchScript and dynamo exporters emit the same ONNX patterns as for the full-size model:

* ``YoloC2f``: Ultralytics YOLOv5 Focus, YOLOv8 C2f (``chunk`` as in ``C2f.forward``, which
  the TorchScript exporter writes as Shape/Gather/Div/Slice, and ``split`` as in
  ``C2f.forward_split``, written as ``Split``), YOLOv5 C3 (CSP), SPPF, Classify head;
  ``nn.SiLU`` everywhere (exported as ``Sigmoid`` + ``Mul``).
* ``SEMobile``: MobileNetV3-small inverted residuals (expand, depthwise, SE, project) with
  hardswish, either ``nn.Hardswish`` (ONNX ``HardSwish``) or decomposed
  ``x * clip(x + 3, 0, 6) / 6`` as Paddle writes it (Add/Clip/Mul/Div).
* ``CRNN``: conv stack -> ``view(b, c * h, w)`` with a dynamic width (a computed Reshape)
  -> bidirectional LSTM -> Linear -> Softmax.
* ``DBNet``: a stride-32 backbone, PaddleOCR's DBFPN neck (nearest ``interpolate`` with a
  scale factor, Add, Concat of upsampled maps) and DB head (Conv-BN-ReLU, two ConvTranspose).
* ``AudioNet``: a Conv1d/BN/ReLU/MaxPool1d front end, global average pool, Squeeze, MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def autopad(k: int) -> int:
    return k // 2


class Conv(nn.Module):
    """Ultralytics ``Conv``: Conv2d (no bias) + BatchNorm2d + SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Focus(nn.Module):
    """YOLOv5 space-to-depth: four strided slices concatenated on channels, then a Conv."""

    def __init__(self, c1: int, c2: int, k: int = 3) -> None:
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2],
                                    x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1))


class Bottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 1.0) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 3)
        self.cv2 = Conv(c_, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8 C2f; ``use_split`` picks ``forward_split`` (Split) over ``forward`` (chunk)."""

    def __init__(self, c1: int, c2: int, n: int = 1, use_split: bool = False) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c) for _ in range(n))
        self.use_split = use_split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_split:
            y = list(self.cv1(x).split((self.c, self.c), 1))
        else:
            y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C3(nn.Module):
    """YOLOv5 CSP bottleneck with three convolutions."""

    def __init__(self, c1: int, c2: int, n: int = 1) -> None:
        super().__init__()
        c_ = c2 // 2
        self.cv1 = Conv(c1, c_, 1)
        self.cv2 = Conv(c1, c_, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1)
        self.cv2 = Conv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class YoloC2f(nn.Module):
    """Focus 1->16 (14x14), Conv s2 ->32 (7x7), C2f(chunk), Conv s2 ->64 (4x4),
    C2f(split, n=2), C3, SPPF, Classify (Conv 1x1 ->128, pool, Linear)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.model = nn.Sequential(
            Focus(1, 16), Conv(16, 32, 3, 2), C2f(32, 32, 1), Conv(32, 64, 3, 2),
            C2f(64, 64, 2, use_split=True), C3(64, 64, 1), SPPF(64, 64))
        self.head_conv = Conv(64, 128, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.head_conv(self.model(x)))
        return self.linear(x.flatten(1))


# ----------------------------------------------------------------------- SE-MobileNetV3


class DecomposedHardswish(nn.Module):
    """``x * clip(x + 3, 0, 6) / 6``: Add, Clip, Mul, Div in ONNX, as paddle2onnx writes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


def activation(kind: str, decomposed: bool) -> nn.Module:
    if kind == "relu":
        return nn.ReLU()
    return DecomposedHardswish() if decomposed else nn.Hardswish()


def make_divisible(v: float, divisor: int = 8) -> int:
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class SqueezeExcite(nn.Module):
    """GlobalAveragePool -> Conv -> ReLU -> Conv -> HardSigmoid -> Mul with the trunk."""

    def __init__(self, c: int) -> None:
        super().__init__()
        hidden = make_divisible(c / 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.hardsigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))
        return x * gate


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, exp: int, c_out: int, k: int, s: int, se: bool, act: str,
                 decomposed: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if exp != c_in:
            layers += [nn.Conv2d(c_in, exp, 1, bias=False), nn.BatchNorm2d(exp),
                       activation(act, decomposed)]
        layers += [nn.Conv2d(exp, exp, k, s, k // 2, groups=exp, bias=False),
                   nn.BatchNorm2d(exp), activation(act, decomposed)]
        if se:
            layers.append(SqueezeExcite(exp))
        layers += [nn.Conv2d(exp, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.block = nn.Sequential(*layers)
        self.residual = s == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


# (expansion, out, kernel, stride, SE, activation) as in MobileNetV3-small, scaled down
MOBILE_CFG = ((32, 16, 3, 1, True, "relu"), (48, 24, 3, 2, False, "relu"),
              (72, 24, 5, 1, True, "hswish"), (96, 40, 5, 2, True, "hswish"),
              (120, 40, 5, 1, True, "hswish"))


class SEMobile(nn.Module):
    def __init__(self, classes: int = 10, decomposed: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                                   activation("hswish", decomposed)]
        c = 16
        for exp, out, k, s, se, act in MOBILE_CFG:
            layers.append(InvertedResidual(c, exp, out, k, s, se, act, decomposed))
            c = out
        layers += [nn.Conv2d(c, 96, 1, bias=False), nn.BatchNorm2d(96),
                   activation("hswish", decomposed), nn.AdaptiveAvgPool2d(1),
                   nn.Conv2d(96, 128, 1), activation("hswish", decomposed)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


# ------------------------------------------------------------------------------- CRNN


def conv_bn_relu(c_in: int, c_out: int, k: int = 3, s: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class CRNN(nn.Module):
    """Input ``[N, 1, 16, W]`` (W dynamic, a multiple of 4); output ``[N, W / 4, 11]`` CTC
    probabilities (class 0 is the blank)."""

    def __init__(self, classes: int = 11, hidden: int = 48) -> None:
        super().__init__()
        self.cnn = nn.Sequential(
            *conv_bn_relu(1, 16), nn.MaxPool2d(2, 2),
            *conv_bn_relu(16, 32), nn.MaxPool2d(2, 2),
            *conv_bn_relu(32, 48), *conv_bn_relu(48, 48), nn.MaxPool2d((2, 1), (2, 1)),
            *conv_bn_relu(48, 64))
        self.rnn = nn.LSTM(64 * 2, hidden, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cnn(x)
        b, c, h, w = x.size()
        x = x.view(b, c * h, w).permute(2, 0, 1)  # [T, N, C*H]
        x, _ = self.rnn(x)
        return F.softmax(self.fc(x), dim=2).permute(1, 0, 2)

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, N, C]`` log-probabilities for ``F.ctc_loss`` (training only)."""
        x = self.cnn(x)
        b, c, h, w = x.size()
        x, _ = self.rnn(x.view(b, c * h, w).permute(2, 0, 1))
        return F.log_softmax(self.fc(x), dim=2)


# ------------------------------------------------------------------------------ DBNet


class DBNet(nn.Module):
    """Input ``[N, 1, H, W]`` (H, W multiples of 32); output the text probability map
    ``[N, 1, H, W]``."""

    def __init__(self, inner: int = 32) -> None:
        super().__init__()
        widths = (16, 24, 32, 48, 64)
        stages, c = [], 1
        for i, w in enumerate(widths):
            extra = conv_bn_relu(w, w) if i > 0 else []
            stages.append(nn.Sequential(*conv_bn_relu(c, w, s=2), *extra))
            c = w
        self.stages = nn.ModuleList(stages)
        self.ins = nn.ModuleList(nn.Conv2d(w, inner, 1, bias=False) for w in widths[1:])
        self.outs = nn.ModuleList(nn.Conv2d(inner, inner // 4, 3, padding=1, bias=False)
                                  for _ in widths[1:])
        self.head = nn.Sequential(
            *conv_bn_relu(inner, inner // 4),
            nn.ConvTranspose2d(inner // 4, inner // 4, 2, 2), nn.BatchNorm2d(inner // 4),
            nn.ReLU(inplace=True), nn.ConvTranspose2d(inner // 4, 1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-sigmoid map (the loss is computed on it)."""
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        in2, in3, in4, in5 = (conv(f) for conv, f in zip(self.ins, feats[1:], strict=True))
        out4 = in4 + F.interpolate(in5, scale_factor=2.0, mode="nearest")
        out3 = in3 + F.interpolate(out4, scale_factor=2.0, mode="nearest")
        out2 = in2 + F.interpolate(out3, scale_factor=2.0, mode="nearest")
        p5, p4, p3, p2 = (conv(t) for conv, t in zip(self.outs, (in5, out4, out3, out2),
                                                     strict=True))
        p5 = F.interpolate(p5, scale_factor=8.0, mode="nearest")
        p4 = F.interpolate(p4, scale_factor=4.0, mode="nearest")
        p3 = F.interpolate(p3, scale_factor=2.0, mode="nearest")
        return self.head(torch.cat([p5, p4, p3, p2], dim=1))


# ---------------------------------------------------------------------------- audio


class AudioNet(nn.Module):
    """Input ``[N, 1, L]`` (L dynamic, at least 64 samples); output ``[N, classes]``."""

    def __init__(self, classes: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for w, k, s in ((16, 9, 2), (32, 5, 1), (64, 3, 1), (64, 3, 1)):
            layers += [nn.Conv1d(c, w, k, s, k // 2, bias=False), nn.BatchNorm1d(w),
                       nn.ReLU(), nn.MaxPool1d(2)]
            c = w
        self.features = nn.Sequential(*layers[:-1], nn.AdaptiveAvgPool1d(1))
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).squeeze(-1)
        return self.fc2(F.relu(self.fc1(x)))
