"""What every backend shares on a GPU, checked on the CPU: device strings, the FP32 math
mode (no TF32), the input check that leaves device flags pending until the work is queued,
no copy of a single output chunk, the torch backend's device scope, and the AOTInductor
backend's load errors."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from rpiae.config import get_preset
from rpiae.engines import base
from rpiae.engines.base import Backend, BackendUnavailable, InputError


@pytest.mark.parametrize("text,index,device", [
    ("cpu", None, torch.device("cpu")), ("cuda", -1, torch.device("cuda")), ("cuda:1", 1, torch.device("cuda", 1)),
    ("trt", -1, torch.device("cuda")), ("trt:2", 2, torch.device("cuda", 2)),
])
def test_device_strings(text, index, device):
    assert base.cuda_index(text) == index
    assert base.torch_device(text) == device


@pytest.mark.parametrize("text", ["gpu", "cuda:x", "trt:-1", "mps"])
def test_unknown_device_strings_are_one_line(text):
    with pytest.raises(BackendUnavailable, match="unknown device"):
        base.torch_device(text)


def _tf32_flags():
    return (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
            torch.get_float32_matmul_precision())


@pytest.mark.parametrize("setup", ["default", "high"])
def test_strict_fp32_turns_tf32_off_and_restores(setup):
    saved = _tf32_flags()
    try:
        if setup == "high":  # a user who asked for TF32 matmuls
            torch.set_float32_matmul_precision("high")
        before = _tf32_flags()
        assert before[0] is True  # cuDNN convolutions default to TF32 in PyTorch
        with base.strict_fp32():
            assert _tf32_flags()[:2] == (False, False) and _tf32_flags()[2] == "highest"
        assert _tf32_flags() == before
        with pytest.raises(ZeroDivisionError), base.strict_fp32():
            1 / 0
        assert _tf32_flags() == before
    finally:
        torch.set_float32_matmul_precision(saved[2])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[0]


def test_precision_context_is_strict_fp32_only_on_cuda():
    seen = {}
    with base.precision_context(torch.device("cuda", 1), torch.float32):
        seen["cuda"] = _tf32_flags()[:2]
    with base.precision_context(torch.device("cpu"), torch.float32):
        seen["cpu"] = _tf32_flags()[:2]
    assert seen == {"cuda": (False, False), "cpu": (True, False)}
    assert isinstance(base.precision_context(torch.device("cpu"), torch.bfloat16), torch.autocast)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backend_casts_autocast_weights_once_with_identical_outputs(tiny_model, dtype):
    """The torch backend at bf16/fp16 stores its matmul/convolution weights in that dtype (autocast
    would cast them at every call): outputs bit-identical to plain autocast over the fp32 model,
    whose own parameters stay fp32 (eval runs it beside the fp32 reference)."""
    from rpiae.engines.torch_backend import TorchBackend

    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    torch.manual_seed(0)
    x = torch.rand(2, 3, 256, 256)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
        z_ref = tiny_model.encode(x).float()
        img_ref = tiny_model.decode(z_ref).float()
    be = TorchBackend(tiny_model, precision)
    assert torch.equal(be.encode(x), z_ref) and torch.equal(be.decode(z_ref), img_ref)
    assert {p.dtype for p in tiny_model.parameters()} == {torch.float32}
    low = {n for n, p in be.model.named_parameters() if p.dtype == dtype}
    assert low and all(n.endswith(("weight", "bias")) for n in low)
    convs = [m for m in be.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.dtype == dtype for m in convs)  # the patch embedding too
    assert any("norm" in n for n, p in be.model.named_parameters() if p.dtype == torch.float32)  # norms stay fp32
    assert be.describe()["weights"] == sorted({"float32", str(dtype).replace("torch.", "")})
    assert TorchBackend(tiny_model, "fp32").describe()["weights"] == ["float32"]


class Echo(Backend):
    """A backend whose graph returns its input's first channels: records what it ran."""

    name = "echo"

    def __init__(self, native="torch", max_batch=None, log=None):
        super().__init__(get_preset("tiny"), "fp32", max_batch)
        self.native = native
        self.log = log if log is not None else []
        self.out = None

    def _run(self, graph, x):
        self.log.append(("run", graph, int(x.shape[0])))
        shape = self.config.latent_shape if graph == "encode" else self.config.image_shape
        if isinstance(x, torch.Tensor):
            self.out = torch.zeros((x.shape[0], *shape), dtype=torch.float32, device=x.device)
        else:
            self.out = np.zeros((x.shape[0], *shape), dtype=np.float32)
        return self.out


def test_one_output_chunk_is_returned_without_a_copy():
    be = Echo("torch")
    z = be.encode(torch.rand(3, 3, 256, 256))
    assert z.data_ptr() == be.out.data_ptr()
    be = Echo("numpy")
    z = be.encode(np.random.rand(3, 3, 256, 256).astype(np.float32))
    assert np.shares_memory(z, be.out)
    be = Echo("torch", max_batch=2)  # several chunks are joined
    assert be.encode(torch.rand(3, 3, 256, 256)).shape == (3, 64, 16, 16) and be.log == [("run", "encode", 2),
                                                                                          ("run", "encode", 1)]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", ["numpy", "torch", "float16", "float64"])
def test_nan_and_inf_are_refused(kind, bad):
    x = np.random.rand(2, 64, 16, 16).astype(np.float64 if kind == "float64" else np.float32)
    x[1, 3, 4, 5] = bad
    arr = torch.from_numpy(x).half() if kind == "float16" else torch.from_numpy(x) if kind == "torch" else x
    with pytest.raises(InputError, match="latents: contains NaN or Inf"):
        Echo().decode(arr)


class OnDevice(torch.Tensor):  # a CPU tensor that reports a non-CPU device to the check
    @property
    def device(self):
        return torch.device("meta")


@pytest.fixture
def flag_reads(monkeypatch):
    """A log to which every host read of the NaN/Inf flag (a host sync on a GPU) appends."""
    log = []
    real = base._finite_flag

    class Flag:
        def __init__(self, t):
            self.t = t

        def __bool__(self):
            log.append(("read flag",))
            return bool(self.t)

    monkeypatch.setattr(base, "_finite_flag", lambda x: Flag(real(x)))
    return log


def test_device_tensor_flag_is_read_after_the_graphs_are_queued(flag_reads):
    """For tensors on a GPU the NaN/Inf flag stays on the device while the graphs are queued;
    it is read (one sync) after them. Here the CPU plays the device."""
    log = flag_reads
    x = torch.rand(2, 3, 256, 256).as_subclass(OnDevice)
    Echo(log=log).encode(x)
    assert log == [("run", "encode", 2), ("read flag",)]
    log.clear()
    bad = torch.rand(2, 3, 256, 256)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="images: contains NaN"):
        Echo(log=log).encode(bad.as_subclass(OnDevice))
    assert log == [("run", "encode", 2), ("read flag",)]
    log.clear()
    with pytest.raises(InputError):  # host tensors are checked before any work
        Echo(log=log).encode(bad)
    assert log == [("read flag",)]


def test_a_device_tensor_is_checked_once_so_repeated_calls_never_sync(flag_reads):
    """A benchmark times calls on one device tensor: only the first reads the flag (a host
    sync); the same unmodified tensor is not checked again. An in-place write (version counter),
    another graph or another tensor is checked anew, and a NaN written in place is still caught."""
    log = flag_reads
    be = Echo(log=log)
    x = torch.rand(2, 3, 256, 256).as_subclass(OnDevice)
    for _ in range(5):
        be.encode(x)
    assert log.count(("read flag",)) == 1 and log.count(("run", "encode", 2)) == 5
    log.clear()
    be.decode(torch.rand(2, 64, 16, 16).as_subclass(OnDevice))  # another graph, another input: checked
    be.encode(x.clone())  # an equal but new tensor: checked
    assert log.count(("read flag",)) == 2
    log.clear()
    x.mul_(1.0)  # written in place: its version moved on, so it is checked again
    be.encode(x)
    be.encode(x)
    assert log.count(("read flag",)) == 1
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="images: contains NaN"):
        be.encode(x)
    with pytest.raises(InputError, match="images: contains NaN"):  # a failed input is never remembered as good
        be.encode(x)
    log.clear()
    with torch.inference_mode():  # no version counter to trust: checked every time
        y = torch.rand(2, 3, 256, 256).as_subclass(OnDevice)
        be.encode(y)
        be.encode(y)
    assert log.count(("read flag",)) == 2


def test_torch_backend_computes_in_its_device_scope_with_strict_fp32(monkeypatch, tiny_model):
    from rpiae.engines import torch_backend

    seen = []

    @contextlib.contextmanager
    def scope(device):
        seen.append(("scope", str(device)))
        yield

    def context(device, dtype):
        seen.append(("math", str(device), dtype))
        return contextlib.nullcontext()

    monkeypatch.setattr(torch_backend, "device_scope", scope)
    monkeypatch.setattr(torch_backend, "precision_context", context)
    be = torch_backend.TorchBackend(tiny_model, device="cpu")
    be.encode(torch.rand(1, 3, 256, 256))
    assert seen == [("scope", "cpu"), ("math", "cpu", torch.float32)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "trt"])
def test_torch_backend_refuses_cuda_without_a_gpu(tiny_model, device):
    from rpiae.engines.torch_backend import TorchBackend

    with pytest.raises(BackendUnavailable, match="torch.cuda.is_available"):
        TorchBackend(tiny_model, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_verify_on_the_ort_tensorrt_provider_builds_its_reference_on_cuda(bundle_all):
    """`rpiae verify --device trt`: the PyTorch reference asks for CUDA (not torch.device('trt'))."""
    from click.testing import CliRunner

    from rpiae.cli.main import main

    r = CliRunner().invoke(main, ["verify", "-m", str(bundle_all.root), "--device", "trt", "--batch", "1"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "torch.cuda.is_available() is False" in r.output and "device type" not in r.output
