"""Held-out torch architectures written in plain torch (no torchvision), random init.

ResNet-18, a MobileNetV2 inverted-residual stack, a small UNet (ConvTranspose up, skip
Concat), ShuffleNetV2 units (chunk + channel shuffle by view/transpose/view), EfficientNet
MBConv (SiLU + squeeze-excitation) and ConvNeXt blocks (depthwise 7x7, channels-last
LayerNorm, Linear, GELU, layer scale). Used by ``tools/heldout_export.py``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def conv_bn(cin: int, cout: int, k: int = 3, s: int = 1, g: int = 1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class Basic(nn.Module):
    def __init__(self, cin: int, cout: int, s: int) -> None:
        super().__init__()
        self.a, self.b = conv_bn(cin, cout, 3, s), conv_bn(cout, cout, 3, 1, act=None)
        self.down = conv_bn(cin, cout, 1, s, act=None) if s != 1 or cin != cout else None

    def forward(self, x):
        skip = x if self.down is None else self.down(x)
        return F.relu(self.b(self.a(x)) + skip)


class ResNet18(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
        blocks, c = [], 64
        for w, s in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [Basic(c, w, s), Basic(w, w, 1)]
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class InvRes(nn.Module):
    def __init__(self, cin: int, cout: int, s: int, t: int) -> None:
        super().__init__()
        h = cin * t
        self.body = nn.Sequential(conv_bn(cin, h, 1, act=nn.ReLU6),
                                  conv_bn(h, h, 3, s, h, nn.ReLU6), conv_bn(h, cout, 1, act=None))
        self.res = s == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.res else self.body(x)


class MobileNetV2Stack(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        cfg = ((16, 24, 2, 6), (24, 24, 1, 6), (24, 32, 2, 6), (32, 32, 1, 6), (32, 64, 2, 6))
        self.stem = conv_bn(3, 16, 3, 2, act=nn.ReLU6)
        self.blocks = nn.Sequential(*(InvRes(*c) for c in cfg))
        self.head = conv_bn(64, 128, 1, act=nn.ReLU6)
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class UNet(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.d1, self.d2, self.d3 = conv_bn(3, c), conv_bn(c, 2 * c), conv_bn(2 * c, 4 * c)
        self.u2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, 2)
        self.c2 = conv_bn(4 * c, 2 * c)
        self.u1 = nn.ConvTranspose2d(2 * c, c, 2, 2)
        self.c1 = conv_bn(2 * c, c)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        a = self.d1(x)
        b = self.d2(F.max_pool2d(a, 2))
        m = self.d3(F.max_pool2d(b, 2))
        b = self.c2(torch.cat([self.u2(m), b], 1))
        return self.out(self.c1(torch.cat([self.u1(b), a], 1)))


def shuffle(x, groups: int = 2):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, s: int) -> None:
        super().__init__()
        self.s, b = s, cout // 2
        inp = cin if s == 2 else b
        self.branch = nn.Sequential(conv_bn(inp, b, 1), conv_bn(b, b, 3, s, b, None),
                                    conv_bn(b, b, 1))
        self.proj = nn.Sequential(conv_bn(cin, cin, 3, s, cin, None), conv_bn(cin, b, 1)) \
            if s == 2 else None

    def forward(self, x):
        if self.s == 1:
            a, b = x.chunk(2, 1)
            out = torch.cat([a, self.branch(b)], 1)
        else:
            out = torch.cat([self.proj(x), self.branch(x)], 1)
        return shuffle(out)


class ShuffleNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 24, 3, 2)
        self.units = nn.Sequential(ShuffleUnit(24, 48, 2), ShuffleUnit(48, 48, 1),
                                   ShuffleUnit(48, 96, 2), ShuffleUnit(96, 96, 1))
        self.head = conv_bn(96, 128, 1)
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        return self.fc(self.head(self.units(self.stem(x))).mean((2, 3)))


class SE(nn.Module):
    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.b(F.silu(self.a(F.adaptive_avg_pool2d(x, 1)))))


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, s: int, t: int = 4) -> None:
        super().__init__()
        h = cin * t
        self.body = nn.Sequential(conv_bn(cin, h, 1, act=nn.SiLU), conv_bn(h, h, 3, s, h, nn.SiLU),
                                  SE(h, max(4, cin // 4)), conv_bn(h, cout, 1, act=None))
        self.res = s == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.res else self.body(x)


class EfficientNetLite(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2, act=nn.SiLU)
        self.blocks = nn.Sequential(MBConv(16, 24, 2), MBConv(24, 24, 1), MBConv(24, 40, 2),
                                    MBConv(40, 40, 1))
        self.head = conv_bn(40, 128, 1, act=nn.SiLU)
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.head(self.blocks(self.stem(x))),
                                                           1), 1))


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-first LayerNorm for the downsampling layers: permute, LN, back."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pw2(F.gelu(self.pw1(y)))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 4, 4), LayerNorm2d(32, eps=1e-6))
        self.s1 = nn.Sequential(ConvNeXtBlock(32), ConvNeXtBlock(32))
        self.down = nn.Sequential(LayerNorm2d(32, eps=1e-6), nn.Conv2d(32, 64, 2, 2))
        self.s2 = nn.Sequential(ConvNeXtBlock(64), ConvNeXtBlock(64))
        self.norm, self.fc = nn.LayerNorm(64, eps=1e-6), nn.Linear(64, classes)

    def forward(self, x):
        x = self.s2(self.down(self.s1(self.stem(x))))
        return self.fc(self.norm(x.mean((2, 3))))


def randomize(net: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and LayerNorm affines, so no norm is an identity."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(c, generator=g))
        elif isinstance(m, nn.LayerNorm):
            m.weight.data.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return net


def build_all(img: int) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    shape = (2, 3, img, img)
    nets = {"resnet18": ResNet18(), "mobilenetv2": MobileNetV2Stack(), "unet": UNet(),
            "shufflenet": ShuffleNet(), "mbconv_se": EfficientNetLite(), "convnext": ConvNeXt()}
    return {k: (randomize(v), shape) for k, v in nets.items()}
