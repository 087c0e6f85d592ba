"""AOTInductor's CUDA target on a machine whose GPU has no CUDA toolkit: refused before any
export, and `--device auto` compiles for the CPU instead (environment cleared, GPU faked)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from rpiae.cli.main import main as cli
from rpiae.engines.base import BackendUnavailable
from rpiae.export import aoti


@pytest.fixture
def gpu_without_toolkit(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(aoti, "cuda_target", lambda index=None: {"capability": "9.0", "sm": "sm90", "gpu": "NVIDIA H100",
                                                                   "cuda": "12.8"})
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no nvcc
    monkeypatch.setattr(aoti, "DEFAULT_CUDA_HOME", str(tmp_path / "no-cuda"))
    return tmp_path


def test_cuda_target_needs_the_toolkit(gpu_without_toolkit):
    with pytest.raises(BackendUnavailable, match="CUDA toolkit .*CUDA_HOME is not set, nvcc is not on PATH"):
        aoti.check_target("cuda")
    device, note = aoti.auto_device()
    assert device == "cpu" and "needs the CUDA toolkit" in note


def test_a_toolkit_without_headers_does_not_count(gpu_without_toolkit, monkeypatch):
    root = gpu_without_toolkit / "cuda"
    root.mkdir()
    monkeypatch.setenv("CUDA_HOME", str(root))
    with pytest.raises(BackendUnavailable, match="include/cuda_runtime.h does not exist"):
        aoti.check_target("cuda")
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    assert aoti.check_target("cuda")["device"] == "cuda" and aoti.auto_device() == ("cuda", None)
    monkeypatch.delenv("CUDA_HOME")
    nvcc = gpu_without_toolkit / "bin" / "nvcc"  # nvcc on PATH: its toolkit is two levels up
    (root / "bin").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "bin" / "nvcc").chmod(0o755)
    nvcc.symlink_to(root / "bin" / "nvcc")
    assert aoti.cuda_toolkit()[0] == root


def test_export_refuses_before_the_onnx_step(gpu_without_toolkit, tmp_path):
    out = tmp_path / "bundle"
    r = CliRunner().invoke(cli, ["export", "--target", "aoti", "--device", "cuda", "--out", str(out)])
    assert r.exit_code == 1 and "Traceback" not in r.output and "CUDA toolkit" in r.output, r.output
    assert not out.exists()
