"""CLIP backbones: timm image tower + text tower, OpenAI / open_clip weights, offline errors."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from retain import backbones as B
from retain.backbones import clip as C
from retain.errors import ConfigError, WeightsError


@pytest.fixture(scope="module")
def tiny():
    return B.create_backbone("clip_tiny_random")


def _open_clip_tiny(seed: int = 1, vision_width: int = 48):
    """A tiny random open_clip CLIP (QuickGELU, OpenAI layout) with the shapes of ``C.TINY``."""
    model_mod = pytest.importorskip("open_clip.model")
    torch.manual_seed(seed)
    m = model_mod.CLIP(
        embed_dim=32, quick_gelu=True,
        vision_cfg=model_mod.CLIPVisionCfg(layers=2, width=vision_width, patch_size=8,
                                           image_size=32, head_width=16),
        text_cfg=model_mod.CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2,
                                       layers=2)).eval()
    with torch.no_grad():  # move norms and biases away from their 1 / 0 initial values
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def test_tiny_clip_image_tower_is_a_seeded_timm_vit(tiny):
    from timm.models.vision_transformer import VisionTransformer

    from retain.layers.prefix import attach_prefix, forward_with_prefix

    x = torch.randn(3, 3, 32, 32)
    again = B.create_backbone("clip_tiny_random")
    with torch.no_grad():
        f = tiny.model(x)  # (3, 32)
        assert f.shape == (3, tiny.feature_dim) == (3, 32)
        assert torch.equal(f, again.model(x))
    assert isinstance(tiny.model, VisionTransformer) and tiny.model.norm_pre is not None
    assert tiny.identity["sha256"] == again.identity["sha256"]
    assert tiny.preprocess.mean == C.CLIP_MEAN and tiny.preprocess.interpolation == "bicubic"
    prompts = attach_prefix(again.model, blocks=(0, 1), length=0)
    assert prompts.length == 0
    prefix = torch.randn(3, 2, 4, 48)  # (B, 2, L, D)
    with torch.no_grad():
        out = forward_with_prefix(again.model, x, {0: prefix})  # (3, 32)
    assert out.shape == (3, 32) and not torch.allclose(out, f)


def test_tiny_clip_text_and_zero_shot(tiny):
    pytest.importorskip("open_clip")
    tokens = tiny.text.tokenize(["a photo of a cat.", "dog"])  # (2, 16)
    assert tokens.shape == (2, 16) and tokens[0, 0] == 49406  # <start_of_text>
    assert tokens[0].argmax() == 7 and tokens[0, 7] == 49407  # sot a photo of a cat . eot
    with torch.no_grad():
        t = tiny.text.encode_text(["a photo of a cat.", "dog"])  # (2, 32)
        again = B.create_backbone("clip_tiny_random").text.encode_text(["a photo of a cat.", "dog"])
        head = C.zero_shot_head(tiny, ["cat", "dog", "car"])  # (3, 32)
        logits = C.clip_logits(tiny.model(torch.randn(4, 3, 32, 32)), head, tiny.text.logit_scale)
    assert t.shape == (2, 32) and torch.equal(t, again)
    assert head.shape == (3, 32) and torch.allclose(head.norm(dim=1), torch.ones(3))
    assert logits.shape == (4, 3)
    assert float(tiny.text.logit_scale.detach().exp()) == pytest.approx(1 / 0.07)


def test_zero_shot_ensemble_and_logits_by_hand(tiny):
    pytest.importorskip("open_clip")
    names, templates = ["cat", "dog"], ["a photo of a {}.", "a drawing of a {}."]
    with torch.no_grad():
        a = F.normalize(tiny.text.encode_text([templates[0].format(n) for n in names]), dim=-1)
        b = F.normalize(tiny.text.encode_text([templates[1].format(n) for n in names]), dim=-1)
        head = C.zero_shot_head(tiny, names, templates)
    mean = (a + b) / 2
    assert torch.allclose(head, mean / mean.norm(dim=1, keepdim=True), atol=1e-6)
    img, txt = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    logits = C.clip_logits(img, txt, torch.tensor(2.0).log())  # 2 * cos
    assert torch.allclose(logits, torch.tensor([[2 * 0.6, 2 * 0.8]]))
    with pytest.raises(ConfigError, match="no text tower"):
        C.zero_shot_head(B.create_backbone("vit_tiny_random"), names)


def test_prompted_text_embeddings_carry_gradients(tiny):
    pytest.importorskip("open_clip")
    tokens = tiny.text.tokenize(["X X X cat."])  # (1, 16): CoOp-style placeholders
    emb = tiny.text.token_embedding(tokens).detach()  # (1, 16, 32)
    ctx = torch.zeros(3, 32, requires_grad=True)
    x = torch.cat([emb[:, :1], ctx[None], emb[:, 4:]], dim=1)  # (1, 16, 32)
    out = tiny.text.encode_embedded(x, tokens.argmax(-1))  # (1, 32)
    out.sum().backward()
    assert out.shape == (1, 32) and ctx.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.allclose(tiny.text.encode_embedded(emb, tokens.argmax(-1)), tiny.text(tokens))


def test_open_clip_weights_give_the_same_embeddings():
    m = _open_clip_tiny()
    vit, text = C.build_clip(C.TINY)
    C.load_clip_state(vit, text, m.state_dict(), "tiny")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = text.tokenize(["a photo of a cat.", "a dog"])
        assert (m.encode_image(x) - vit.eval()(x)).abs().max() < 1e-5
        assert (m.encode_text(tokens) - text.eval()(tokens)).abs().max() < 1e-5
    assert torch.equal(text.logit_scale.data, m.logit_scale.data)


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "torchscript"])
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_weights_from_a_local_file(tmp_path, fmt):
    m = _open_clip_tiny(seed=2)
    path = tmp_path / f"clip.{ 'pt' if fmt == 'torchscript' else fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    elif fmt == "bin":
        torch.save({"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, path)
    else:  # OpenAI ships a TorchScript archive
        torch.jit.script(m).save(str(path))
    bb = B.create_backbone("clip_tiny_random", weights=path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (bb.model(x) - m.encode_image(x)).abs().max() < 1e-5
        tokens = bb.text.tokenize(["a bird"])
        assert (bb.text(tokens) - m.encode_text(tokens)).abs().max() < 1e-5
    assert bb.identity["weights"] == str(path) and bb.identity["pretrained"] is False
    assert bb.identity["sha256"] != B.create_backbone("clip_tiny_random").identity["sha256"]


def test_wrong_weights_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    wide = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in _open_clip_tiny(vision_width=64).state_dict().items()},
              str(wide))
    with pytest.raises(WeightsError, match="do not fit clip_tiny_random"):
        B.create_backbone("clip_tiny_random", weights=wide)
    image_only = tmp_path / "vit.safetensors"
    save_file(B.create_backbone("clip_tiny_random").model.state_dict(), str(image_only))
    with pytest.raises(WeightsError, match="not a CLIP checkpoint"):
        B.create_backbone("clip_tiny_random", weights=image_only)
    with pytest.raises(WeightsError, match="not found"):
        B.create_backbone("clip_tiny_random", weights=tmp_path / "missing.pt")


def test_offline_clip_vit_b16_fails_fast_naming_the_file_and_the_fix(monkeypatch):
    def unreachable(host, timeout=3.0):
        raise OSError("no route to host")

    monkeypatch.setattr(B.base, "check_reachable", unreachable)
    pytest.importorskip("huggingface_hub")
    start = time.perf_counter()
    with pytest.raises(WeightsError) as e:
        B.create_backbone("clip_vit_b16")
    msg = str(e.value)
    assert C.HUB_ID in msg and "open_clip_model.safetensors" in msg and "--weights" in msg
    assert "ViT-B-16.pt" in msg
    assert time.perf_counter() - start < 5  # no network retries, no ViT-B/16 built
