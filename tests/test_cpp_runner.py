"""engines/cpp: the C++ runner builds with CMake against the installed torch wheel, runs an
image through the AOTInductor encode/decode packages and matches the Python backends.

Built once per session into a tmp directory; skipped (with the reason) where cmake or a C++
compiler is missing. TensorRT is not installed here: the configure step must say so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from rpiae.export import aoti
from tests.aoti_shared import aoti_bundle

CPP = Path(__file__).resolve().parents[1] / "engines" / "cpp"
_BUILD: dict[str, object] = {}


def _build(tmp_path_factory):
    if "exe" not in _BUILD:
        if not shutil.which("cmake") or not (shutil.which("g++") or shutil.which("c++")):
            pytest.skip("cmake or a C++ compiler is not installed")
        import torch.utils

        build = tmp_path_factory.mktemp("cpp-build")
        t = time.perf_counter()
        cfg = subprocess.run(["cmake", "-S", str(CPP), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                             capture_output=True, text=True)
        assert cfg.returncode == 0, cfg.stdout + cfg.stderr
        bld = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
        assert bld.returncode == 0, bld.stdout[-4000:] + bld.stderr[-4000:]
        _BUILD.update(exe=build / "rpiae_run", configure=cfg.stdout + cfg.stderr, seconds=time.perf_counter() - t)
    return _BUILD


@pytest.fixture(scope="module")
def runner_exe(tmp_path_factory):
    return _build(tmp_path_factory)


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    return aoti_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def astronaut_ppm(tmp_path_factory):
    """A real photo through the project's image policy (256x256), written as binary PPM."""
    from PIL import Image

    from rpiae.imageio import load_image, save_image
    from rpiae.samples import sample_photos

    names, photos = sample_photos()
    d = tmp_path_factory.mktemp("ppm")
    png = save_image(photos[names.index("astronaut")], d / "astronaut.png")
    ppm = d / "astronaut.ppm"
    Image.open(png).convert("RGB").save(ppm)  # binary P6
    return ppm, load_image(ppm)[None].copy()


def _run(exe, *args, cache=None):
    env = dict(os.environ)
    if cache is not None:
        env["TMPDIR"] = str(Path(cache) / "tmp")  # where the loader unpacks packages
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def test_configure_reports_backends(runner_exe):
    out = runner_exe["configure"]
    assert "AOTInductor .pt2 support: YES" in out
    if "TensorRT .plan support: YES" not in out:
        assert "TensorRT .plan support: NO - " in out and "TENSORRT_ROOT" in out


def test_runner_matches_python_backends(runner_exe, packaged, astronaut_ppm, tmp_path):
    from PIL import Image

    from rpiae.engines import load_backend
    from rpiae.export.parity import TOLERANCES
    from rpiae.imageio import psnr, to_uint8

    bundle, cache = packaged
    pk = aoti.find_packages(bundle)
    enc, dec = (bundle.root / pk[g][0] for g in ("encode", "decode"))
    ppm, x = astronaut_ppm
    out, zf, yf = tmp_path / "out.ppm", tmp_path / "z.f32", tmp_path / "y.f32"
    res = _run(runner_exe["exe"], enc, dec, ppm, out, "--latent", zf, "--raw", yf, cache=cache)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "AOTInductor x86-64-v3" in res.stdout
    z = np.fromfile(zf, np.float32).reshape(1, 64, 16, 16)
    y = np.fromfile(yf, np.float32).reshape(1, 3, 256, 256)

    os.environ["RPIAE_CACHE_DIR"] = str(cache)
    try:
        with load_backend(bundle.root, "aoti") as be:
            z_aoti = be.encode(x)
            y_aoti = be.decode(z_aoti)
    finally:
        os.environ.pop("RPIAE_CACHE_DIR", None)
    with load_backend(bundle.root, "torch") as be:
        z_ref = be.encode(x)
        y_ref = be.decode(z_ref)
    # the same compiled package from C++ and from Python
    np.testing.assert_allclose(z, z_aoti, atol=1e-6)
    np.testing.assert_allclose(y, y_aoti, atol=1e-5)
    # against eager PyTorch at the ONNX FP32 tolerances
    tol = TOLERANCES["fp32"]
    assert np.abs(z - z_ref).max() <= tol["latent_max_abs_rel"] * np.abs(z_ref).max()
    assert psnr(np.clip(y, 0, 1), np.clip(y_ref, 0, 1)) >= tol["decoded_psnr_db"]
    # the written 8-bit image is the clamped, rounded decoded image
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (256, 256, 3)
    assert np.abs(img.astype(int) - to_uint8(y_ref[0]).astype(int)).max() <= 1
    assert not any((Path(cache) / "tmp").glob("aotinductor*")), "the loader left its unpacked files behind"


def test_runner_errors_are_one_line(runner_exe, packaged, tmp_path):
    from PIL import Image

    bundle, cache = packaged
    pk = aoti.find_packages(bundle)
    enc, dec = (bundle.root / pk[g][0] for g in ("encode", "decode"))
    small = tmp_path / "small.ppm"
    Image.new("RGB", (200, 256)).save(small)
    res = _run(runner_exe["exe"], enc, dec, small, tmp_path / "o.ppm", cache=cache)
    assert res.returncode == 1 and "256x256" in res.stderr
    res = _run(runner_exe["exe"], enc, enc, tmp_path / "missing.ppm", cache=cache)
    assert res.returncode == 1 and "cannot open" in res.stderr
    good = tmp_path / "good.ppm"
    Image.new("RGB", (256, 256), (90, 120, 200)).save(good)
    res = _run(runner_exe["exe"], dec, enc, good, tmp_path / "o.ppm", cache=cache)
    assert res.returncode == 1 and "not an rpiae encode package" in res.stderr
    res = _run(runner_exe["exe"], enc, dec, good, "--device", "cuda", cache=cache)
    assert res.returncode == 1 and "compiled for cpu" in res.stderr
    if "TensorRT .plan support: YES" not in runner_exe["configure"]:
        res = _run(runner_exe["exe"], "enc.plan", "dec.plan", good)
        assert res.returncode == 1 and "built without TensorRT" in res.stderr
    res = _run(runner_exe["exe"], enc)
    assert res.returncode == 2 and "usage" in res.stderr
    assert not (tmp_path / "o.ppm").exists()
