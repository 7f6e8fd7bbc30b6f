"""The small networks the architecture-based papers train from scratch.

| name | layers (then the output layer) | paper / official code |
|---|---|---|
| ``fc300x100`` | 784-300-100 | LeNet-300-100 (Frankle & Carbin); SupSup ``small.py::LeNet`` |
| ``fc300x300`` | 784-300-300 | SupSup's CPU notebook ``mnist.ipynb`` (``MultitaskFC``) |
| ``fc1024`` | 784-1024-1024 | SupSup ``small.py::FC1024`` |
| ``fc312x128`` | 784-312-128 | DEN ``DEN_run.py`` (dims [784, 312, 128, 10]) |
| ``lenet_conv`` | conv5x5(20)-pool-conv5x5(50)-pool-800-500 | APD's LeNet-like CIFAR network |
| ``resnet18_gem`` | GEM's reduced ResNet-18, nf 20 (``resnet.py``) | SupSup ``GEMResNet18`` |

The input size comes from the images (784 = 1 x 28 x 28 above). Layers are injected, timm style:
``build_net`` takes the constructors of the linear and conv layers (and an optional per-layer
normalisation), so SupSup builds the same network from masked layers and APD from decomposed
ones. ``lenet_conv`` follows APD's TensorFlow blocks: conv (same padding), ReLU, local response
normalisation (TF ``depth_radius=4, alpha=0.001/9, beta=0.75`` = torch size 9, alpha 0.001), max
pool 3x3 stride 2 (TF 'SAME' pads 0/1, torch pads 1/1: same output size, 32 -> 16 -> 8).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from .resnet import reduced_resnet


@dataclass(frozen=True)
class NetSpec:
    """Conv channels (5x5 blocks, each halving the image), then fully connected widths."""

    convs: tuple[int, ...] = ()
    hidden: tuple[int, ...] = ()
    kernel: int = 5
    lrn: bool = False  # local response normalisation after each conv block's ReLU (APD)


NETS: dict[str, NetSpec] = {
    "fc300x100": NetSpec(hidden=(300, 100)),
    "fc300x300": NetSpec(hidden=(300, 300)),
    "fc1024": NetSpec(hidden=(1024, 1024)),
    "fc312x128": NetSpec(hidden=(312, 128)),
    "lenet_conv": NetSpec(convs=(20, 50), hidden=(800, 500), lrn=True),
}

Linear = Callable[[int, int], nn.Module]  # (in_features, out_features)
Conv = Callable[..., nn.Module]  # (in_channels, out_channels, kernel, padding[, stride])
Norm = Callable[[int], nn.Module]  # (num_features) -> applied to (B, C) or (B, C, H, W)


def build_net(name: str, in_shape: tuple[int, int, int], out_features: int, *,
              linear: Linear = nn.Linear, conv: Conv | None = None, norm: Norm | None = None,
              ) -> nn.Sequential:
    """Network ``name`` on (B, C, H, W) inputs of ``in_shape`` -> (B, out_features) logits.

    ``norm`` (e.g. a BatchNorm) goes after every hidden layer, before its ReLU.
    """
    conv = conv or (lambda i, o, k, p, s=1: nn.Conv2d(i, o, k, stride=s, padding=p))
    if name == "resnet18_gem":
        return reduced_resnet(in_shape[0], out_features, conv, norm or (lambda c: nn.Identity()),
                              linear)
    if name not in NETS:
        raise ConfigError(f"unknown network {name!r}; use one of: "
                          f"{', '.join([*NETS, 'resnet18_gem'])}")
    spec = NETS[name]
    c, h, w = in_shape
    layers: list[nn.Module] = []
    for channels in spec.convs:
        layers.append(conv(c, channels, spec.kernel, spec.kernel // 2))
        layers += [norm(channels)] if norm else []
        layers.append(nn.ReLU())
        layers += [nn.LocalResponseNorm(9, alpha=0.001, beta=0.75, k=1.0)] if spec.lrn else []
        layers.append(nn.MaxPool2d(3, stride=2, padding=1))
        c, h, w = channels, (h + 1) // 2, (w + 1) // 2
    layers.append(nn.Flatten())
    width = c * h * w
    for units in spec.hidden:
        layers.append(linear(width, units))
        layers += [norm(units)] if norm else []
        layers.append(nn.ReLU())
        width = units
    layers.append(linear(width, out_features))
    return nn.Sequential(*layers)
