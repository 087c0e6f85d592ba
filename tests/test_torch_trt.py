"""The `torch-trt` backend (Torch-TensorRT): refused in one line without the package, its
compile settings for old and new Torch-TensorRT releases, the wiring against a stand-in
torch_tensorrt on the CPU, and parity on a GPU where Torch-TensorRT is installed."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rpiae.cli.main import main as cli
from rpiae.engines import BackendUnavailable, load_backend
from rpiae.engines import tensorrt as T
from rpiae.engines import torch_trt_backend as TT

_GPU_SKIP = ("torch_tensorrt not installed" if importlib.util.find_spec("torch_tensorrt") is None
             else "CUDA not available" if not torch.cuda.is_available() else None)


def fake_torch_tensorrt(monkeypatch, autocast: bool):
    """A stand-in `torch_tensorrt` whose compile records its arguments and returns the module
    (eager PyTorch): a new release (autocast settings) or an old one (enabled_precisions)."""
    calls = []
    m = types.ModuleType("torch_tensorrt")

    class Input:
        def __init__(self, min_shape, opt_shape, max_shape, dtype):
            self.shapes, self.dtype = (min_shape, opt_shape, max_shape), dtype

    def compile(module, ir, inputs, **settings):
        calls.append({"ir": ir, "shapes": inputs[0].shapes, "dtype": inputs[0].dtype, **settings})
        return module

    m.Input, m.compile = Input, compile
    names = ["enabled_precisions", "disable_tf32", "min_block_size"]
    if autocast:
        names += ["use_explicit_typing", "enable_autocast", "autocast_low_precision_type"]
    settings_mod = types.ModuleType("torch_tensorrt.dynamo._settings")
    settings_mod.CompilationSettings = dataclasses.make_dataclass("CompilationSettings", [(n, object, None) for n in names])
    for name, mod in (("torch_tensorrt", m), ("torch_tensorrt.dynamo", types.ModuleType("torch_tensorrt.dynamo")),
                      ("torch_tensorrt.dynamo._settings", settings_mod)):
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_missing_torch_tensorrt_is_one_line(monkeypatch, trained_or_tiny_ckpt, tmp_path, sample_photos):
    from rpiae.imageio import save_image

    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    with pytest.raises(BackendUnavailable) as e:
        load_backend(trained_or_tiny_ckpt, "torch-trt", precision="fp16", device="cuda")
    assert str(e.value) == TT.TORCH_TRT_MISSING
    img = save_image(sample_photos[0], tmp_path / "a.png")
    r = CliRunner().invoke(cli, ["encode", "-m", trained_or_tiny_ckpt, "-b", "torch-trt", "-p", "fp16", "-d", "cuda",
                                 str(img), "-o", str(tmp_path / "z.npy")])
    assert r.exit_code == 1 and "Traceback" not in r.output and "Torch-TensorRT is not installed" in r.output


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast-release", "enabled-precisions-release"])
def test_compile_settings_per_release(monkeypatch, autocast):
    fake_torch_tensorrt(monkeypatch, autocast)
    import torch_tensorrt

    assert TT.compile_settings(torch_tensorrt, torch.float32) == {"disable_tf32": True}
    s16 = TT.compile_settings(torch_tensorrt, torch.float16)
    if autocast:
        assert s16 == {"disable_tf32": True, "use_explicit_typing": True, "enable_autocast": True,
                       "autocast_low_precision_type": torch.float16}
    else:
        assert s16 == {"disable_tf32": True, "enabled_precisions": {torch.float32, torch.float16}}


def test_backend_compiles_both_graphs_over_the_profile(monkeypatch, tiny_model, sample_photos):
    from rpiae.engines.torch_backend import TorchBackend
    from rpiae.export.profile import BatchProfile

    calls = fake_torch_tensorrt(monkeypatch, autocast=True)
    monkeypatch.setattr(T, "require_cuda", lambda device=None: torch.device("cpu"))
    with pytest.raises(BackendUnavailable, match="int8 needs a ModelOpt-quantised"):
        TT.TorchTRTBackend(tiny_model, precision="int8")
    be = TT.TorchTRTBackend(tiny_model, precision="bf16", profile=BatchProfile(2, 4, 4))
    assert [c["shapes"] for c in calls] == [((2, 3, 256, 256), (4, 3, 256, 256), (4, 3, 256, 256)),
                                            ((2, 64, 16, 16), (4, 64, 16, 16), (4, 64, 16, 16))]
    assert all(c["ir"] == "dynamo" and c["dtype"] == torch.float32 and c["autocast_low_precision_type"] == torch.bfloat16
               for c in calls)
    assert be.max_batch == 4 and be.describe()["profile"] == "2:4:4"
    # the stand-in returns the eager graphs: batches are split to the profile and padded to its minimum
    z = be.encode(sample_photos[:5])
    ref = TorchBackend(tiny_model).encode(sample_photos[:5])
    assert z.shape == (5, 64, 16, 16)
    np.testing.assert_allclose(z, ref, atol=1e-5)
    assert be.decode(torch.from_numpy(z[:1])).shape == (1, 3, 256, 256)


@pytest.mark.gpu
@pytest.mark.skipif(_GPU_SKIP is not None, reason=_GPU_SKIP or "")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_torch_trt_parity_on_gpu(bundle_all, sample_photos, precision):
    from rpiae.verify import verify_bundle

    report = verify_bundle(bundle_all, backend="torch-trt", images=sample_photos, batches=[1, 3], precisions=[precision],
                           device="cuda")
    assert report["ok"], report["results"]
