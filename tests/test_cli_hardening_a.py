"""Commands on inputs an audit found mishandled: encode on a full disk and after a killed run,
push's model card and eval report, train on a missing device, out-of-range model configs,
triton's --prefix and --python-env, files that are not checkpoints, and misleading hints."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rpiae.imageio import save_image


def cli(*args):
    from rpiae.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r, *parts: str, code: int = 1) -> None:
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    assert any(ln.startswith("Error") for ln in lines), r.output
    for p in parts:
        assert p in r.output, r.output


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, sample_photos):
    root = tmp_path_factory.mktemp("hardening_a") / "photos"
    for i, img in enumerate(sample_photos[:2]):
        save_image(img, root / f"p{i}.png")
    return root


# -- 1. encode: a full disk is one line, and a killed encode's temp is cleared ----------------------


def test_encode_on_a_full_disk_is_one_line_and_leaves_no_temp(photo_dir, tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    out = tmp_path / "e.npy"
    r = cli("encode", photo_dir, "-o", out, "--workers", "0")
    one_line_error(r, f"cannot write {out}", "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_encode_removes_the_temp_a_killed_encode_left(photo_dir, tmp_path):
    out = tmp_path / "enc.npy"
    stale = tmp_path / ".enc.npy.abcd1234.tmp"
    stale.write_bytes(b"\0" * 1024)
    other = tmp_path / ".other.npy.abcd1234.tmp"
    other.write_bytes(b"\0")
    old = os.stat(stale).st_mtime - 3600
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    r = cli("encode", photo_dir, "-o", out, "--workers", "0")
    assert r.exit_code == 0, r.output
    assert not stale.exists() and other.exists()
    assert np.load(out).shape[0] == 2


# -- 2. push: a bundle's manifest, eval reports that are not, an unreachable Hub --------------------


def _eval_report(**extra):
    return {"format": "rpiae-eval", "version": 1, "data": {"kind": "folder", "root": "photos", "evaluated": 2},
            "rows": [{"backend": "torch", "precision": "fp32", "n": 2, "psnr": 20.5, "ssim": 0.5, "lpips": None,
                      "rfid": None}], **extra}


def test_push_dry_run_with_a_bundle_writes_its_parity_into_the_card(bundle_all, tiny_ckpt, tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps(_eval_report()))
    r = cli("push", "me/tiny", "--model", tiny_ckpt, "--dry-run", "--out", tmp_path / "p", "--bundle", bundle_all.root,
            "--eval", tmp_path / "eval.json")
    assert r.exit_code == 0, r.output
    card = (tmp_path / "p" / "README.md").read_text()
    assert "parity with PyTorch" in card and "| torch | fp32 | 2 | 20.5 | 0.5 |" in card and "photos (2 images)" in card
    r = cli("push", "me/tiny", "--model", bundle_all.root, "--dry-run", "--out", tmp_path / "p2")  # the bundle as --model
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("content, says", [
    ("[1, 2]", "a JSON list, not an object"),
    ('{"format": "rpiae-bench", "results": []}', "format 'rpiae-bench', expected 'rpiae-eval'"),
    ("{not json", "not JSON"),
    ('{"format": "rpiae-eval", "rows": {}}', '"rows" is not a list'),
])
def test_push_refuses_what_is_not_an_eval_report(tiny_ckpt, tmp_path, content, says):
    (tmp_path / "r.json").write_text(content)
    r = cli("push", "me/tiny", "--model", tiny_ckpt, "--dry-run", "--out", tmp_path / "p", "--eval", tmp_path / "r.json")
    one_line_error(r, "r.json: ", says)
    assert not (tmp_path / "p").exists()


def test_push_without_network_is_one_line(tiny_ckpt, tmp_path, monkeypatch):
    import huggingface_hub

    ConnectError = type("ConnectError", (Exception,), {"__module__": "httpx"})  # noqa: N806 - httpx's, without httpx

    class OfflineApi:
        def create_repo(self, *a, **k):
            raise ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    r = cli("push", "me/tiny", "--model", tiny_ckpt, "--out", tmp_path / "p11")
    one_line_error(r, "cannot reach the Hugging Face Hub: [Errno -3] Temporary failure in name resolution")

    import requests

    class RequestsOfflineApi:
        def create_repo(self, *a, **k):
            raise requests.exceptions.ConnectionError("Max retries exceeded with url: /api/repos/create")

    monkeypatch.setattr(huggingface_hub, "HfApi", RequestsOfflineApi)
    r = cli("push", "me/tiny", "--model", tiny_ckpt, "--out", tmp_path / "p12")
    one_line_error(r, "cannot reach the Hugging Face Hub: Max retries exceeded")


# -- 3./4. train: a device the machine lacks, model config values out of range ----------------------


def test_train_on_a_missing_cuda_device_is_one_line_before_anything_is_written(photo_dir, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r"
    r = cli("train", "--stage", 1, "--data", photo_dir, "--preset", "tiny", "--no-lpips", "--no-gan", "--device", "cuda",
            "--set", "batch_size=2", "--out", out, "--quiet")
    one_line_error(r, "CUDA was asked for but torch.cuda.is_available() is False")
    assert not out.exists()
    r = cli("train", "--stage", 1, "--data", photo_dir, "--preset", "tiny", "--no-lpips", "--no-gan", "--device", "tpu",
            "--set", "batch_size=2", "--out", out, "--quiet")
    one_line_error(r, "unknown device 'tpu'")
    assert not out.exists()


@pytest.mark.parametrize("setting, says", [
    ("latent_channels=0", "latent_channels must be >= 1, got 0"),
    ("decoder_heads=3", "decoder_heads: the decoder width decoder_hidden_size=256 is not divisible by 3 heads"),
    ("encoder_patch_size=0", "encoder_patch_size must be >= 1"),
    ("image_size=200", "must equal image_size (200)"),
])
def test_train_refuses_model_config_values_out_of_range(photo_dir, tmp_path, setting, says):
    out = tmp_path / "r"
    r = cli("train", "--stage", 1, "--data", photo_dir, "--preset", "tiny", "--no-lpips", "--no-gan", "--device", "cpu",
            "--model-set", setting, "--set", "max_steps=1", "--out", out, "--quiet")
    one_line_error(r, says)
    assert not out.exists()


def test_every_preset_passes_the_config_checks_and_bad_fields_are_named():
    from rpiae.config import PRESETS, RPiAEConfig

    for cfg in PRESETS.values():
        assert RPiAEConfig.from_dict(cfg.to_dict()) == cfg
    for field, value, says in [("decoder_depth", 0, "decoder_depth must be >= 1"), ("encoder_registers", -1, ">= 0"),
                               ("decoder_ln_eps", 0.0, "decoder_ln_eps must be > 0"), ("std", (0.5, 0.0, 0.5), "std"),
                               ("logvar_min", 30.0, "logvar_min"), ("latent_channels", 8.5, "whole number"),
                               ("noise_tau", -1.0, "noise_tau must be >= 0"), ("mean", (0.5, 0.5), "three numbers")]:
        with pytest.raises(ValueError, match=f"^{field}") as e:
            RPiAEConfig.from_dict({**PRESETS["tiny"].to_dict(), field: value})
        assert says in str(e.value) and "\n" not in str(e.value)


# -- 5. triton: --prefix is a plain model name, --python-env a Python environment -----------------


@pytest.mark.parametrize("prefix, says", [
    ("", "must not be empty"), ("a b/c", "not a plain model name"), ("a/b", "not a plain model name"),
    ("tab\there", "not a plain model name"), ("..", "starts with '.'"),
])
def test_triton_refuses_a_prefix_that_is_not_a_model_name(bundle_all, tmp_path, prefix, says):
    r = cli("triton", "-m", bundle_all.root, "--prefix", prefix, "-o", tmp_path / "r")
    assert r.exit_code == 2 and "--prefix" in r.output and says in r.output and "Traceback" not in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_triton_refuses_a_python_env_that_is_not_one(bundle_all, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "fake.tar.gz").write_text("not gzip")
    (tmp_path / "emptyenv").mkdir()
    for env, says in [(tmp_path / "missing", "does not exist"), (tmp_path / "notes.txt", "neither a Python environment"),
                      (tmp_path / "fake.tar.gz", "not a gzip archive"), (tmp_path / "emptyenv", "without bin/python")]:
        r = cli("triton", "-m", bundle_all.root, "--platform", "python", "--python-env", env, "-o", tmp_path / "r")
        assert r.exit_code == 2 and "--python-env" in r.output and says in r.output, r.output
    assert not (tmp_path / "r").exists()
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text("")
    r = cli("triton", "-m", bundle_all.root, "--platform", "python", "--python-env", env, "-o", tmp_path / "r")
    assert r.exit_code == 0, r.output
    assert str(env.resolve()) in (tmp_path / "r" / "rpiae_encode" / "config.pbtxt").read_text()


# -- 8. hints that the export can follow -------------------------------------------------------------


def test_triton_hints_name_what_the_export_can_build(bundle_all, tmp_path):
    r = cli("triton", "-m", bundle_all.root, "-p", "bf16", "-o", tmp_path / "r")
    one_line_error(r, "bf16 is a runtime precision", "--platform python --backend torch")
    assert "re-export with --precision bf16" not in r.output
    r = cli("triton", "-m", bundle_all.root, "--platform", "python", "--backend", "aoti", "-o", tmp_path / "r")
    one_line_error(r, f"rpiae export --target aoti --device cpu --out {bundle_all.root}` (FP32 only)")
    assert "--precision fp16" not in r.output
    r = cli("triton", "-m", bundle_all.root, "--platform", "python", "--backend", "aoti", "-p", "fp16", "-o", tmp_path / "r")
    one_line_error(r, "the aoti backend runs fp32 only")
    assert "--precision fp16" not in r.output


# -- 6. files that are not checkpoints, and pickles that need more than tensors -------------------


def _not_checkpoints(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "photo.png")
    (tmp_path / "graph.onnx").write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x032.6")
    (tmp_path / "notes.pt").write_text("hello, I am not a checkpoint\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    return [("photo.png", "a PNG image"), ("graph.onnx", "an ONNX graph"), ("notes.pt", "a text file"),
            ("empty.pt", "an empty file")]


def test_read_file_names_what_a_non_checkpoint_is(tmp_path):
    from rpiae.checkpoints import CheckpointError, read_file

    for name, what in _not_checkpoints(tmp_path):
        with pytest.raises(CheckpointError) as e:
            read_file(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name} is not a checkpoint ({what})"), str(e.value)
        assert "weights_only=False" not in str(e.value)


def test_read_file_names_the_refused_global_and_never_suggests_weights_only_false(tmp_path):
    import torch

    from rpiae.checkpoints import CheckpointError, read_file

    torch.save({"w": torch.zeros(2), "stats": np.zeros(3)}, tmp_path / "np.pt")
    with pytest.raises(CheckpointError) as e:
        read_file(tmp_path / "np.pt")
    text = str(e.value)
    assert "refused by the weights-only loader" in text and "numpy" in text and "_reconstruct" in text, text
    assert "weights_only" not in text and "\n" not in text and "if you trust" not in text
    data = (tmp_path / "np.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="damaged, or not a torch checkpoint") as e:
        read_file(tmp_path / "cut.pt")
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)
    # a safetensors file under another name is read as what it is
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "weights.pt")
    obj, _ = read_file(tmp_path / "weights.pt")
    assert torch.equal(obj["w"], torch.ones(2))


def test_a_png_as_model_or_init_encoder_is_one_line(photo_dir, tmp_path):
    _not_checkpoints(tmp_path)
    r = cli("encode", photo_dir, "-o", tmp_path / "e.npy", "-m", tmp_path / "photo.png")
    one_line_error(r, "is not a checkpoint (a PNG image)")
    assert "weights_only" not in r.output
    r = cli("train", "--stage", 1, "--data", photo_dir, "--preset", "tiny", "--no-lpips", "--no-gan", "--device", "cpu",
            "--init-encoder", tmp_path / "graph.onnx", "--set", "max_steps=1", "--set", "batch_size=2", "--out", tmp_path / "r", "--quiet")
    one_line_error(r, "is not a checkpoint (an ONNX graph)")
    assert "weights_only" not in r.output


# -- 7. an interrupted `export --target aoti` leaves the bundle as it was -------------------------


@pytest.fixture()
def bundle_copy(bundle_all, tmp_path):
    import shutil

    dest = tmp_path / "bundle"
    shutil.copytree(bundle_all.root, dest)
    return dest


def _fake_compiles(monkeypatch, interrupt_at: str | None):
    from rpiae.export import aoti

    def fake_compile(model, graph, out, **kw):
        if graph == interrupt_at:
            raise KeyboardInterrupt
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(f"package of {graph}".encode())
        return {"export_s": 0.0, "compile_s": 0.0}

    monkeypatch.setattr(aoti, "compile_graph", fake_compile)
    monkeypatch.setattr(aoti, "_target", lambda kind, index, level: {
        "device": "cpu", "cpu_level": level, "isa": "avx2", "march": "x86-64-v3", "cpu_flags": [], "tag": f"cpu-{level}"})


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_interrupted_aoti_compile_adds_nothing_to_the_bundle(bundle_copy, monkeypatch):
    from rpiae.export import aoti
    from rpiae.export.bundle import Bundle

    before, manifest = _files(bundle_copy), (bundle_copy / "manifest.json").read_text()
    _fake_compiles(monkeypatch, interrupt_at="decode")  # the encode package is done by then
    with pytest.raises(KeyboardInterrupt):
        aoti.compile_packages(bundle_copy, device="cpu", progress=False)
    assert _files(bundle_copy) == before and (bundle_copy / "manifest.json").read_text() == manifest

    # the manifest write itself interrupted: the moved-in packages go again
    _fake_compiles(monkeypatch, interrupt_at=None)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Bundle, "write_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        aoti.compile_packages(bundle_copy, device="cpu", progress=False)
    assert _files(bundle_copy) == before and (bundle_copy / "manifest.json").read_text() == manifest
    monkeypatch.undo()

    # a staging folder a killed run left is cleared; a complete run lists what it adds
    _fake_compiles(monkeypatch, interrupt_at=None)
    stale = bundle_copy / ".aoti.abcd1234.partial"
    (stale / "engines").mkdir(parents=True)
    old = os.stat(stale).st_mtime - 3600
    os.utime(stale, (old, old))
    aoti.compile_packages(bundle_copy, device="cpu", progress=False)
    added = _files(bundle_copy) - before
    listed = set(Bundle.open(bundle_copy).files)
    assert not stale.exists() and added and all(a in listed or any(n.startswith(a + "/") for n in listed) for a in added)
