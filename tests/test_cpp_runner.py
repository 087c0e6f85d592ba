"""engines/cpp: the C++ runner builds with CMake against the installed torch wheel, runs an
image through the AOTInductor encode/decode packages and matches the Python backends.

Built once per session into a tmp directory; skipped (with the reason) where cmake or a C++
compiler is missing. TensorRT is not installed here: the configure step must say so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from rpiae.engines.aoti_backend import find_packages

CPP = Path(__file__).resolve().parents[1] / "engines" / "cpp"  # the sources


@pytest.fixture(scope="module")
def runner_exe(cpp_runner):
    return cpp_runner


@pytest.fixture(scope="module")
def packaged(aoti_export):
    return aoti_export.bundle, aoti_export.cache


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


def test_runner_matches_python_backends(runner_exe, packaged, astronaut_ppm, tmp_path, monkeypatch):
    from PIL import Image

    from rpiae.engines import load_backend
    from rpiae.imageio import to_uint8
    from rpiae.metrics import psnr
    from rpiae.verify.parity import TOLERANCES

    bundle, cache = packaged
    pk = find_packages(bundle)
    enc, dec = (bundle.root / pk[g][0] for g in ("encode", "decode"))
    ppm, x = astronaut_ppm
    out, zf, yf = tmp_path / "out.ppm", tmp_path / "z.f32", tmp_path / "y.f32"
    res = _run(runner_exe["exe"], enc, dec, ppm, out, "--latent", zf, "--raw", yf, cache=cache)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "AOTInductor x86-64-v3" in res.stdout
    z = np.fromfile(zf, np.float32).reshape(1, 64, 16, 16)
    y = np.fromfile(yf, np.float32).reshape(1, 3, 256, 256)

    with monkeypatch.context() as env:
        env.setenv("RPIAE_CACHE_DIR", str(cache))
        with load_backend(bundle.root, "aoti") as be:
            z_aoti = be.encode(x)
            y_aoti = be.decode(z_aoti)
    with load_backend(bundle.root, "torch") as be:
        z_ref = be.encode(x)
        y_ref = be.decode(z_ref)
    # the same compiled package from C++ and from Python
    np.testing.assert_allclose(z, z_aoti, atol=1e-6)
    np.testing.assert_allclose(y, y_aoti, atol=1e-5)
    # against eager PyTorch at the ONNX FP32 tolerances
    tol = TOLERANCES["fp32"]
    assert np.abs(z - z_ref).max() <= tol["latent_max_abs_rel"] * np.abs(z_ref).max()
    assert psnr(np.clip(y, 0, 1), np.clip(y_ref, 0, 1))[0] >= tol["decoded_psnr_db"]
    # the written 8-bit image is the clamped, rounded decoded image
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (256, 256, 3)
    assert np.abs(img.astype(int) - to_uint8(y_ref[0]).astype(int)).max() <= 1
    assert not any((Path(cache) / "tmp").glob("aotinductor*")), "the loader left its unpacked files behind"


def test_runner_errors_are_one_line(runner_exe, packaged, tmp_path):
    from PIL import Image

    bundle, cache = packaged
    pk = find_packages(bundle)
    enc, dec = (bundle.root / pk[g][0] for g in ("encode", "decode"))
    small = tmp_path / "small.ppm"
    Image.new("RGB", (200, 256)).save(small)
    res = _run(runner_exe["exe"], enc, dec, small, tmp_path / "o.ppm", cache=cache)
    assert res.returncode == 1 and "256x256" in res.stderr
    assert "the graphs take 256x256 (resize the short side to 256" in res.stderr  # the size the package declares
    res = _run(runner_exe["exe"], enc, dec, tmp_path / "missing.ppm", cache=cache)
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


# -- the TensorRT path, compiled against stand-in TensorRT/CUDA headers (tests/cpp_stubs) -------
STUBS = Path(__file__).resolve().parent / "cpp_stubs"


@pytest.fixture(scope="module")
def stub_trt_runner(tmp_path_factory):
    """rpiae_run's TensorRT half built against headers that count device allocations."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if not cxx:
        pytest.skip("a C++ compiler is not installed")
    exe = tmp_path_factory.mktemp("stub-trt") / "rpiae_run_stub"
    res = subprocess.run([cxx, "-std=c++17", "-O0", "-DRPIAE_WITH_TENSORRT", f"-I{STUBS}", str(CPP / "rpiae_run.cpp"),
                          "-o", str(exe)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    return exe


@pytest.mark.parametrize("fail", [None, "enqueue", "memcpy_d2h"])
def test_tensorrt_path_frees_device_memory_on_every_exit(stub_trt_runner, tmp_path, fail):
    from PIL import Image

    enc, dec, img = tmp_path / "enc.plan", tmp_path / "dec.plan", tmp_path / "in.ppm"
    enc.write_text("encode")
    dec.write_text("decode")
    Image.new("RGB", (256, 256), (10, 20, 30)).save(img)
    env = {k: v for k, v in os.environ.items() if k != "RPIAE_FAKE_FAIL"}
    if fail:
        env["RPIAE_FAKE_FAIL"] = fail
    res = subprocess.run([str(stub_trt_runner), str(enc), str(dec), str(img), str(tmp_path / "out.ppm")],
                         capture_output=True, text=True, env=env, timeout=120)
    if fail is None:
        assert res.returncode == 0, res.stderr
        assert (tmp_path / "out.ppm").is_file()
    else:
        errors = [line for line in res.stderr.splitlines() if line.startswith("rpiae_run: error:")]
        assert res.returncode == 1 and len(errors) == 1, res.stderr
        assert not (tmp_path / "out.ppm").exists()
    # every device buffer is freed, also when a CUDA call fails half-way through a run
    assert "never freed 0" in res.stderr, res.stderr


def test_configure_without_cuda_toolkit_on_a_cuda_torch_reports_instead_of_aborting(tmp_path):
    """A CUDA build of torch whose CMake config aborts (FATAL_ERROR, even under QUIET) when the
    CUDA toolkit is missing: the configure step says so for the .pt2 path instead of dying in
    torch's config. The torch prefix here mimics a CUDA wheel's Caffe2Config.cmake."""
    if not shutil.which("cmake") or not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("cmake or a C++ compiler is not installed")
    prefix = tmp_path / "cuda-torch"
    (prefix / "Torch").mkdir(parents=True)
    (prefix / "Caffe2").mkdir()
    (prefix / "Torch" / "TorchConfig.cmake").write_text(
        'include("${CMAKE_CURRENT_LIST_DIR}/../Caffe2/Caffe2Config.cmake")\nset(Torch_FOUND TRUE)\n')
    (prefix / "Caffe2" / "Caffe2Config.cmake").write_text(
        "set(CAFFE2_USE_CUDA ON)\nmessage(FATAL_ERROR \"Your installed Caffe2 version uses CUDA but I cannot find the "
        "CUDA libraries. Please set the proper CUDA prefixes and / or install CUDA.\")\n")
    res = subprocess.run(["cmake", "-S", str(CPP), "-B", str(tmp_path / "build"), f"-DCMAKE_PREFIX_PATH={prefix}",
                          "-DRPIAE_WITH_TENSORRT=OFF", "-DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON"],
                         capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert "AOTInductor .pt2 support: NO - this torch is a CUDA build" in out and "CUDA toolkit" in out, out
    assert "Your installed Caffe2 version uses CUDA" not in out, out


def test_version_compatible_plans_need_the_flag(stub_trt_runner, tmp_path):
    """A version-compatible plan carries TensorRT's lean runtime: the runner lets TensorRT run it
    only with --version-compatible (IRuntime::setEngineHostCodeAllowed), and says so without it."""
    from PIL import Image

    enc, dec, img = tmp_path / "enc.plan", tmp_path / "dec.plan", tmp_path / "in.ppm"
    enc.write_text("vc:encode")
    dec.write_text("vc:decode")
    Image.new("RGB", (256, 256), (10, 20, 30)).save(img)
    env = {k: v for k, v in os.environ.items() if k != "RPIAE_FAKE_FAIL"}
    res = subprocess.run([str(stub_trt_runner), str(enc), str(dec), str(img), str(tmp_path / "a.ppm")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 1 and "needs --version-compatible here" in res.stderr, res.stderr
    res = subprocess.run([str(stub_trt_runner), str(enc), str(dec), str(img), str(tmp_path / "b.ppm"),
                          "--version-compatible"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and (tmp_path / "b.ppm").is_file(), res.stderr


def test_aoti_cuda_path_turns_tf32_off():
    """The .pt2 CUDA path runs ATen's cuDNN/cuBLAS kernels, which default to TF32 for cuDNN:
    the runner turns both off before loading a CUDA package (compiled and run only with libtorch
    CUDA and a GPU, so checked here in the source)."""
    src = (CPP / "rpiae_run.cpp").read_text()
    cuda_branch = src.split("no CUDA device is available to libtorch", 1)[1].split("batch_min_ =", 1)[0]
    assert "setAllowTF32CuDNN(false)" in cuda_branch and "setAllowTF32CuBLAS(false)" in cuda_branch
