"""Shared fixtures: a seeded tiny model, its checkpoint, real photos at 256x256, the session's
fp32/fp16/int8 bundle and its AOTInductor-packaged twin."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from rpiae import RPiAE

torch.set_num_threads(2)


def make_tiny(seed: int = 0) -> RPiAE:
    torch.manual_seed(seed)
    model = RPiAE.from_preset("tiny")
    # random init leaves some tensors at constants (zero-init layers, LayerScale 1.0, CLS
    # tokens); perturb every tensor so that a wrongly mapped key cannot go unnoticed
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.encoder.refresh_pos_embed()
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model() -> RPiAE:
    return make_tiny()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_model) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    tiny_model.save(path)
    return str(path)


@pytest.fixture(scope="session")
def photos(sample_photos) -> np.ndarray:
    """Eight real photos (scikit-image / scikit-learn), (8, 3, 256, 256) float32 in [0, 1]."""
    return sample_photos[:8]


@pytest.fixture(scope="session")
def trained_or_tiny_ckpt(tmp_path_factory) -> str:
    """The shipped trained checkpoint when present, else a seeded random tiny one."""
    from rpiae.assets import DEFAULT_CHECKPOINT

    if DEFAULT_CHECKPOINT.is_file():
        return str(DEFAULT_CHECKPOINT)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-random.safetensors"
    make_tiny().save(path)
    return str(path)


@pytest.fixture(scope="session")
def sample_photos():
    from rpiae.samples import sample_photos as _sample

    return _sample()[1]


@pytest.fixture(scope="session")
def bundle_all(tmp_path_factory, trained_or_tiny_ckpt, sample_photos):
    """fp32 + fp16 + int8 bundle of the test checkpoint, calibrated on real photos."""
    from rpiae.verify import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "all"
    return export_bundle(trained_or_tiny_ckpt, out, precisions="fp32,fp16,int8", calib=sample_photos, progress=False)


@pytest.fixture
def kernel_flags(monkeypatch):
    """Restore the process-wide kernel switches a Trainer sets (deterministic algorithms, cuDNN)."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


@dataclass
class AOTIExport:
    bundle: object  # rpiae.export.Bundle, with CPU packages for batches PROFILE.min..max
    cache: Path  # RPIAE_CACHE_DIR of the session's compiles and loads
    output: str  # what `rpiae export --target aoti` printed
    profile: object  # the BatchProfile they were compiled for


@pytest.fixture(scope="session")
def aoti_cache(tmp_path_factory) -> Path:
    """The session's compiler cache (Inductor, temporary files, unpacked packages): compiling
    reuses its precompiled headers."""
    return tmp_path_factory.mktemp("rpiae-cache")


@pytest.fixture(scope="session")
def aoti_export(tmp_path_factory, aoti_cache, trained_or_tiny_ckpt) -> AOTIExport:
    """An fp32 bundle with CPU AOTInductor packages (batch 1..8), made once per session with the
    user's command `rpiae export --target aoti --device cpu --batch 1:2:8`."""
    from click.testing import CliRunner

    from rpiae.cli.main import main
    from rpiae.export import Bundle
    from rpiae.export.profile import BatchProfile

    profile = BatchProfile(1, 2, 8)
    out = tmp_path_factory.mktemp("aoti") / "bundle"
    args = ["export", "--checkpoint", trained_or_tiny_ckpt, "--target", "aoti", "--device", "cpu",
            "--batch", str(profile), "--out", str(out)]
    res = CliRunner().invoke(main, args, env={"RPIAE_CACHE_DIR": str(aoti_cache)})
    assert res.exit_code == 0, f"rpiae {' '.join(args)} failed:\n{res.output}\n{res.exception!r}"
    return AOTIExport(Bundle.open(out), aoti_cache, res.output, profile)


@pytest.fixture(scope="session")
def cpp_runner(tmp_path_factory) -> dict:
    """{"exe", "configure" (cmake's output)}: engines/cpp built once per session against this
    torch; skipped where cmake or a C++ compiler is missing."""
    import shutil
    import subprocess

    import torch.utils

    if not shutil.which("cmake") or not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("cmake or a C++ compiler is not installed")
    src = Path(__file__).resolve().parents[1] / "engines" / "cpp"
    build = tmp_path_factory.mktemp("cpp-build")
    cfg = subprocess.run(["cmake", "-S", str(src), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                         capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    bld = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
    assert bld.returncode == 0, bld.stdout[-4000:] + bld.stderr[-4000:]
    return {"exe": build / "rpiae_run", "configure": cfg.stdout + cfg.stderr}
