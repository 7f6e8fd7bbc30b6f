"""The feature cache: one pass per image, on disk, shared across runs and processes."""

from __future__ import annotations

import numpy as np
import torch

from retain.features import FeatureCache, embed


def test_each_image_is_embedded_once_and_reused_from_disk(tiny_vit, bundle, tmp_path):
    split = bundle.train
    a = FeatureCache(tmp_path)
    first = a.features(tiny_vit, split.subset(np.arange(10)))
    both = a.features(tiny_vit, split.subset(np.arange(20)))
    assert a.images_embedded == 20
    torch.testing.assert_close(both[:10], first)
    b = FeatureCache(tmp_path)  # another run: reads the shards, embeds nothing
    again = b.features(tiny_vit, split.subset(np.arange(20)[::-1].copy()))
    assert b.images_embedded == 0
    torch.testing.assert_close(again, both.flip(0))


def test_cached_features_equal_a_direct_pass(tiny_vit, bundle):
    split = bundle.test.subset(np.arange(7))
    cached = FeatureCache().features(tiny_vit, split, batch_size=3)
    direct = embed(tiny_vit, split, split.index, device="cpu", batch_size=7)
    torch.testing.assert_close(cached, direct, rtol=1e-5, atol=1e-6)


def test_entries_are_keyed_by_backbone_mode_and_content(tiny_vit, bundle, tmp_path):
    c = FeatureCache(tmp_path)
    c.features(tiny_vit, bundle.test)
    c.features(tiny_vit, bundle.test, autocast=True)  # bf16 is another entry
    c.features(tiny_vit, bundle.train)  # another split
    assert c.images_embedded == 2 * len(bundle.test) + len(bundle.train)
    assert len(list(tmp_path.iterdir())) == 2  # fp32 and bf16 folders for this backbone


def test_two_writers_of_the_same_rows_do_not_corrupt(tiny_vit, bundle, tmp_path):
    a, b = FeatureCache(tmp_path), FeatureCache(tmp_path)
    fa = a.features(tiny_vit, bundle.test)
    fb = b.features(tiny_vit, bundle.test)  # b loaded before a wrote? either way: same rows
    torch.testing.assert_close(fa, fb)
    torch.testing.assert_close(FeatureCache(tmp_path).features(tiny_vit, bundle.test), fa)
