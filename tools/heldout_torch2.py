"""Second held-out set of torch architectures (plain torch, random init), none in the first.

ResNeXt blocks (grouped 3x3, groups=8), dilated convs, a depthwise-separable 1-D audio net,
a GroupNorm net, an InstanceNorm style-transfer net (ConvTranspose up), a PixelShuffle
super-resolution net and ShuffleNet-v1 units (grouped 1x1 + channel shuffle). Used by
``tools/heldout_export2.py``.
"""

from __future__ import annotations

import torch
from heldout_torch import conv_bn, randomize, shuffle
from torch import nn
from torch.nn import functional as F


class ResNeXtBlock(nn.Module):
    def __init__(self, c: int, width: int, groups: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, width, 1), conv_bn(width, width, 3, 1, groups),
                                  conv_bn(width, c, 1, act=None))

    def forward(self, x):
        return F.relu(x + self.body(x))


class ResNeXt(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32, 3, 2)
        self.blocks = nn.Sequential(ResNeXtBlock(32, 64), conv_bn(32, 64, 3, 2),
                                    ResNeXtBlock(64, 64))
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class Dilated(nn.Module):
    """DeepLab-style context module: 3x3 convs with dilation 1, 2, 4 summed, then a head."""

    def __init__(self, c: int = 24) -> None:
        super().__init__()
        self.stem = conv_bn(3, c, 3, 2)
        self.d = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=r, dilation=r),
                                             nn.BatchNorm2d(c), nn.ReLU()) for r in (1, 2, 4))
        self.head = nn.Conv2d(c, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(sum(d(x) for d in self.d))


class Audio1d(nn.Module):
    """Raw-waveform front end, then depthwise-separable 1-D blocks (MatchboxNet-like)."""

    def __init__(self, classes: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(1, 32, 16, 8), nn.BatchNorm1d(32), nn.ReLU()]
        c = 32
        for w in (48, 64, 64):
            layers += [nn.Conv1d(c, c, 9, padding=4, groups=c, bias=False),
                       nn.Conv1d(c, w, 1), nn.BatchNorm1d(w), nn.ReLU(), nn.MaxPool1d(2)]
            c = w
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.body(x).mean(2))


class GNNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        def block(cin: int, cout: int, s: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, s, 1), nn.GroupNorm(4, cout), nn.SiLU())
        self.body = nn.Sequential(block(3, 32, 2), block(32, 32, 1), block(32, 64, 2))
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


class StyleNet(nn.Module):
    """Johnson-style transfer net: IN convs down, IN residual blocks, ConvTranspose up."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        def cin(a: int, b: int, k: int = 3, s: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(a, b, k, s, k // 2), nn.InstanceNorm2d(b, affine=True), nn.ReLU()]
        self.down = nn.Sequential(*cin(3, c, 9), *cin(c, 2 * c, 3, 2))
        self.res = nn.ModuleList(nn.Sequential(*cin(2 * c, 2 * c), nn.Conv2d(2 * c, 2 * c, 3, 1, 1),
                                               nn.InstanceNorm2d(2 * c, affine=True))
                                 for _ in range(2))
        self.up = nn.Sequential(nn.ConvTranspose2d(2 * c, c, 3, 2, 1, output_padding=1),
                                nn.InstanceNorm2d(c, affine=True), nn.ReLU(),
                                nn.Conv2d(c, 3, 9, 1, 4))

    def forward(self, x):
        x = self.down(x)
        for r in self.res:
            x = x + r(x)
        return self.up(x)


class PixelShuffleSR(nn.Module):
    """ESPCN: two convs, then a conv to 3*r*r channels and PixelShuffle(r)."""

    def __init__(self, r: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 5, 1, 2), nn.Tanh(), nn.Conv2d(32, 24, 3, 1, 1),
                                  nn.Tanh(), nn.Conv2d(24, 3 * r * r, 3, 1, 1))
        self.ps = nn.PixelShuffle(r)

    def forward(self, x):
        return self.ps(self.body(x))


class ShuffleV1Unit(nn.Module):
    def __init__(self, c: int, g: int = 3) -> None:
        super().__init__()
        self.g, m = g, c // 4
        self.a = conv_bn(c, m, 1, 1, g)
        self.dw = conv_bn(m, m, 3, 1, m, None)
        self.b = conv_bn(m, c, 1, 1, g, None)

    def forward(self, x):
        return F.relu(x + self.b(self.dw(shuffle(self.a(x), self.g))))


class ShuffleNetV1(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 48, 3, 2)
        self.units = nn.Sequential(ShuffleV1Unit(48), ShuffleV1Unit(48), conv_bn(48, 96, 3, 2),
                                   ShuffleV1Unit(96))
        self.fc = nn.Linear(96, classes)

    def forward(self, x):
        return self.fc(self.units(self.stem(x)).mean((2, 3)))


def randomize2(net: nn.Module) -> nn.Module:
    """`randomize` plus random GroupNorm / InstanceNorm / BatchNorm1d affines."""
    randomize(net)
    g = torch.Generator().manual_seed(2)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            c = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
        if isinstance(m, (nn.GroupNorm, nn.InstanceNorm2d, nn.BatchNorm1d)):
            m.weight.data.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return net


def build_all(img: int) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    shape = (2, 3, img, img)
    nets = {"resnext": (ResNeXt(), shape), "dilated": (Dilated(), shape),
            "audio1d": (Audio1d(), (2, 1, 4000)), "groupnorm": (GNNet(), shape),
            "style_in": (StyleNet(), shape), "pixelshuffle_sr": (PixelShuffleSR(), shape),
            "shufflenet_v1": (ShuffleNetV1(), shape)}
    return {k: (randomize2(v), s) for k, (v, s) in nets.items()}
