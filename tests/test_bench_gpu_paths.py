"""The benchmark's GPU code paths on the CPU, with a recording stand-in for torch.cuda:
every CUDA call names the run's GPU (cuda:1 measures GPU 1), a row re-measures only its own
peak dtype, the parent never initialises CUDA, the ONNX Runtime profile uses the run's
providers. No timing is asserted."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from rpiae.bench import peak as P
from rpiae.bench import row as RW
from rpiae.bench import runner as R
from rpiae.config import get_preset


class FakeCuda:
    """torch.cuda's calls the benchmark makes, recording the device each one concerns."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple] = []
        self.current = 0
        rec, me = self.calls, self

        class Stream:
            def __init__(self, device):
                self.device = device

        class Event:
            def __init__(self, enable_timing=False):
                pass

            def record(self, stream):
                rec.append(("event.record", stream.device))

            def synchronize(self):
                pass

            def elapsed_time(self, other):
                return 1.0

        @contextlib.contextmanager
        def device(d):
            old, me.current = me.current, torch.device(d).index
            try:
                yield
            finally:
                me.current = old

        def index(d):
            return me.current if d is None else torch.device(d).index

        for name, fn in {
            "is_available": lambda: True,
            "device": device,
            "empty_cache": lambda: rec.append(("empty_cache", me.current)),
            "reset_peak_memory_stats": lambda d=None: rec.append(("reset_peak_memory_stats", index(d))),
            "mem_get_info": lambda d=None: (rec.append(("mem_get_info", index(d))), (1 << 30, 2 << 30))[1],
            "max_memory_allocated": lambda d=None: (rec.append(("max_memory_allocated", index(d))), 0)[1],
            "synchronize": lambda d=None: rec.append(("synchronize", index(d))),
            "current_stream": lambda d=None: (rec.append(("current_stream", index(d))), Stream(index(d)))[1],
            "Event": Event,
        }.items():
            monkeypatch.setattr(torch.cuda, name, fn)


class EchoBackend:
    """Stands in for an opened backend: zeros of the graph's output shape."""

    def __init__(self):
        self.config = get_preset("tiny")

    def encode(self, x):
        return np.zeros((len(x), *self.config.latent_shape), np.float32) if isinstance(x, np.ndarray) else x[:, :1]

    decode = encode

    def graph_call(self, graph):
        return self.encode if graph == "encode" else self.decode

    def describe(self):
        return {"backend": "echo"}

    def close(self):
        pass


def _settings(model, **over):
    s = R.BenchSettings(model=str(model), device="cuda:1", threads=1, isolate=False, warmup=1, warmup_time=0.0,
                        min_iters=2, min_time=0.0, max_iters=3, max_time=5.0, row_peak_time=0.0)
    return {**vars(s), **over}


def test_a_row_on_cuda_1_measures_gpu_1(monkeypatch, tiny_ckpt):
    cuda = FakeCuda(monkeypatch)
    monkeypatch.setattr(RW, "_open_backend", lambda *a, **k: EchoBackend())
    monkeypatch.setattr(RW, "_device_input", lambda x, dev: torch.from_numpy(x))  # the CPU stands in for the GPU
    spec = {"graph": "encode", "backend": "torch", "precision": "fp32", "batch": 2, "reference": False}
    row = R.measure_row(spec, _settings(tiny_ckpt))
    assert row["status"] == "ok", row.get("reason", row)
    assert "compute" in row and row["cuda_total_bytes"] == 2 << 30
    names = {c[0] for c in cuda.calls}
    assert {"empty_cache", "reset_peak_memory_stats", "mem_get_info", "max_memory_allocated", "synchronize",
            "current_stream", "event.record"} <= names, names
    assert all(c[1] == 1 for c in cuda.calls), [c for c in cuda.calls if c[1] != 1]


def test_a_row_remeasures_only_its_own_peak(monkeypatch, tiny_ckpt):
    FakeCuda(monkeypatch)
    asked = []

    def fake_cuda_peaks(device, n=8192, min_time=1.0, dtypes=None):
        asked.append((device, tuple(dtypes) if dtypes else None))
        return {d: {"gflops": 100.0} for d in (dtypes or P.CUDA_DTYPES)}

    monkeypatch.setattr(P, "cuda_peaks", fake_cuda_peaks)
    monkeypatch.setattr(RW, "_open_backend", lambda *a, **k: EchoBackend())
    monkeypatch.setattr(RW, "_device_input", lambda x, dev: torch.from_numpy(x))
    for precision, dtype in (("fp16", "fp16"), ("bf16", "bf16"), ("int8", "int8"), ("fp32", "fp32")):
        spec = {"graph": "decode", "backend": "ort", "precision": precision, "batch": 1, "reference": False}
        row = R.measure_row(spec, _settings(tiny_ckpt, row_peak_time=0.1))
        assert row["local_peak"] == {"dtype": dtype, "gflops": 100.0}
        assert asked[-1] == ("cuda:1", (dtype,))


def test_the_parent_of_a_gpu_run_never_initialises_cuda(monkeypatch, tiny_ckpt):
    """Machine facts and the before/after peaks come from child processes; here the child is a
    recording stand-in, and the parent's own facts/peaks functions must not be called."""
    from rpiae.bench import machine

    def forbidden(*a, **k):
        raise AssertionError("the parent process measured on the GPU")

    monkeypatch.setattr(machine, "machine_facts", forbidden)
    monkeypatch.setattr(P, "measure_peaks", forbidden)
    children = []

    def fake_child(fn, *args, what="a child process"):
        children.append(fn.__name__)
        if fn is R.machine_and_peaks:
            return ({"cpu": {"model": "x"}, "gpu": {"name": "NVIDIA H100"}} if args[-1] else None,
                    {"fp32": {"gflops": 10.0}, "bf16": {"gflops": 20.0}})
        return {"status": "skipped", "reason": "no GPU here"}

    import rpiae.isolation

    monkeypatch.setattr(rpiae.isolation, "run_in_child", fake_child)
    settings = R.BenchSettings(model=tiny_ckpt, backends=["torch"], precisions=["fp32"], batches=[1], graphs=["encode"],
                               device="cuda", threads=1, isolate=True)
    result = R.run_benchmark(settings)
    assert children.count("machine_and_peaks") == 2 and children.count("measure_row") >= 1
    assert result["machine"]["gpu"]["name"] == "NVIDIA H100" and result["peaks"]["used"] == {"fp32": 10.0, "bf16": 20.0}


def test_ort_profile_uses_the_runs_device_and_providers(monkeypatch, bundle_all):
    opened = []
    real = RW._open_backend

    def record(model, backend, precision, device, threads, graph, **kwargs):
        opened.append((backend, device, graph, sorted(kwargs)))
        return real(model, backend, precision, "cpu", threads, graph, **kwargs)  # the CPU stands in for the GPU

    monkeypatch.setattr(RW, "_open_backend", record)
    spec = {"graph": "encode", "backend": "ort", "precision": "fp32", "batch": 1}
    out = R.profile_graph(spec, {"threads": 1, "device": "cuda:1", "model": str(bundle_all.root)})
    assert out["status"] == "ok", out
    assert opened == [("ort", "cuda:1", "encode", ["op_profiling"])]
    assert "CPUExecutionProvider" in out["tool"] and out["ops"] and abs(sum(o["share"] for o in out["ops"]) - 1) < 0.5


@pytest.mark.parametrize("device,cuda", [("cpu", False), ("cuda", True), ("cuda:3", True), ("trt:1", True)])
def test_gpu_devices_and_peak_dtypes(device, cuda):
    assert P.on_cuda(device) is cuda
    peaks = {"fp32": {"gflops": 1.0}, "fp16": {"gflops": 2.0}, "int8": {"error": "no kernel"}}
    assert P.peak_key(device, "fp16", peaks) == "fp16" and P.peak_key(device, "bf16", peaks) == "fp32"  # its own, else fp32
    assert P.peak_key(device, "int8", peaks) == "fp32" and P.peak_key(device, "fp32", {}) is None
