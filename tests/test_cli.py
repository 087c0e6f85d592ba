"""The `rpiae` CLI as a user drives it: outputs, exit codes, one-line errors, no partial files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from rpiae.assets import DEFAULT_CHECKPOINT
from rpiae.cli.main import main
from rpiae.imageio import save_image


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, sample_photos):
    d = tmp_path_factory.mktemp("photos")
    for i, img in enumerate(sample_photos[:3]):
        save_image(img, d / f"p{i}.png")
    return d


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code, out, needle, expected_code=1):
    assert code == expected_code, out
    assert "Traceback" not in out
    err = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(err) == 1 and needle in err[0], out


@pytest.mark.parametrize("cmd", [[], ["export"], ["encode"], ["decode"], ["verify"], ["info"], ["samples"]])
def test_help(cmd):
    code, out = run(*cmd, "--help")
    assert code == 0 and "Usage:" in out


def test_encode_decode_torch_and_ort(tmp_path, photo_dir, bundle_all, trained_or_tiny_ckpt):
    code, out = run("encode", "-m", trained_or_tiny_ckpt, photo_dir, "-o", tmp_path / "z.npy")
    assert code == 0, out
    z = np.load(tmp_path / "z.npy")
    assert z.shape == (3, 64, 16, 16) and z.dtype == np.float32
    code, out = run("encode", "-m", bundle_all.root, "-b", "ort", "-p", "fp32", photo_dir, "-o", tmp_path / "z_ort.npy")
    assert code == 0, out
    z_ort = np.load(tmp_path / "z_ort.npy")
    assert np.abs(z - z_ort).max() <= 1e-4 * np.abs(z).max()
    code, out = run("decode", "-m", bundle_all.root, "-b", "ort", "-p", "int8", tmp_path / "z.npy", "-o", tmp_path / "out")
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".rpiae-decode.json", "000000.png", "000001.png",
                                                                      "000002.png"]  # the PNGs and what made them


def test_verify_and_info(tmp_path, bundle_all, trained_or_tiny_ckpt, photo_dir):
    code, out = run("verify", "-m", bundle_all.root, "--batch", "1,3", "--images", photo_dir, "--json", tmp_path / "r.json")
    assert code == 0 and "all checks passed" in out, out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and len(report["results"]) == 6
    code, out = run("info", bundle_all.root, "--verify-hashes")
    info = json.loads(out)
    assert code == 0 and info["precisions"] == ["fp32", "fp16", "int8"] and info["hashes_verified"]
    code, out = run("info", trained_or_tiny_ckpt)
    assert code == 0 and json.loads(out)["config"]["name"] == "tiny"


def test_bad_images_write_nothing(tmp_path, photo_dir, trained_or_tiny_ckpt):
    out = tmp_path / "z.npy"
    code, text = run("encode", "-m", trained_or_tiny_ckpt, tmp_path / "missing.png", "-o", out)
    assert_one_line_error(code, text, "missing.png: no such image file")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, text = run("encode", "-m", trained_or_tiny_ckpt, photo_dir / "p0.png", tmp_path / "bad.png", "-o", out)
    assert_one_line_error(code, text, "bad.png")
    data = (photo_dir / "p1.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 3])
    code, text = run("encode", "-m", trained_or_tiny_ckpt, photo_dir / "p0.png", tmp_path / "trunc.png", "-o", out)
    assert_one_line_error(code, text, "trunc.png")
    assert not out.exists() and not list(tmp_path.glob(".z.npy*"))


@pytest.mark.parametrize(
    "latents, needle",
    [
        (np.zeros((2, 64, 8, 8), np.float32), "expected shape (N, 64, 16, 16)"),
        (np.zeros((2, 64, 16, 16), np.int32), "floating-point"),
        (np.full((1, 64, 16, 16), np.nan, np.float32), "NaN or Inf"),
        (np.full((1, 64, 16, 16), np.inf, np.float32), "NaN or Inf"),
    ],
)
def test_bad_latents_write_nothing(tmp_path, bundle_all, latents, needle):
    np.save(tmp_path / "z.npy", latents)
    code, text = run("decode", "-m", bundle_all.root, "-b", "ort", tmp_path / "z.npy", "-o", tmp_path / "out")
    assert_one_line_error(code, text, needle)
    assert not (tmp_path / "out").exists()


def test_corrupt_latent_file(tmp_path, bundle_all):
    (tmp_path / "z.npy").write_bytes(b"nope")
    code, text = run("decode", "-m", bundle_all.root, tmp_path / "z.npy", "-o", tmp_path / "out")
    assert_one_line_error(code, text, "not a readable .npy array")


def test_unknown_backend_precision_and_missing_variant(tmp_path, bundle_all, photo_dir, trained_or_tiny_ckpt):
    code, text = run("encode", "-m", bundle_all.root, "-b", "tflite", photo_dir, "-o", tmp_path / "z.npy")
    assert code == 2 and "Invalid value for '--backend'" in text
    code, text = run("export", "-c", trained_or_tiny_ckpt, "-p", "fp8", "-o", tmp_path / "b")
    assert_one_line_error(code, text, "unknown precision fp8", expected_code=2)  # a usage error
    assert "'--precision'" in text
    code, text = run("encode", "-m", trained_or_tiny_ckpt, "-b", "ort", photo_dir, "-o", tmp_path / "z.npy")
    assert_one_line_error(code, text, "run `rpiae export")
    code, text = run("export", "-c", trained_or_tiny_ckpt, "-p", "int8", "-o", tmp_path / "b")
    assert_one_line_error(code, text, "--calib")
    assert not (tmp_path / "b").exists()


def test_errors_in_a_real_process_are_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rpiae.cli", "info", str(tmp_path / "nothing")], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"Error: {tmp_path / 'nothing'}: not a bundle directory or checkpoint file"]


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="the shipped checkpoint is not in this checkout yet")
def test_default_model_is_the_shipped_checkpoint(tmp_path, photo_dir):
    code, out = run("encode", photo_dir / "p0.png", "-o", tmp_path / "z.npy")
    assert code == 0, out
    assert np.load(tmp_path / "z.npy").shape == (1, 64, 16, 16)


def test_export_int8_without_the_memory_is_one_line_and_leaves_nothing(tmp_path, photo_dir, monkeypatch):
    """ModelOpt's INT8 pass needs ~10x the graph in RAM: without it, a one-line error before the
    pass starts (not an OOM kill minutes later), exit 1, and no bundle."""
    import psutil

    class Mem:
        available = 1 << 20

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Mem)
    code, out = run("export", "--precision", "int8", "--calib", photo_dir, "--out", tmp_path / "b")
    assert_one_line_error(code, out, "INT8 quantisation of encode.fp32.onnx needs about")
    assert "GB are available" in out and "RPIAE_INT8_MEMORY_CHECK=0" in out
    assert list(tmp_path.iterdir()) == []
