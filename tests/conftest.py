"""Shared fixtures: a seeded tiny model, its checkpoint, and real photos at 256x256."""

from __future__ import annotations

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
def photos() -> np.ndarray:
    """Eight real photos (scikit-image / scikit-learn), (8, 3, 256, 256) float32 in [0, 1]."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    from rpiae.imageio import fit_square

    arrays = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    arrays += [data.motorcycle_left() if hasattr(data, "motorcycle_left") else data.hubble_deep_field()]
    arrays += list(load_sample_images().images)
    out = []
    for a in arrays[:8]:
        x = torch.from_numpy(np.ascontiguousarray(a[..., :3].transpose(2, 0, 1))).float() / 255.0
        out.append(fit_square(x, 256).numpy())
    return np.stack(out)


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
    from rpiae.export import export_bundle

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
