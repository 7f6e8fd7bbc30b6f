"""Raw pixels and GEM's reduced ResNet-18: inputs for the methods that train their own network."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from ..specs import BackboneSpec
from ..transforms import Preprocess
from .base import Backbone, load_strict, register_backbone, require_file, sha256_state
from .files import read_state


@register_backbone("pixels", BackboneSpec("pixels", 28))
def pixels(weights=None, image_size=None) -> Backbone:
    """Raw gray pixels, MNIST normalisation (0.1307, 0.3081), for networks trained from scratch.

    No pretrained network: ``model`` is the identity on the (B, 1, S, S) image (default S = 28).
    Methods that grow or mask their own network (SupSup, DyTox, DEN, APD) build it on this input.
    """
    return _pixels("pixels", image_size or 28, (0.1307,) * 3, (0.3081,) * 3, gray=True)


@register_backbone("pixels_rgb", BackboneSpec("pixels", 32))
def pixels_rgb(weights=None, image_size=None) -> Backbone:
    """Raw RGB pixels, CIFAR-100 normalisation, for networks trained from scratch (S = 32)."""
    return _pixels("pixels_rgb", image_size or 32, (0.5071, 0.4865, 0.4409),
                   (0.2673, 0.2564, 0.2762), gray=False)


@register_backbone("resnet18_reduced", BackboneSpec("cnn", 32))
def resnet18_reduced(weights=None, image_size=None) -> Backbone:
    """GEM's reduced ResNet-18 (nf = 20, 160-d features), randomly initialised (seeded) for
    training from scratch, on CIFAR-normalised RGB images (S = 32); ``--weights`` loads a
    state dict saved from it."""
    from ..layers.resnet import ReducedResNet18

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ReducedResNet18()
    if weights:
        require_file(Path(weights), "resnet18_reduced")
        load_strict(model, read_state(weights, "resnet18_reduced"), weights, "resnet18_reduced")
    pre = Preprocess(image_size or 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                     crop_pct=1.0, interpolation="bilinear")
    ident = {"name": "resnet18_reduced", "source": "retain (seeded random init, GEM's network)",
             "weights": str(weights) if weights else None, "sha256": sha256_state(model),
             "pretrained": bool(weights)}
    return Backbone("resnet18_reduced", model.eval(), model.feature_dim, pre, ident)


def _pixels(name: str, size: int, mean, std, gray: bool) -> Backbone:
    pre = Preprocess(size, mean, std, crop_pct=1.0, interpolation="bilinear", gray=gray)
    dim = pre.channels * size * size
    ident = {"name": name, "source": "retain (no weights)", "weights": None,
             "sha256": hashlib.sha256(name.encode()).hexdigest(), "pretrained": False}
    return Backbone(name, nn.Identity(), dim, pre, ident)


@register_backbone("pixels01", BackboneSpec("pixels", 28))
def pixels01(weights=None, image_size=None) -> Backbone:
    """Raw gray pixels in [0, 1], not standardised: DEN's demo input (``DEN_run.py`` feeds the
    TF MNIST reader's [0, 1] images)."""
    return _pixels("pixels01", image_size or 28, (0.0,) * 3, (1.0,) * 3, gray=True)


@register_backbone("pixels_rgb01", BackboneSpec("pixels", 32))
def pixels_rgb01(weights=None, image_size=None) -> Backbone:
    """Raw RGB pixels in [0, 1], not standardised: APD's official input (its loaders only
    divide by 255), S = 32."""
    return _pixels("pixels_rgb01", image_size or 32, (0.0,) * 3, (1.0,) * 3, gray=False)
