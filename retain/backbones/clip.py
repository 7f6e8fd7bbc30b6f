"""CLIP (Radford et al., ICML 2021) for retain: a timm image tower and a text tower.

The image tower is a timm ``VisionTransformer`` (pre-norm ``norm_pre``, QuickGELU, class-token
pooling) whose ``head`` is CLIP's projection, so ``backbone.model(x)`` is CLIP's (B, E) image
embedding and every prompt / prefix / adapter injection of ``retain.layers`` works on it.
:class:`ClipText` is OpenAI's text transformer, written here with the state-dict keys of the
OpenAI / open_clip checkpoints (``token_embedding``, ``transformer.resblocks.*``, ``ln_final``,
``text_projection``, ``logit_scale``); the BPE tokenizer is open_clip's (``pip install
'retain[clip]'``; its vocabulary ships inside the wheel, so tokenizing works offline).

One checkpoint holds both towers: ``visual.*`` goes through timm's ``checkpoint_filter_fn`` (its
OpenAI-CLIP conversion, which also resamples the position grid for other image sizes), the rest
into :class:`ClipText`. Accepted files: open_clip's ``open_clip_model.safetensors`` /
``open_clip_pytorch_model.bin`` (HuggingFace ``timm/vit_base_patch16_clip_224.openai``) and
OpenAI's TorchScript ``ViT-B-16.pt``. Followed: openai/CLIP ``clip/model.py`` (architecture,
initialisation, EOT pooling) and open_clip ``pretrained.py`` (``ViT-B-16``/``openai`` =
``quick_gelu=True``, CLIP mean/std, bicubic resize + centre crop).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, WeightsError
from ..specs import BackboneSpec
from ..transforms import Preprocess
from . import base
from .base import Backbone, hub_error, register_backbone, sha256_file, sha256_state
from .files import read_state

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HUB_ID = "timm/vit_base_patch16_clip_224.openai"
HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_NOT_TEXT = ("input_resolution", "context_length", "vocab_size", "attn_mask")  # in .pt files


@dataclass(frozen=True)
class ClipConfig:
    """Architecture of a CLIP pair (defaults: OpenAI ViT-B/16)."""

    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12


VIT_B16 = ClipConfig()
TINY = ClipConfig(embed_dim=32, image_size=32, patch_size=8, vision_width=48, vision_layers=2,
                  vision_heads=3, context_length=16, text_width=32, text_heads=2, text_layers=2)


# ----------------------------------------------------------------------------- text tower


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class TextBlock(nn.Module):
    """OpenAI's ResidualAttentionBlock (pre-LN, causal self-attention, QuickGELU MLP)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)  # (n, L, W)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))  # (n, L, W)


class TextTransformer(nn.Module):
    def __init__(self, width: int, heads: int, layers: int):
        super().__init__()
        self.resblocks = nn.ModuleList(TextBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class ClipText(nn.Module):
    """CLIP's text tower: strings -> (n, E) text embeddings (not normalised).

    ``logit_scale`` is CLIP's learned temperature, stored as its log (the logits are
    ``logit_scale.exp() * cos``). Prompt methods (CoOp-style context vectors) edit the token
    embeddings and call :meth:`encode_embedded` with the EOT positions of the tokens.
    """

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.context_length = cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.transformer = TextTransformer(cfg.text_width, cfg.text_heads, cfg.text_layers)
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        causal = torch.full((cfg.context_length,) * 2, float("-inf")).triu_(1)  # (L, L)
        self.register_buffer("attn_mask", causal, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """OpenAI's ``initialize_parameters`` for the text tower."""
        width, layers = self.ln_final.normalized_shape[0], len(self.transformer.resblocks)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
        proj_std = attn_std * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP BPE tokens, (n, context_length), truncated, EOT last; on this tower's device."""
        tokens = _tokenizer()(list(texts), context_length=self.context_length)  # (n, L)
        return tokens.to(self.positional_embedding.device)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, E) text embeddings of ``texts`` (gradients flow unless the caller turns them off)."""
        return self(self.tokenize(texts))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens)  # (n, L, W)
        return self.encode_embedded(x, tokens.argmax(dim=-1))  # EOT has the largest id

    def encode_embedded(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Token embeddings (n, L, W) and EOT positions (n,) -> (n, E)."""
        L = x.shape[1]
        x = x + self.positional_embedding[:L]  # (n, L, W)
        x = self.ln_final(self.transformer(x, self.attn_mask[:L, :L]))  # (n, L, W)
        return x[torch.arange(len(x), device=x.device), eot] @ self.text_projection  # (n, E)


@functools.cache
def _tokenizer():
    """open_clip's SimpleTokenizer (loaded once; its BPE vocabulary ships in the wheel)."""
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError as e:
        raise WeightsError("CLIP text needs open_clip's tokenizer: "
                           "`pip install 'retain[clip]'` (open_clip_torch)") from e
    return SimpleTokenizer()


# ----------------------------------------------------------------------------- building, loading


def image_tower(cfg: ClipConfig, image_size: int | None = None) -> nn.Module:
    """timm's CLIP ViT (``vit_base_patch16_clip_quickgelu_224`` for ViT-B/16): (B,3,S,S)->(B,E)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=image_size or cfg.image_size, patch_size=cfg.patch_size,
        embed_dim=cfg.vision_width, depth=cfg.vision_layers, num_heads=cfg.vision_heads,
        pre_norm=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-5),
        act_layer="quick_gelu", global_pool="token", num_classes=cfg.embed_dim)


def read_clip_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A CLIP checkpoint (.safetensors, open_clip .bin/.pt, OpenAI TorchScript .pt) as float32,
    read without running anything in it (``files.read_state``)."""
    state = read_state(path, "CLIP")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_clip_state(vit: nn.Module, text: ClipText, state: dict, name: str) -> None:
    """Load both towers from one CLIP state dict (``visual.*`` + text keys); strict."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if "visual.class_embedding" not in state:
        raise WeightsError(f"{name}: not a CLIP checkpoint with both towers (no "
                           "'visual.class_embedding'); pass open_clip's open_clip_model.safetensors"
                           " or OpenAI's .pt, not an image-tower-only file")
    text_state = {k: v for k, v in state.items()
                  if not k.startswith("visual.") and k not in _NOT_TEXT}
    for module, part in ((vit, checkpoint_filter_fn(state, vit)), (text, text_state)):
        try:
            module.load_state_dict(part, strict=True)
        except RuntimeError as e:
            raise WeightsError(f"weights do not fit {name}: {str(e)[:300]}; pass the checkpoint "
                               "of exactly this architecture") from e


def build_clip(cfg: ClipConfig, image_size: int | None = None, seed: int = 0):
    """(image tower, text tower), randomly initialised with ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return image_tower(cfg, image_size), ClipText(cfg)


def clip_backbone(name: str, vit: nn.Module, text: ClipText, cfg: ClipConfig, size: int,
                  ident: dict) -> Backbone:
    pre = Preprocess(size, CLIP_MEAN, CLIP_STD, crop_pct=1.0, interpolation="bicubic")
    return Backbone(name, vit.eval(), cfg.embed_dim, pre, ident, text=text.eval())


def _hub_file(name: str) -> Path:
    """open_clip's checkpoint of OpenAI ViT-B/16 from the local HuggingFace cache or the hub."""
    try:
        from huggingface_hub import hf_hub_download

        for file in HUB_FILES:
            with_cache = _try(lambda f=file: hf_hub_download(HUB_ID, f, local_files_only=True))
            if with_cache:
                return Path(with_cache)
        base.check_reachable("huggingface.co")
        return Path(hf_hub_download(HUB_ID, HUB_FILES[0]))
    except Exception as e:  # offline, no cache, or no hub client
        raise hub_error(name, HUB_ID, HUB_FILES[0], e,
                            f"(open_clip's {HUB_FILES[1]} and OpenAI's ViT-B-16.pt are accepted "
                            f"too)") from e


def _try(fn):
    try:
        return fn()
    except Exception:
        return None


# ----------------------------------------------------------------------------- backbones


@register_backbone("clip_vit_b16", BackboneSpec(
    "clip", 224, 16, depth=12, patch=16, weights=f"hub:{HUB_ID}/{HUB_FILES[0]}"))
def clip_vit_b16(weights=None, image_size=None) -> Backbone:
    """OpenAI CLIP ViT-B/16 (WIT-400M): 512-d image embedding, text tower in ``.text``
    (HuggingFace ``timm/vit_base_patch16_clip_224.openai`` open_clip file, or --weights)."""
    path = Path(weights) if weights else _hub_file("clip_vit_b16")  # fails fast, before building
    vit, text = build_clip(VIT_B16, image_size)
    load_clip_state(vit, text, read_clip_state(path), "clip_vit_b16")
    ident = {"name": "clip_vit_b16", "source": f"open_clip ViT-B-16 'openai' (hf-hub {HUB_ID})",
             "weights": str(path), "sha256": sha256_file(path),
             "pretrained": "OpenAI CLIP WIT-400M"}
    return clip_backbone("clip_vit_b16", vit, text, VIT_B16, image_size or 224, ident)


@register_backbone("clip_tiny_random", BackboneSpec("clip", TINY.image_size, 8, depth=2, patch=8))
def clip_tiny_random(weights=None, image_size=None) -> Backbone:
    """A tiny seeded random CLIP pair (ViT 48 wide, 2 blocks, patch 8, 32 px; text 32 wide,
    2 layers, context 16; 32-d embedding): for tests, not for results."""
    vit, text = build_clip(TINY, image_size)
    with torch.no_grad():  # at random init the class token and positions swamp the patches
        vit.cls_token.zero_()  # (pre-norm): every image got the same feature (cosine > 0.9999)
        vit.pos_embed.zero_()
    if weights:
        load_clip_state(vit, text, read_clip_state(weights), "clip_tiny_random")
    ident = {"name": "clip_tiny_random", "source": "retain (seeded random init)",
             "weights": str(weights) if weights else None,
             "sha256": sha256_state(nn.ModuleList([vit, text])), "pretrained": False}
    return clip_backbone("clip_tiny_random", vit, text, TINY, image_size or TINY.image_size, ident)


# ----------------------------------------------------------------------------- zero-shot


def zero_shot_head(backbone: Backbone, class_names: Sequence[str],
                   template: str | Sequence[str] = "a photo of a {}.") -> torch.Tensor:
    """(C, E) unit-norm text embeddings of the class names; several templates are averaged
    (CLIP's prompt ensembling: mean of normalised embeddings, normalised again)."""
    if getattr(backbone, "text", None) is None:
        raise ConfigError(f"backbone {backbone.name!r} has no text tower; use a CLIP backbone "
                          "(clip_vit_b16)")
    templates = [template] if isinstance(template, str) else list(template)
    with torch.no_grad():
        embs = [F.normalize(backbone.text.encode_text([t.format(c) for c in class_names]), dim=-1)
                for t in templates]  # T x (C, E)
    return F.normalize(torch.stack(embs).mean(0), dim=-1)  # (C, E)


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's logits exp(s) * cos(image, text): (B, E) x (C, E) -> (B, C)."""
    img = F.normalize(image_features, dim=-1)  # (B, E)
    return logit_scale.exp() * img @ F.normalize(text_features, dim=-1).T  # (B, C)
