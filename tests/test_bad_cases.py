"""Each bad case of the dataset jobs and of every file rpiae writes, the way a user caching a
large dataset meets it: one skip policy for every source kind, a folder holding another run,
a full disk, file modes under a umask, leftovers of killed writes, stray images in an
ImageFolder tree."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from safetensors.numpy import load_file

from rpiae.data.sources import open_source
from rpiae.fileio import atomic_dir, atomic_file, remove_stale_temps


def cli(*args):
    from rpiae.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def images(tmp_path_factory, sample_photos):
    d = tmp_path_factory.mktemp("imgs")
    out = []
    for i in range(6):
        a = (sample_photos[i % len(sample_photos)].transpose(1, 2, 0) * 255).round().astype(np.uint8)
        p = d / f"p{i}.png"
        Image.fromarray(a).save(p)
        out.append(p)
    return out


def _folder(tmp_path: Path, images: list[Path], n: int) -> Path:
    """A folder holding the first `n` photos."""
    d = tmp_path / "d"
    d.mkdir()
    for f in images[:n]:
        (d / f.name).write_bytes(f.read_bytes())
    return d


def _extract(data, out, ckpt, *extra):
    return cli("extract", data, "--out", out, "--model", ckpt, "--shard-size", 2, "--workers", 0, "--quiet", *extra)


# -- one skip policy for every source kind ------------------------------------------------------------
def test_webdataset_sample_without_image_is_a_bad_sample(tmp_path, images, trained_or_tiny_ckpt):
    import webdataset as wds

    tar = tmp_path / "t.tar"
    with wds.TarWriter(str(tar)) as w:
        for i, f in enumerate(images[:4]):
            w.write({"__key__": f"s{i}", "png": f.read_bytes(), "cls": b"1"})
            if i == 1:
                w.write({"__key__": "s1b", "cls": b"2", "json": b"{}"})  # no image member
    src = open_source(tar)
    assert len(src) == 5 and src.refs[2] == "t.tar:s1b"
    r = _extract(tar, tmp_path / "a", trained_or_tiny_ckpt)
    assert r.exit_code == 1 and "t.tar:s1b: the sample has no image member" in r.output  # not dropped silently
    r = _extract(tar, tmp_path / "a", trained_or_tiny_ckpt, "--skip-bad")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert [s["ref"] for s in m["skipped"]] == ["t.tar:s1b"] and m["rows"] == 4


def test_missing_list_entry_is_skipped_with_skip_bad(tmp_path, images, trained_or_tiny_ckpt):
    lst = tmp_path / "l.txt"
    lst.write_text(f"{images[0]} 0\n{tmp_path / 'gone.png'} 1\n{images[1]} 2\n")
    r = _extract(lst, tmp_path / "a", trained_or_tiny_ckpt)
    assert r.exit_code == 1 and "gone.png: no such image file" in r.output and r.output.count("\n") == 1
    r = _extract(lst, tmp_path / "a", trained_or_tiny_ckpt, "--skip-bad")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert [s["ref"] for s in m["skipped"]] == ["gone.png"]
    assert load_file(str(tmp_path / "a" / "shard-00001.safetensors"))["labels"].tolist() == [2]


def test_stray_image_at_the_root_of_an_imagefolder_keeps_the_labels(tmp_path, images):
    root = tmp_path / "tree"
    for i, f in enumerate(images[:4]):
        (root / ("cat", "dog")[i % 2]).mkdir(parents=True, exist_ok=True)
        (root / ("cat", "dog")[i % 2] / f.name).write_bytes(f.read_bytes())
    (root / "stray.png").write_bytes(images[5].read_bytes())
    with pytest.warns(UserWarning, match=r"1 image\(s\) at the root .* stray.png.* left out.*--no-labels"):
        src = open_source(root)
    assert src.kind == "imagefolder" and src.classes == ["cat", "dog"] and src.labels.tolist() == [0, 0, 1, 1]
    assert "stray.png" not in src.refs  # torchvision's ImageFolder leaves root files out too
    flat = open_source(root, no_labels=True)
    assert flat.kind == "folder" and len(flat) == 5


# -- a folder holding another run -----------------------------------------------------------------------
def test_a_different_run_is_refused_then_overwrite_starts_over(tmp_path, images, trained_or_tiny_ckpt):
    data = _folder(tmp_path, images, 4)
    out = tmp_path / "lat"
    assert _extract(data, out, trained_or_tiny_ckpt, "--flip").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.glob("shard-*")}
    r = _extract(data, out, trained_or_tiny_ckpt, "--dtype", "fp16")
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert "holds another extraction" in r.output and "dtype 'fp32' there, 'fp16' now" in r.output
    assert "flip True there, False now" in r.output and "--overwrite" in r.output
    assert {p.name: p.read_bytes() for p in out.glob("shard-*")} == before  # nothing touched
    r = _extract(data, out, trained_or_tiny_ckpt, "--dtype", "fp16", "--overwrite")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["options"]["dtype"] == "fp16" and not m["options"]["flip"]
    z = load_file(str(out / "shard-00000.safetensors"))
    assert z["latents"].dtype == np.float16 and "latents_flip" not in z
    assert json.loads((out / "parts" / "run.json").read_text())["dtype"] == "fp16"
    assert _extract(data, out, trained_or_tiny_ckpt, "--dtype", "fp16").exit_code == 0  # the same run resumes


def test_a_folder_finished_before_run_json_is_recognised(tmp_path, images, trained_or_tiny_ckpt):
    data = _folder(tmp_path, images, 2)
    out = tmp_path / "lat"
    assert _extract(data, out, trained_or_tiny_ckpt).exit_code == 0
    (out / "parts" / "run.json").unlink()  # as written by an earlier version: the manifest says what it holds
    assert _extract(data, out, trained_or_tiny_ckpt).exit_code == 0
    r = _extract(data, out, trained_or_tiny_ckpt, "--flip")
    assert r.exit_code == 1 and "flip False there, True now" in r.output


# -- full disk -----------------------------------------------------------------------------------------
def test_full_disk_is_one_line_for_shards_and_statistics(tmp_path, images, trained_or_tiny_ckpt, monkeypatch):
    from safetensors import SafetensorError

    from rpiae.data import latents as L
    from rpiae.jobs import shards as X

    data = _folder(tmp_path, images, 2)

    def full(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    for module in (X, L):  # the statistics, then the shard
        monkeypatch.setattr(module, "save_file", full)
        r = _extract(data, tmp_path / f"out-{module.__name__}", trained_or_tiny_ckpt)
        assert r.exit_code == 1, r.output
        assert r.output.startswith("Error: cannot write ") and "No space left on device" in r.output
        assert r.output.count("\n") == 1 and "Traceback" not in r.output
        assert not list((tmp_path / f"out-{module.__name__}").rglob("*.tmp"))  # nothing half-written left
        monkeypatch.undo()


# -- modes and leftovers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_and_folders_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        with atomic_file(tmp_path / "f.json") as t:
            t.write_text("{}")
        with atomic_dir(tmp_path / "bundle") as d:
            (d / "x").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "bundle").stat().st_mode) == 0o777 & ~mask


def test_extract_outputs_are_readable_by_others(tmp_path, images, trained_or_tiny_ckpt):
    data = _folder(tmp_path, images, 2)
    old = os.umask(0o022)
    try:
        assert _extract(data, tmp_path / "lat", trained_or_tiny_ckpt).exit_code == 0
        assert cli("decode", tmp_path / "lat", "-o", tmp_path / "png", "--model", trained_or_tiny_ckpt,
                   "--npz", tmp_path / "s.npz", "--quiet").exit_code == 0
    finally:
        os.umask(old)
    files = [p for p in [*(tmp_path / "lat").rglob("*"), *(tmp_path / "png").rglob("*"), tmp_path / "s.npz"] if p.is_file()]
    assert len(files) >= 8
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_leftover_temporaries_are_removed_when_a_run_starts(tmp_path, images, trained_or_tiny_ckpt):
    data = _folder(tmp_path, images, 2)
    out = tmp_path / "lat"
    (out / "parts").mkdir(parents=True)
    killed = [out / ".shard-00000.safetensors.ab12cd_9.tmp", out / "parts" / ".shard-00000.json.zz99zz99.tmp"]
    for p in killed:  # written by an earlier, killed run (before this process started)
        p.write_bytes(b"half a shard")
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    theirs = out / ".notes.txt.tmp"  # not of our naming: left alone
    theirs.write_text("mine")
    assert _extract(data, out, trained_or_tiny_ckpt).exit_code == 0
    assert not any(p.exists() for p in killed) and theirs.exists()
    # a temporary another live process is writing now (newer than this process) stays
    fresh = tmp_path / ".x.safetensors.abcdefgh.tmp"
    fresh.write_bytes(b"")
    old = tmp_path / ".x.safetensors.hgfedcba.tmp"
    old.write_bytes(b"")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert remove_stale_temps(tmp_path, before=time.time() - 60) == [old] and fresh.exists()


def test_eval_skips_impossible_combinations_with_the_reason(tmp_path, images, bundle_all):
    d = _folder(tmp_path, images, 2)
    r = cli("eval", d, "--model", bundle_all.root, "--backend", "torch,ort", "--precision", "fp32,int8", "--limit", 2,
            "--workers", 0, "--quiet", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    rows = {(x["backend"], x["precision"]): x for x in report["rows"]}
    assert {("torch", "fp32"), ("ort", "fp32"), ("ort", "int8")} <= set(rows)
    skipped = report["skipped_variants"]
    assert [(s["backend"], s["precision"]) for s in skipped] == [("torch", "int8")]
    assert "torch backend runs fp32, fp16, bf16, not int8" in skipped[0]["reason"]
    assert "skipped torch/int8" in r.output


def test_decode_removes_the_leftovers_of_a_killed_run(tmp_path, trained_or_tiny_ckpt):
    np.save(tmp_path / "z.npy", np.random.default_rng(0).standard_normal((2, 64, 16, 16)).astype(np.float32))
    out = tmp_path / "png"
    out.mkdir()
    half = [out / ".000001.png.k3j9x0a1.tmp", tmp_path / ".s.npz.q0w9e8r7.tmp"]
    for p in half:
        p.write_bytes(b"half a PNG")
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    r = cli("decode", tmp_path / "z.npy", "-o", out, "--model", trained_or_tiny_ckpt, "--npz", tmp_path / "s.npz", "--quiet")
    assert r.exit_code == 0, r.output
    assert not any(p.exists() for p in half) and sorted(p.name for p in out.iterdir()) == [".rpiae-decode.json", "000000.png",
                                                                                     "000001.png"]


def test_only_failed_writes_become_write_errors(tmp_path):
    """A failed write of the file names the file; an unrelated error inside the block (reading a
    missing input) stays what it is, so its message is not misattributed to the output."""
    import errno

    from rpiae.fileio import WriteError

    with pytest.raises(WriteError, match=r"^cannot write .*out.txt: \[Errno 28\] No space left on device$"):
        with atomic_file(tmp_path / "out.txt"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(FileNotFoundError, match="missing.png") as e:
        with atomic_file(tmp_path / "out.txt"):
            open(tmp_path / "missing.png")
    assert not isinstance(e.value, WriteError)
    assert not (tmp_path / "out.txt").exists() and not list(tmp_path.glob(".*.tmp"))


def test_a_worker_loader_leaves_the_sigchld_handler_as_it_found_it(tmp_path, sample_photos):
    """torch's DataLoader installs a process-wide SIGCHLD handler for its workers; with it in
    place a child's exit was seen to end the process with SIGSEGV (joining the loader's own
    workers; stopping a tritonserver child later). rpiae's image loader never installs it."""
    import signal

    from rpiae.data.sources import image_loader, open_source
    from rpiae.imageio import DEFAULT_CROP, save_image

    for i, img in enumerate(sample_photos[:4]):
        save_image(img, tmp_path / f"p{i}.png")
    source = open_source(tmp_path)
    before = signal.getsignal(signal.SIGCHLD)
    for _ in range(2):
        batches = [[0, 1], [2, 3]]
        got = []
        for ids, images, errors in image_loader(source, batches, DEFAULT_CROP, 256, workers=1):
            assert signal.getsignal(signal.SIGCHLD) is before  # torch's handler is never installed
            got.append(ids)
        assert [list(map(int, g)) for g in got] == batches
        assert signal.getsignal(signal.SIGCHLD) is before
    # abandoned half way: the workers stop and the handler is restored as well
    it = iter(image_loader(source, [[0], [1], [2]], DEFAULT_CROP, 256, workers=1))
    next(it)
    it.close()
    assert signal.getsignal(signal.SIGCHLD) is before


def test_a_killed_loader_worker_is_one_line(tmp_path, images, trained_or_tiny_ckpt):
    """Without torch's SIGCHLD handler a dead DataLoader worker (OOM killer, kill -9) is still
    found, by torch's liveness check while the job waits for a batch: one line, exit 1."""
    import signal
    import subprocess
    import sys

    import psutil

    d = tmp_path / "many"
    d.mkdir()
    for k in range(100):
        for f in images:
            (d / f"{k:03d}_{f.name}").write_bytes(f.read_bytes())
    proc = subprocess.Popen(
        [sys.executable, "-m", "rpiae.cli", "extract", str(d), "--out", str(tmp_path / "lat"), "--model",
         trained_or_tiny_ckpt, "--workers", "1", "--batch-size", "2", "--shard-size", "20", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        workers = psutil.Process(proc.pid).children()
        if workers:
            killed = workers[0].pid
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=120)
    assert killed is not None, out
    assert proc.returncode == 1, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: DataLoader worker") and str(killed) in lines[0], out
