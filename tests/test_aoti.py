"""AOTInductor packages: manifest, fixed CPU level, parity, run-time input checks, refusal,
cache directory, CLI. The tiny bundle is compiled once per session (conftest's `aoti_export`)."""

from __future__ import annotations

import os
import time
import zipfile

import numpy as np
import pytest
import torch

from rpiae.engines import aoti_backend, load_backend
from rpiae.engines.aoti_backend import AOTIBackend
from rpiae.engines.base import BackendUnavailable, InputError
from rpiae.export import aoti
from rpiae.export.profile import BatchProfile


@pytest.fixture(scope="module")
def packaged(aoti_export):
    return aoti_export.bundle, aoti_export.cache


@pytest.fixture(scope="module")
def backend(packaged):
    bundle, cache = packaged
    be = AOTIBackend(bundle, device="cpu", cache_dir=str(cache))
    yield be
    be.close()


def test_manifest_records_packages(packaged):
    bundle, _ = packaged
    entries = {e["graph"]: (n, e) for n, e in bundle.files.items() if e.get("kind") == "aoti-package"}
    assert set(entries) == {"encode", "decode"}
    for graph, (name, e) in entries.items():
        assert name == f"engines/aoti/{graph}.fp32.cpu-x86-64-v3.pt2"
        assert (bundle.root / name).is_file()
        assert e["device"] == "cpu" and e["cpu_level"] == "x86-64-v3" and e["isa"] == "avx2"
        assert {"avx2", "fma", "f16c", "bmi2"} <= set(e["cpu_flags"])
        assert e["torch"] == torch.__version__.split("+")[0]
        assert e["batch"] == {"min": 1, "opt": 2, "max": 8} and e["precision"] == "fp32"
    assert sorted(bundle.manifest.engines) == sorted(n for n, _ in entries.values())
    assert bundle.precisions("aoti-package") == ["fp32"]
    rows = [r for r in bundle.manifest.parity if r.get("backend") == "aoti"]
    assert rows and all(r["ok"] for r in rows)


def test_fixed_cpu_level_not_native(packaged):
    """The compiled libraries carry the fixed -march and never -march=native."""
    bundle, _ = packaged
    for name, e in bundle.files.items():
        if e.get("kind") != "aoti-package":
            continue
        with zipfile.ZipFile(bundle.root / name) as z:
            blobs = [z.read(i) for i in z.namelist() if i.endswith((".so", ".json", ".cpp"))]
        assert any(b"march=x86-64-v3" in b for b in blobs), name
        assert not any(b"march=native" in b for b in blobs), name


def test_package_metadata_for_cpp(backend):
    meta = backend.runner("encode").get_metadata()
    assert meta["rpiae_graph"] == "encode" and meta["rpiae_device"] == "cpu"
    assert (meta["rpiae_batch_min"], meta["rpiae_batch_max"]) == ("1", "8")
    assert meta["rpiae_cpu_level"] == "x86-64-v3" and "avx2" in meta["rpiae_cpu_flags"].split()
    assert meta["AOTI_CPU_ISA"] == "AVX2"  # Inductor's vector ISA for x86-64-v3 (simdlen 256), recorded by torch


def test_export_command_output(aoti_export):
    out = aoti_export.output
    listed = next(line for line in out.splitlines() if "; engines: " in line).split("; engines: ")[1].split(", ")
    assert sorted(listed) == [f"engines/aoti/{g}.fp32.cpu-x86-64-v3.pt2" for g in ("decode", "encode")]
    assert any(line.startswith("aoti") and line.rstrip().endswith("yes") for line in out.splitlines())


def test_verify_command_parity_at_onnx_fp32_tolerances(packaged, tmp_path):
    """`rpiae verify --backend aoti`: AOTI against eager PyTorch, batch 1 and 3."""
    import json

    from click.testing import CliRunner

    from rpiae.cli.main import main

    bundle, cache = packaged
    report = tmp_path / "verify.json"
    res = CliRunner().invoke(main, ["verify", "--model", str(bundle.root), "--backend", "aoti", "--batch", "1,3",
                                    "--json", str(report)], env={"RPIAE_CACHE_DIR": str(cache)})
    assert res.exit_code == 0, res.output
    assert "all checks passed" in res.output
    rows = json.loads(report.read_text())["results"]
    assert [r["metrics"]["batch"] for r in rows] == [1, 3]
    for row in rows:
        assert row["backend"] == "aoti" and row["ok"]
        assert row["metrics"]["latent_max_abs_rel"] <= 1e-4
        assert row["metrics"]["latent_cosine_min"] >= 0.99999
        assert row["metrics"]["decoded_psnr_db"] >= 60


def test_batches_split_and_padded(backend, photos):
    ref = backend.encode(photos[:1])
    assert ref.shape == (1, 64, 16, 16)
    np.testing.assert_array_equal(backend.encode(photos[0][None]), ref)  # numpy's x[None]: batch stride 0
    z = backend.encode(np.concatenate([photos, photos[:2]]))  # 10 > max 8: split by the base class
    assert z.shape == (10, 64, 16, 16)
    np.testing.assert_allclose(z[:1], ref, atol=1e-5)
    y = backend.decode(torch.from_numpy(z[:3]))
    assert isinstance(y, torch.Tensor) and y.shape == (3, 3, 256, 256)


def test_run_time_input_checks(backend, photos):
    x9 = torch.from_numpy(np.concatenate([photos, photos[:1]]))
    with pytest.raises(InputError, match="exceeds the package's maximum 8"):
        backend._run("encode", x9)
    with pytest.raises(InputError, match=r"expected shape \(N, 3, 256, 256\)"):
        backend.encode(photos[:, :, :255])
    # the compiled package itself refuses what it was not compiled for (checks are on)
    runner = backend.runner("encode")
    with pytest.raises(RuntimeError, match="too large"):
        runner(x9)
    with pytest.raises(RuntimeError, match="unmatched dim value"):
        runner(torch.from_numpy(photos[:2, :, :255].copy()))
    with pytest.raises(RuntimeError, match="unmatched dtype"):
        runner(torch.from_numpy(photos[:2]).double())


def test_refused_on_a_machine_it_cannot_run_on(packaged, monkeypatch):
    bundle, cache = packaged
    monkeypatch.setattr(aoti_backend, "cpu_flags", lambda: {"sse4_2", "avx"})
    with pytest.raises(BackendUnavailable, match="compiled for x86-64-v3; this CPU lacks .*avx2"):
        AOTIBackend(bundle, cache_dir=str(cache))
    monkeypatch.undo()
    _, entry = aoti_backend.find_packages(bundle)["encode"]
    with pytest.raises(BackendUnavailable, match="compiled with torch 2.99.0"):
        aoti_backend.check_runnable({**entry, "torch": "2.99.0"})
    with pytest.raises(BackendUnavailable, match="no fp32 AOTInductor packages for cuda"):
        AOTIBackend(bundle, device="cuda")
    with pytest.raises(BackendUnavailable, match="aoti backend runs fp32, not int8"):
        AOTIBackend(bundle, precision="int8")
    if not torch.cuda.is_available():
        cuda_entry = {**entry, "device": "cuda", "capability": "9.0", "gpu": "NVIDIA H100"}
        with pytest.raises(BackendUnavailable, match="torch.cuda.is_available"):
            aoti_backend.check_runnable(cuda_entry, "cuda")


def test_a_package_that_cannot_load_is_unavailable_not_bad_input(packaged, monkeypatch, tmp_path):
    """A load failure (missing library, corrupt archive) is the backend being unavailable,
    raised when it is opened; the benchmark then lists the row as skipped, not as an error."""
    from rpiae.bench.runner import BenchSettings, measure_row

    bundle, cache = packaged

    def broken(path, device_index=-1, cache_dir=None):
        raise RuntimeError("Error in dlopen: libaoti_custom.so: cannot open shared object file")

    monkeypatch.setattr(aoti_backend, "load_package", broken)
    with pytest.raises(BackendUnavailable, match="cannot load .*libaoti_custom.so"):
        AOTIBackend(bundle, cache_dir=str(cache))
    settings = dict(vars(BenchSettings(model=str(bundle.root), threads=1, isolate=False, row_peak_time=0)))
    spec = {"graph": "encode", "backend": "aoti", "precision": "fp32", "batch": 1, "reference": False}
    row = measure_row(spec, settings)
    assert row["status"] == "skipped" and "libaoti_custom.so" in row["reason"], row


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_target_refused_without_gpu(packaged, monkeypatch):
    bundle, _ = packaged

    def compile_graph(*args, **kwargs):
        raise AssertionError("compiled before the target was checked")

    monkeypatch.setattr(aoti, "compile_graph", compile_graph)  # refused before any compiling
    with pytest.raises(BackendUnavailable, match="--device cuda needs a CUDA GPU"):
        aoti.compile_packages(bundle, device="cuda", profile=BatchProfile(1, 2, 8))
    with pytest.raises(BackendUnavailable, match="--device cuda needs a CUDA GPU"):
        aoti.check_target("cuda")
    assert aoti.check_target("cpu")["cpu_level"] == "x86-64-v3"
    with pytest.raises(ValueError, match="unknown CPU level"):
        aoti.check_target("cpu", cpu_level="native")


def test_tampered_package_is_refused(packaged, tmp_path):
    import shutil

    from rpiae.export import Bundle, BundleError

    bundle, cache = packaged
    copy = tmp_path / "b"
    shutil.copytree(bundle.root, copy)
    name, _ = aoti_backend.find_packages(bundle)["decode"]
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        AOTIBackend(Bundle.open(copy), cache_dir=str(cache))


def test_temp_files_stay_in_cache_dir(backend, packaged):
    _, cache = packaged
    backend.runner("decode")
    assert any((cache / "inductor").iterdir()), "compiler cache not in the chosen directory"
    assert any(p.name.startswith("aotinductor") for p in (cache / "tmp").iterdir()), "package not unpacked there"


def test_cli_encode_with_aoti_backend(packaged, tmp_path):
    from click.testing import CliRunner

    from rpiae.cli.main import main
    from rpiae.imageio import save_image
    from rpiae.samples import sample_photos

    bundle, cache = packaged
    _, photos = sample_photos()
    paths = [save_image(photos[i], tmp_path / f"p{i}.png") for i in range(2)]
    out = tmp_path / "latents.npy"
    res = CliRunner().invoke(main, ["encode", "--model", str(bundle.root), "--backend", "aoti", *map(str, paths), "-o", str(out)],
                             env={"RPIAE_CACHE_DIR": str(cache)})
    assert res.exit_code == 0, res.output
    z = np.load(out)
    with load_backend(bundle.root, "torch") as ref:
        from rpiae.imageio import load_images

        z_ref = ref.encode(load_images(paths))
    assert np.abs(z - z_ref).max() <= 1e-4 * np.abs(z_ref).max()


def test_bench_has_aoti_rows(packaged, tmp_path):
    """`rpiae bench --backends aoti`: measured rows next to the eager PyTorch reference."""
    from click.testing import CliRunner

    from rpiae.bench.runner import load_results
    from rpiae.cli.main import main

    bundle, cache = packaged
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(bundle.root), "--backends", "aoti", "--precision", "fp32", "--batch", "1,2",
            "--graphs", "encode", "--no-isolate", "--warmup", "1", "--warmup-time", "0", "--min-iters", "2",
            "--min-time", "0", "--peak-time", "0.05", "--threads", "1", "--out", str(out)]
    res = CliRunner().invoke(main, args, env={"RPIAE_CACHE_DIR": str(cache)})
    assert res.exit_code == 0, res.output
    rows = [r for r in load_results(out)["rows"] if r["backend"] == "aoti"]
    assert [(r["batch"], r["status"]) for r in rows] == [(1, "ok"), (2, "ok")], [r.get("reason") for r in rows]
    assert all(r["timing"]["p50_ms"] > 0 and r["speedup_vs_torch"]["fp32"] > 0 for r in rows)


def test_batch_one_only_profile(tmp_path, aoti_cache, tiny_model):
    """A fixed batch-1 package (static shapes) still compiles, runs and pads nothing."""
    from rpiae.export.aoti import compile_graph

    out = tmp_path / "decode.pt2"
    cache = aoti_cache
    t = compile_graph(tiny_model, "decode", out, profile=BatchProfile(1, 1, 1), cache_dir=cache)
    assert t["compile_s"] > 0
    runner = aoti_backend.load_package(out, cache_dir=cache)
    z = torch.randn(1, 64, 16, 16)
    with torch.inference_mode():
        ref = tiny_model.decode(z)
    assert torch.allclose(runner(z), ref, atol=1e-4)
    with pytest.raises(RuntimeError):
        runner(torch.randn(2, 64, 16, 16))


@pytest.mark.slow
def test_rpiae_b_encode_compiles(tmp_path, aoti_cache):
    """The paper-size encoder exports and compiles (batch 1..2) and matches eager PyTorch."""
    from rpiae import RPiAE
    from rpiae.export.aoti import compile_graph
    from rpiae.export.graphs import EncodeGraph

    if os.environ.get("RPIAE_SKIP_B_COMPILE"):
        pytest.skip("RPIAE_SKIP_B_COMPILE set")
    torch.manual_seed(0)
    model = RPiAE.from_preset("rpiae-b").eval()
    out = tmp_path / "encode.pt2"
    t = time.perf_counter()
    cache = aoti_cache
    timings = compile_graph(model, "encode", out, profile=BatchProfile(1, 1, 2), cache_dir=cache)
    print(f"rpiae-b encode: export {timings['export_s']} s, compile {timings['compile_s']} s, "
          f"total {time.perf_counter() - t:.1f} s, package {out.stat().st_size / 2**20:.0f} MiB")
    runner = aoti_backend.load_package(out, cache_dir=cache)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = EncodeGraph(model)(x)
    z = runner(x)
    assert (z - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    del runner
    out.unlink()  # 346 MiB: do not leave it in pytest's kept tmp directories
