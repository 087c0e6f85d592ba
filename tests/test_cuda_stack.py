"""One CUDA major per GPU stack: the CUDA major of a package from its name, version, requirement
or linked libraries; the findings `rpiae doctor --strict` fails on; and the check of the
constraints files against the pinned packages' published metadata (offline with a recorded
index, and for real where PyPI can be reached)."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from rpiae import cuda_stack as S

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,version,major", [
    ("nvidia-cudnn-cu12", "9.10.2.21", 12), ("tensorrt-cu13-libs", "11.0.0.114", 13), ("torch", "2.13.0+cu126", 12),
    ("torch", "2.13.0", None), ("cuda-toolkit", "13.0.3", 13), ("nvidia-cuda-runtime", "13.0.96", 13),
    ("nvidia-cufft", "12.0.0.61", None),  # cuFFT's own version, not CUDA's
    ("cupy-cuda12x", "13.6.0", 12), ("onnxruntime-gpu", "1.26.0", None),
])
def test_major_from_name_and_version(name, version, major):
    assert S.major_from_name(name, version) == major


@pytest.mark.parametrize("text,major", [
    ("nvidia-cuda-runtime~=13.0", 13), ("nvidia-cuda-runtime-cu12~=12.0", 12), ("cuda-bindings<14,>=13.0.3", 13),
    ("nvidia-cublas==13.1.1.3.*", 13), ("tensorrt-cu13<11.1.0,>=11.0.0", 13), ("nvidia-cufft~=12.0", None),
    ("tensorrt<11.1.0,>=11.0.0", None),
])
def test_major_from_requirement(text, major):
    assert S.major_from_requirement(Requirement(text)) == major


def test_cuda_bearing():
    assert all(S.cuda_bearing(n) for n in ("nvidia-cudnn-cu13", "cuda-toolkit", "tensorrt", "onnxruntime-gpu", "torch"))
    assert not any(S.cuda_bearing(n) for n in ("nvidia-modelopt", "nvidia-ml-py", "onnxruntime", "numpy"))


def _shared_object(tmp_path: Path, libs: str) -> Path:
    src = tmp_path / "a.c"
    src.write_text("double f(double x) { return x; }\n")
    out = tmp_path / "liba.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(out), str(src), *libs.split()], check=True)
    return out


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to make a shared object with")
def test_elf_needed_reads_the_dynamic_section(tmp_path):
    so = _shared_object(tmp_path, "-Wl,--no-as-needed -lm")
    needed = S.elf_needed(so)
    assert "libm.so.6" in needed and "libc.so.6" in needed
    assert S.elf_needed(so.read_bytes()) == needed  # from bytes (a wheel member) the same
    if shutil.which("readelf"):  # the same list binutils reads, in the same order
        text = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True).stdout
        assert needed == [line.split("[", 1)[1].rstrip("]") for line in text.splitlines() if "(NEEDED)" in line]
    assert S.needed_major(["libcudart.so.13", "libnvinfer.so.10"], "libnvinfer") == 10
    assert S.needed_major(["libnvinfer_plugin.so.10"], "libnvinfer") is None
    with pytest.raises(ValueError, match="not a 64-bit"):
        S.elf_needed(b"#!/bin/sh\n" + bytes(100))


def test_findings_name_each_mismatch_with_its_fix():
    same = {"torch": {"major": 13}, "cudnn": {"major": 13}, "onnxruntime": {"major": 13},
            "tensorrt": {"major": 13, "version": "11.0.0.114"}}
    assert S.stack_findings(same, driver_cuda="13.0") == []
    mixed = {**same, "onnxruntime": {"major": 12}}
    (f,) = S.stack_findings(mixed)
    assert "CUDA majors differ" in f.what and "onnxruntime CUDA 12" in f.what and "torch CUDA 13" in f.what
    assert "constraints/gpu-cu13.txt" in f.fix and "pip uninstall -y onnxruntime-gpu" in f.fix  # torch's major decides
    cu12 = {"torch": {"major": 12}, "tensorrt": {"major": 13, "version": "11.0.0.114"}}
    assert "--extra-index-url https://download.pytorch.org/whl/cu126" in S.stack_findings(cu12)[0].fix
    provider = {**same, "ort_trt_provider": {"major": 10}}
    (f,) = S.stack_findings(provider)
    assert "links libnvinfer.so.10 but TensorRT 11.0.0.114" in f.what and "--backend trt" in f.fix
    (f,) = S.stack_findings(same, driver_cuda="12.4")
    assert "driver supports CUDA 12.4" in f.what and ">= 580" in f.fix
    two = {**same, "cudnn": {"major": None, "conflict": ["nvidia-cudnn-cu12", "nvidia-cudnn-cu13"]}}
    assert any("two cuDNN builds" in f.what for f in S.stack_findings(two))


def test_environment_majors_here_reads_installed_packages():
    majors = S.environment_majors()
    # this CPU machine: the CPU onnxruntime (no GPU providers library to read), no TensorRT wheel
    assert "onnxruntime" not in majors and "tensorrt" not in majors
    assert S.environment_majors("12.6")["torch"] == {"major": 12, "from": "torch.version.cuda = 12.6"}


# -- the constraints files --------------------------------------------------------------------------
def _index(packages: dict[tuple[str, str], list[str]], libraries=None):
    """A stand-in for fetch_published: {(name, version): Requires-Dist lines}."""
    def fetch(name, version, libs=()):
        if (name, version) not in packages:
            raise LookupError(f"{name}=={version}: not on the index")
        return S.Published(name, version, f"{name}-{version}.whl", packages[(name, version)],
                           (libraries or {}).get(name, {}))
    return fetch


def test_check_stack_finds_mixed_majors_and_unpinned_cuda_packages(tmp_path):
    f = tmp_path / "gpu-cu13.txt"
    f.write_text("# a comment\ntorch==2.13.0\nnvidia-cudnn-cu13==9.20.0.48\nonnxruntime-gpu==1.26.0\n")
    fetch = _index({
        ("torch", "2.13.0"): ["nvidia-cudnn-cu13==9.20.0.48; platform_system == \"Linux\"",
                              "nvidia-nccl-cu13==2.29.7; platform_system == \"Linux\"", "filelock",
                              "nvidia-cudnn-cu12==9.1; platform_system == \"Windows\""],  # not for Linux: ignored
        ("nvidia-cudnn-cu13", "9.20.0.48"): [],
        ("onnxruntime-gpu", "1.26.0"): ["numpy", "nvidia-cuda-runtime-cu12~=12.0; extra == \"cuda\""],  # extra not asked
    }, {"onnxruntime-gpu": {"libonnxruntime_providers_tensorrt.so": ["libcudart.so.12", "libnvinfer.so.10"]}})
    r = S.check_stack(f, 13, fetch=fetch)
    assert not r.ok
    assert "torch==2.13.0 requires nvidia-nccl-cu13==2.29.7, which gpu-cu13.txt does not pin" in r.problems
    assert "onnxruntime-gpu==1.26.0: libonnxruntime_providers_tensorrt.so links libcudart.so.12" in r.problems
    assert not any("cudnn-cu12" in p or "nvidia-cuda-runtime-cu12" in p for p in r.problems)
    # pinned, at the version asked for, one major: passes
    f.write_text("torch==2.13.0\nnvidia-cudnn-cu13==9.20.0.48\nnvidia-nccl-cu13==2.29.7\n")
    fetch = _index({("torch", "2.13.0"): ["nvidia-cudnn-cu13==9.20.0.48", "nvidia-nccl-cu13==2.29.7"],
                    ("nvidia-cudnn-cu13", "9.20.0.48"): [], ("nvidia-nccl-cu13", "2.29.7"): []})
    r = S.check_stack(f, 13, fetch=fetch)
    assert r.ok and len(r.checked) == 3, S.render_stack(r)
    # a pin the requirement does not admit, and a package of the other major
    f.write_text("torch==2.13.0\nnvidia-cudnn-cu13==9.19.0.1\nnvidia-nccl-cu13==2.29.7\nnvidia-cublas-cu12==12.6.4.1\n")
    fetch = _index({("torch", "2.13.0"): ["nvidia-cudnn-cu13==9.20.0.48", "nvidia-nccl-cu13==2.29.7"],
                    ("nvidia-cudnn-cu13", "9.19.0.1"): [], ("nvidia-nccl-cu13", "2.29.7"): [],
                    ("nvidia-cublas-cu12", "12.6.4.1"): []})
    r = S.check_stack(f, 13, fetch=fetch)
    assert "torch==2.13.0 requires nvidia-cudnn-cu13==9.20.0.48; gpu-cu13.txt pins 9.19.0.1" in r.problems
    assert "nvidia-cublas-cu12==12.6.4.1 is a CUDA 12 package" in r.problems


def test_extras_asked_by_a_requirer_are_followed(tmp_path):
    f = tmp_path / "gpu-cu13.txt"
    f.write_text("torch==2.13.0\ncuda-toolkit==13.0.3\nnvidia-cublas==13.1.1.3\n")
    fetch = _index({("torch", "2.13.0"): ["cuda-toolkit[cublas]==13.0.3"],
                    ("cuda-toolkit", "13.0.3"): ["nvidia-cublas==13.1.1.3.*; extra == \"cublas\"",
                                                 "nvidia-cufft==12.0.0.61.*; extra == \"cufft\""],
                    ("nvidia-cublas", "13.1.1.3"): []})
    r = S.check_stack(f, 13, fetch=fetch)
    assert r.ok, S.render_stack(r)  # cufft is not asked for, so it need not be pinned


def test_local_label_pins_are_judged_by_their_label(tmp_path):
    f = tmp_path / "gpu-cu12.txt"
    f.write_text("torch==2.13.0+cu126\n")
    r = S.check_stack(f, 12, fetch=_index({}))
    assert r.ok and "torch==2.13.0+cu126" in r.skipped[0]
    assert not S.check_stack(f, 13, fetch=_index({})).ok


def test_constraints_files_pin_exact_versions(tmp_path):
    for major, stack in S.STACKS.items():
        pins = S.read_constraints(REPO / stack["file"])
        assert {"torch", "onnxruntime-gpu"} <= set(pins) and any(n.startswith("tensorrt-cu") for n in pins)
        assert all(S.major_from_name(n, v) in (None, major) for n, v in pins.items()), pins
    bad = tmp_path / "gpu-cu12.txt"
    bad.write_text("onnxruntime-gpu>=1.20\n")
    with pytest.raises(ValueError, match="is not a `name==version` pin"):
        S.read_constraints(bad)


def _pypi_reachable() -> str | None:
    try:
        req = urllib.request.Request(f"{S.PYPI}/cuda-toolkit/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(req, timeout=15):
            return None
    except Exception as e:  # noqa: BLE001 - any failure means: no index here
        return f"the package index is not reachable ({type(e).__name__}: {e})"


@pytest.mark.parametrize("major", sorted(S.STACKS))
def test_published_metadata_of_each_stack_has_one_cuda_major(major):
    """The real check, on the repository's constraints files, against PyPI's published
    metadata (a few kB of each wheel by range requests); skipped where PyPI is unreachable."""
    reason = _pypi_reachable()
    if reason:
        pytest.skip(reason)
    r = S.check_stack(REPO / S.STACKS[major]["file"], major)
    assert r.ok, S.render_stack(r)
    assert any(c.startswith("onnxruntime-gpu==") for c in r.checked)
    # ONNX Runtime's TensorRT provider links TensorRT 10: said for the CUDA 13 stack (TensorRT 11)
    note = next(n for n in r.notes if "libnvinfer.so." in n)
    assert f"libcudart.so.{major}" in note
    assert ("cannot start here" in note) == (major == 13)
