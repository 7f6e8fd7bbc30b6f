"""The reduced ResNet-18 of GEM (Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual
Learning", NeurIPS 2017; facebookresearch/GradientEpisodicMemory ``model/common.py``), the small
from-scratch network of many continual-learning papers (also Mammoth's ``resnet18`` with
``nf=20``).

A 3x3 stem with ``nf`` channels at stride 1, four stages of two BasicBlocks with ``nf``, 2·nf,
4·nf and 8·nf channels (stride 1, 2, 2, 2), average pooling to one cell, so the feature has 8·nf
dimensions (160 for nf = 20; 1.09M parameters without the head, against 11.2M for ResNet-18).
GEM pools with ``avg_pool2d(out, 4)`` on 32-pixel inputs; the adaptive pool used here is the
same there and also accepts other sizes (28-pixel MNIST).

``reduced_resnet`` builds the same network from injected layer constructors (SupSup's
``GEMResNet18``: masked convolutions and per-task non-affine norms; official
``models/gemresnet.py``), as a flat ``nn.Sequential`` whose residual blocks take a ``call``
function that runs each of their sub-layers, so a caller can route its own arguments (a task
selector) into them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, cout, H', W')
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ReducedResNet18(nn.Module):
    """(B, C, S, S) -> (B, 8·nf) features (no classifier: methods add their own head)."""

    def __init__(self, nf: int = 20, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, nf, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        widths, strides, cin, stages = (nf, 2 * nf, 4 * nf, 8 * nf), (1, 2, 2, 2), nf, []
        for width, stride in zip(widths, strides, strict=True):
            stages.append(nn.Sequential(BasicBlock(cin, width, stride),
                                        BasicBlock(width, width, 1)))
            cin = width
        self.layers = nn.Sequential(*stages)
        self.feature_dim = 8 * nf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))  # (B, 8nf, S/8, S/8)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)  # (B, 8nf)


Call = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # runs one sub-layer on its input


def plain_call(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x)


class InjectedBlock(nn.Module):
    """GEM's BasicBlock from injected ``conv(in, out, kernel, padding, stride)`` and ``norm(c)``
    constructors; ``forward(x, call)`` runs every conv and norm through ``call``."""

    def __init__(self, cin: int, cout: int, stride: int, conv, norm):
        super().__init__()
        self.conv1, self.bn1 = conv(cin, cout, 3, 1, stride), norm(cout)
        self.conv2, self.bn2 = conv(cout, cout, 3, 1, 1), norm(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, 0, stride), norm(cout))

    def forward(self, x: torch.Tensor, call: Call = plain_call) -> torch.Tensor:
        out = F.relu(call(self.bn1, call(self.conv1, x)))  # (B, cout, H', W')
        out = call(self.bn2, call(self.conv2, out))
        short = x
        for layer in self.shortcut:
            short = call(layer, short)
        return F.relu(out + short)


def reduced_resnet(in_channels: int, out_features: int, conv, norm, linear,
                   nf: int = 20) -> nn.Sequential:
    """GEM's reduced ResNet-18 (B, C, S, S) -> (B, out_features) from injected layers: stem,
    4 stages of 2 ``InjectedBlock``s (nf, 2nf, 4nf, 8nf channels), average pool, ``linear``
    (GEM's final 1x1 conv on the pooled map, written as a linear layer)."""
    layers: list[nn.Module] = [conv(in_channels, nf, 3, 1, 1), norm(nf), nn.ReLU()]
    cin = nf
    for width, stride in zip((nf, 2 * nf, 4 * nf, 8 * nf), (1, 2, 2, 2), strict=True):
        layers += [InjectedBlock(cin, width, stride, conv, norm),
                   InjectedBlock(width, width, 1, conv, norm)]
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         linear(8 * nf, out_features))
