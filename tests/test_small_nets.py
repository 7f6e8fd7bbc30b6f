"""GEM's reduced ResNet-18 as a from-scratch backbone."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from retain import ClassIncremental, create_backbone, create_method, evaluate
from retain.backbones import sha256_state
from retain.context import Context
from retain.layers.resnet import ReducedResNet18
from tests.conftest import tiny_bundle


def test_reduced_resnet18_layout():
    net = ReducedResNet18(nf=20)
    assert net.feature_dim == 160
    widths = [stage[0].conv1.out_channels for stage in net.layers]
    strides = [stage[0].conv1.stride[0] for stage in net.layers]
    assert widths == [20, 40, 80, 160] and strides == [1, 2, 2, 2]
    x = torch.randn(2, 3, 32, 32)
    assert net.layers(net.conv1(x)).shape == (2, 160, 4, 4)  # GEM pools the 4x4 map
    assert net(x).shape == (2, 160)
    assert 1.0e6 < sum(p.numel() for p in net.parameters()) < 1.2e6


def test_backbone_is_seeded_and_loads_saved_weights(tmp_path):
    a, b = create_backbone("resnet18_reduced"), create_backbone("resnet18_reduced")
    assert a.identity["sha256"] == b.identity["sha256"] and not a.identity["pretrained"]
    with torch.no_grad():
        for p in a.model.parameters():
            p.add_(0.01)
    save_file(a.model.state_dict(), str(tmp_path / "w.safetensors"))
    c = create_backbone("resnet18_reduced", weights=tmp_path / "w.safetensors")
    assert c.identity["sha256"] == sha256_state(a.model) != b.identity["sha256"]


def test_finetune_trains_it_from_scratch():
    sc = ClassIncremental(tiny_bundle(), increment=2, seed=1993)
    m = create_method("finetune", create_backbone("resnet18_reduced", image_size=16),
                      epochs=8, lr=0.05, batch_size=4)
    ctx = Context(batch_size=16)
    m.learn(sc[0], ctx)
    c, t = evaluate(m, sc[:1], ctx, 0)
    assert c.sum() / t.sum() > 0.75
