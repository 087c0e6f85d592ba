"""Reconstruction metrics against independent computations on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rpiae.metrics import patch_border_ratio, patch_step_profile, psnr, ssim


def test_psnr_and_ssim_match_independent_computations(photos):
    from skimage.metrics import structural_similarity

    x = photos[:4].astype(np.float64)
    noisy = np.clip(x + np.random.default_rng(0).normal(0, 0.03, x.shape), 0, 1)
    p, s = psnr(noisy, x), ssim(noisy, x)
    for i in range(4):
        mse = np.mean((noisy[i] - x[i]) ** 2)  # the authors' formula, written out
        assert p[i] == pytest.approx(20 * np.log10(1 / np.sqrt(mse)), abs=1e-9)
        ref = structural_similarity(x[i], noisy[i], channel_axis=0, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
        assert s[i] == pytest.approx(ref, abs=0.01)  # torchmetrics vs scikit-image: borders differ slightly
    assert 29 < p.mean() < 32 and 0.5 < s.mean() < 1
    assert psnr(x, x)[0] == pytest.approx(100.0)  # mse clamped at 1e-10
    assert psnr(x[:1], x[:1] + 0.1)[0] == pytest.approx(20.0) and psnr(x[:1], x[:1], max_db=150.0)[0] == 150.0


def test_patch_border_ratio_sees_a_patch_grid(photos):
    x = photos[:4]
    natural = patch_border_ratio(x)
    assert np.all(np.abs(natural - 1.0) < 0.15), natural  # photos have no 16-px grid
    # a per-patch brightness offset, as a decoder whose patches do not join up would make
    rng = np.random.default_rng(0)
    offsets = rng.normal(0, 0.04, (4, 1, 16, 16)).repeat(16, axis=2).repeat(16, axis=3)
    seams = patch_border_ratio(np.clip(x + offsets, 0, 1))
    assert np.all(seams > 1.5), seams
    # the grid must be the 16-pixel one: the same offsets on an 8-pixel grid read differently
    assert patch_border_ratio(np.clip(x + offsets, 0, 1), patch=8).mean() < seams.mean()
    # blockwise-constant image: every step is on a border
    blocks = np.kron(rng.random((1, 3, 16, 16)), np.ones((1, 1, 16, 16)))
    assert patch_border_ratio(blocks + 1e-3 * rng.random(blocks.shape))[0] > 50
    with pytest.raises(ValueError, match="patch borders"):
        patch_border_ratio(np.zeros((1, 3, 10, 10)))
    assert patch_border_ratio(torch.from_numpy(x[:1])).shape == (1,)


def test_patch_step_profile_locates_the_steps(photos):
    x = photos[:2]
    flat = patch_step_profile(x)
    assert flat.shape == (2, 16)
    assert np.all(np.abs(flat / flat.mean(axis=1, keepdims=True) - 1) < 0.25), flat  # photos: no offset stands out
    # per-patch offsets raise only the step across the border (offset 15)
    rng = np.random.default_rng(0)
    offsets = rng.normal(0, 0.04, (2, 1, 16, 16)).repeat(16, axis=2).repeat(16, axis=3)
    seams = patch_step_profile(x + offsets)
    assert np.allclose(seams[:, :15], flat[:, :15]) and np.all(seams[:, 15] > 1.5 * flat[:, 15])
    # noise on the pixels beside each border raises the steps next to it (offsets 14 and 0), which the
    # ratio counts as "inside"; the profile tells the two apart
    edge = (np.arange(256) % 16 == 15) | (np.arange(256) % 16 == 0)
    rough = x + 0.1 * rng.random(x.shape) * (edge[:, None] | edge[None, :])
    p = patch_step_profile(rough)
    assert np.all(p[:, 14] > 1.5 * flat[:, 14]) and np.all(p[:, 0] > 1.5 * flat[:, 0])
    assert np.allclose(p[:, 2:13], flat[:, 2:13], rtol=0.3)
    with pytest.raises(ValueError, match="patch borders"):
        patch_step_profile(np.zeros((1, 3, 10, 10)))
