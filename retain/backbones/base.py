"""The backbone vocabulary: ``Backbone``, its registry, ``create_backbone`` and hashes.

Backbones created by name: a feature extractor, its preprocessing and its exact identity.

Every backbone maps a normalised (B, 3, S, S) batch to (B, D) features. Its ``identity`` (name,
weights file, sha256 of the weights, pretrained or not) and its preprocessing are written next to
every result, since "ViT-B/16 IN21K" names several different checkpoints (see
``shared/specs/published-numbers.md`` §1.2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, WeightsError
from ..registry import Registry
from ..specs import BackboneSpec
from ..transforms import Preprocess

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
    # CLIP backbones: the text tower (retain.backbones.clip.ClipText: encode_text(list[str])
    # -> (n, E), logit_scale); None for image-only backbones
    text: nn.Module | None = None

    @property
    def key(self) -> str:
        """Identifies the weights and the preprocessing, for the feature cache."""
        digest = hashlib.sha256(self.preprocess.key.encode()).hexdigest()[:8]
        return f"{self.name}-{self.identity.get('sha256', 'nosha')[:16]}-{digest}"

    def describe(self) -> dict:
        return {**self.identity, "feature_dim": self.feature_dim,
                "preprocess": self.preprocess.describe()}


BackboneFactory = Callable[..., Backbone]
BACKBONES: Registry[BackboneFactory] = Registry("backbone")
SPECS: dict[str, BackboneSpec] = {}  # name -> what it is, known without building it


def register_backbone(name: str, spec: BackboneSpec | None = None
                      ) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register a factory ``(weights=None, image_size=None) -> Backbone`` with its ``spec``
    (what it is, for the methods' needs; without one no need is checked before loading)."""
    if spec is not None:
        SPECS[name] = spec
    return BACKBONES.register(name)


def backbone_spec(name: str) -> BackboneSpec | None:
    """The spec of backbone ``name``: registered, or read from timm's architecture (built on the
    meta device: no memory, no weights) for any other pretrained timm name; None for a backbone
    registered without one."""
    if name in SPECS or name in BACKBONES:
        return SPECS.get(name)
    import timm

    if not (timm.is_model(name.split(".")[0]) and name in timm.list_models(pretrained=True)):
        BACKBONES.get(name)  # the unknown-backbone error, with the choices
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    blocks = getattr(model, "blocks", None)
    if blocks is not None and hasattr(model, "patch_embed"):
        patch = model.patch_embed.patch_size[0]
        return BackboneSpec("vit", size, patch, depth=len(blocks), patch=patch,
                            weights=f"hub:{model.pretrained_cfg.get('hf_hub_id') or 'timm/' + name}"
                            "/model.safetensors")
    return BackboneSpec("cnn", size, 32, weights=f"hub:timm/{name}/model.safetensors")


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
        from .timm_vit import timm_backbone

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


def require_file(path: Path, name: str) -> None:
    if not path.is_file():
        raise WeightsError(f"weights file for {name} not found: {path}")


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], path, name: str) -> None:
    """``model.load_state_dict(state, strict=True)``, a ``WeightsError`` naming the file when the
    keys or shapes do not fit."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path} does not fit {name}: {str(e)[:300]}; pass the checkpoint of "
                           "exactly this architecture") from e


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


def check_reachable(host: str, timeout: float = 3.0) -> None:
    """Fail fast when ``host`` cannot be reached, instead of the hub client's retry loop."""
    import socket

    with socket.create_connection((host, 443), timeout=timeout):
        pass
