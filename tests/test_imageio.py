"""The image I/O policy: every file type becomes the same (3, 256, 256) float input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rpiae.imageio import ImageError, fit_square, load_image, load_images, save_image, to_uint8


def _save(tmp_path, name, arr, mode=None):
    p = tmp_path / name
    Image.fromarray(arr, mode=mode).save(p) if mode else Image.fromarray(arr).save(p)
    return p


def test_rgb_256_is_used_untouched(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    x = load_image(_save(tmp_path, "a.png", a))
    assert x.shape == (3, 256, 256) and x.dtype == np.float32
    np.testing.assert_array_equal(np.round(x * 255).astype(np.uint8).transpose(1, 2, 0), a)


def test_grayscale_is_replicated(tmp_path):
    g = np.random.default_rng(1).integers(0, 256, (256, 256), dtype=np.uint8)
    x = load_image(_save(tmp_path, "g.png", g))
    assert np.array_equal(x[0], x[1]) and np.array_equal(x[1], x[2])
    np.testing.assert_allclose(x[0], g / 255.0, atol=1e-6)


def test_rgba_is_composited_over_white(tmp_path):
    a = np.zeros((256, 256, 4), dtype=np.uint8)
    a[..., 0] = 255  # red
    a[:128, :, 3] = 255  # top half opaque, bottom half transparent
    x = load_image(_save(tmp_path, "rgba.png", a))
    np.testing.assert_allclose(x[:, 0, 0], [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(x[:, 200, 0], [1, 1, 1], atol=1e-6)


def test_16bit_grayscale_keeps_precision(tmp_path):
    g = (np.arange(256 * 256, dtype=np.uint32).reshape(256, 256) % 65536).astype(np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(g).save(p)
    x = load_image(p)
    np.testing.assert_allclose(x[0], g / 65535.0, atol=1e-6)
    assert len(np.unique(x[0])) > 256  # not squashed through 8 bits


def test_non_square_is_short_side_resized_and_centre_cropped(tmp_path):
    a = np.zeros((300, 600, 3), dtype=np.uint8)
    a[:, 250:350] = 255  # a white vertical band in the centre
    x = load_image(_save(tmp_path, "wide.jpg", a))
    assert x.shape == (3, 256, 256)
    assert x[:, :, 128].mean() > 0.9 and x[:, :, 0].mean() < 0.05


def test_small_images_are_upscaled():
    import torch

    x = fit_square(torch.full((3, 20, 30), 0.5), 256)
    assert tuple(x.shape) == (3, 256, 256) and abs(float(x.mean()) - 0.5) < 1e-4


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="junk.png: cannot read image"):
        load_image(tmp_path / "junk.png")
    good = _save(tmp_path, "good.png", np.zeros((64, 64, 3), np.uint8))
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="trunc.png"):
        load_images([good, tmp_path / "trunc.png"])


def test_output_is_clamped_and_quantised(tmp_path):
    y = np.stack([np.full((4, 4), -0.5), np.full((4, 4), 0.5), np.full((4, 4), 1.7)]).astype(np.float32)
    u = to_uint8(y)
    assert u[0, 0].tolist() == [0, 128, 255]
    p = save_image(y, tmp_path / "o.png")
    assert np.array_equal(np.asarray(Image.open(p)), u)
    assert [f.name for f in tmp_path.iterdir()] == ["o.png"]  # no temp file left
