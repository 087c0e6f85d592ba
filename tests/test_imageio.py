"""The image I/O policies: every file type becomes the same (3, 256, 256) float input.

`adm` (the default) must give the authors' exact pixels; `torch-aa` is the float policy.
"""

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
    x = load_image(_save(tmp_path, "rgba.png", a), crop="torch-aa")
    np.testing.assert_allclose(x[:, 0, 0], [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(x[:, 200, 0], [1, 1, 1], atol=1e-6)
    # the authors' loader drops alpha instead (`convert("RGB")`): the transparent half stays red
    y = load_image(tmp_path / "rgba.png")
    np.testing.assert_allclose(y[:, 200, 0], [1, 0, 0], atol=1e-6)


def test_16bit_grayscale_keeps_precision(tmp_path):
    g = (np.arange(256 * 256, dtype=np.uint32).reshape(256, 256) % 65536).astype(np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(g).save(p)
    x = load_image(p, crop="torch-aa")
    np.testing.assert_allclose(x[0], g / 65535.0, atol=1e-6)
    assert len(np.unique(x[0])) > 256  # not squashed through 8 bits


def test_non_square_is_short_side_resized_and_centre_cropped(tmp_path):
    a = np.zeros((300, 600, 3), dtype=np.uint8)
    a[:, 250:350] = 255  # a white vertical band in the centre
    for crop in ("adm", "torch-aa"):
        x = load_image(_save(tmp_path, "wide.jpg", a), crop=crop)
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


def adm_center_crop_arr(pil_image, image_size):
    """guided-diffusion's image_datasets.center_crop_arr, transcribed."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


@pytest.mark.parametrize("size", [(256, 256), (300, 200), (640, 427), (513, 1100), (1411, 1411), (2000, 600), (100, 90)])
def test_adm_crop_gives_the_authors_pixels(tmp_path, size):
    """Real photos at several sizes and modes: the same uint8 pixels as the authors' function
    applied after torchvision's loader (`Image.open(f).convert("RGB")`)."""
    from skimage import data

    rng = np.random.default_rng(sum(size))
    src = Image.fromarray(data.astronaut()).resize(size, Image.BICUBIC)
    if size == (100, 90):
        src = src.convert("L")  # grayscale
    if size == (513, 1100):
        src = src.convert("RGBA")
        src.putalpha(Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8)))
    path = tmp_path / "photo.png"
    src.save(path)
    ours = load_image(path)  # the default policy
    with Image.open(path) as f:
        ref = adm_center_crop_arr(f.convert("RGB"), 256)
    assert ours.shape == (3, 256, 256) and ref.shape == (256, 256, 3)
    np.testing.assert_array_equal(np.round(ours * 255).astype(np.uint8).transpose(1, 2, 0), ref)
    np.testing.assert_allclose(ours, ref.transpose(2, 0, 1) / 255.0, atol=1e-7)


def test_adm_crop_ignores_exif_rotation(tmp_path):
    a = np.zeros((300, 400, 3), np.uint8)
    a[:, :200] = 255  # left half white
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW" tag
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    adm = load_image(tmp_path / "r.jpg")
    aa = load_image(tmp_path / "r.jpg", crop="torch-aa")
    assert adm[:, :, :64].mean() > 0.9  # as stored: white on the left
    # orientation 6 shows the stored image turned 90 degrees clockwise: its left edge on top
    assert aa[:, :64, :].mean() > 0.9 and aa[:, -64:, :].mean() < 0.1


def test_unknown_crop_policy(tmp_path):
    p = _save(tmp_path, "a.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="adm"):
        load_image(p, crop="nearest")


def test_16bit_grayscale_under_adm_warns_once(tmp_path, monkeypatch):
    """The authors' loader clips 16-bit grayscale at 255 (mostly white): adm keeps their pixels
    and says so once; torch-aa scales 16-bit to [0, 1]."""
    import warnings

    from PIL import Image

    from rpiae import imageio

    monkeypatch.setattr(imageio, "_warned_wide_gray", False)
    a = (np.linspace(0, 40000, 300 * 300).reshape(300, 300)).astype(np.uint16)
    p = tmp_path / "depth.png"
    Image.fromarray(a).save(p)
    img = Image.open(p)
    assert img.mode.startswith("I")
    with pytest.warns(UserWarning, match=r"depth.png: I;16\S* grayscale under --crop adm is clipped at 255"):
        x = imageio.crop_image(img, 256, "adm")
    assert (x > 0.99).mean() > 0.9  # the authors' result: nearly all white
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        imageio.crop_image(Image.open(p), 256, "adm")
    y = imageio.crop_image(Image.open(p), 256, "torch-aa")
    assert 0.2 < float(y.mean()) < 0.4  # scaled by 65535
