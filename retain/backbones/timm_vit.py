"""timm models as backbones: the survey's ViTs from the HuggingFace hub or a local file, and
the tiny random ViT of the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError
from ..specs import BackboneSpec
from ..transforms import Preprocess
from . import base
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    Backbone,
    BackboneFactory,
    hub_error,
    register_backbone,
    require_file,
    sha256_file,
    sha256_state,
)
from .files import npz_bytes, read_state

TIMM_VITS = {
    "vit_base_patch16_224.augreg_in21k": "ViT-B/16 pre-trained on ImageNet-21K (augreg); the "
    "survey's 'ViT-B/16-IN21K'",
    "vit_base_patch16_224.augreg_in21k_ft_in1k": "ViT-B/16 IN21K -> IN1K (augreg); PILOT's "
    "'ViT-B/16-IN1K'",
    "vit_base_patch16_224.augreg2_in21k_ft_in1k": "ViT-B/16 IN21K -> IN1K (augreg2)",
    "vit_small_patch16_224.augreg_in21k": "ViT-S/16 pre-trained on ImageNet-21K (augreg)",
}


def timm_backbone(name: str, weights=None, image_size=None) -> Backbone:
    """A timm model with its head removed; weights from ``weights`` or the HuggingFace hub."""
    import timm

    kwargs = {"num_classes": 0}
    if image_size is not None and "vit" in name:
        kwargs["img_size"] = image_size
    model = timm.create_model(name, pretrained=False, **kwargs)
    path = Path(weights) if weights else _hub_file(name, model)
    _load_timm_weights(model, path, name)
    cfg = model.pretrained_cfg
    size = image_size or cfg.get("input_size", (3, 224, 224))[-1]
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    pre = Preprocess(size, mean, std, crop_pct=cfg.get("crop_pct", 0.9),
                     interpolation=cfg.get("interpolation", "bicubic"))
    ident = {"name": name, "source": f"timm {timm.__version__}: {cfg.get('hf_hub_id', name)}",
             "weights": str(path), "sha256": sha256_file(path), "pretrained": name}
    return Backbone(name, model.eval(), model.num_features, pre, ident)


def _hub_file(name: str, model: nn.Module) -> Path:
    """Download (or find in the local HuggingFace cache) the checkpoint file of ``name``."""
    hub_id = model.pretrained_cfg.get("hf_hub_id") or f"timm/{name}"
    try:
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(hub_id, "model.safetensors", local_files_only=True))
        except Exception:
            base.check_reachable("huggingface.co")
            return Path(hf_hub_download(hub_id, "model.safetensors"))
    except Exception as e:  # offline, no cache, or no hub client
        raise hub_error(name, hub_id, "model.safetensors", e,
                        "(safetensors, .npz or .pth are accepted)") from e


def _load_timm_weights(model: nn.Module, path: Path, name: str) -> None:
    """Load a .safetensors / .pth / .npz checkpoint into ``model`` (its head dropped); the file
    is read by retain (``files``), never handed to timm's loaders by path."""
    require_file(path, name)
    if path.suffix == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise WeightsError(f"{name}: .npz checkpoints are only read for timm ViTs")
        model.load_pretrained(npz_bytes(path, name))  # checked plain arrays, in memory
        return
    state = read_state(path, name)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc.", "classifier."))}
    if hasattr(model, "pos_embed") and "pos_embed" in state:
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{path} does not fit {name}: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}; pass the checkpoint of exactly this architecture")


def _timm_factory(name: str) -> BackboneFactory:
    def factory(weights=None, image_size=None) -> Backbone:
        return timm_backbone(name, weights, image_size)

    factory.__doc__ = TIMM_VITS[name] + " (timm; HuggingFace hub or --weights)"
    return factory


for _name in TIMM_VITS:
    register_backbone(_name, BackboneSpec("vit", 224, 16, depth=12, patch=16,
                                          weights=f"hub:timm/{_name}/model.safetensors"))(
        _timm_factory(_name))


# ----------------------------------------------------------------------------- test backbones


@register_backbone("vit_tiny_random", BackboneSpec("vit", 32, 8, depth=2, patch=8))
def vit_tiny_random(weights=None, image_size=None) -> Backbone:
    """A 2-block, 48-wide random ViT on 32-px inputs (seeded): for tests, not for results."""
    from timm.models.vision_transformer import VisionTransformer

    size = image_size or 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VisionTransformer(img_size=size, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                  mlp_ratio=2.0, num_classes=0)
    if weights:
        _load_timm_weights(model, Path(weights), "vit_tiny_random")
    pre = Preprocess(size, INCEPTION_MEAN, INCEPTION_STD, crop_pct=1.0, interpolation="bilinear")
    ident = {"name": "vit_tiny_random", "source": "retain (seeded random init)",
             "weights": str(weights) if weights else None, "sha256": sha256_state(model),
             "pretrained": False}
    return Backbone("vit_tiny_random", model.eval(), 48, pre, ident)
