"""`rpiae extract` and `rpiae decode` with `--engine ray` on a local Ray instance (2 CPUs here):
the same files as the local engine, an actor killed mid-run, the driver killed and re-run,
and the one-line message without Ray."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.test_extract import REPO, photo_files, read_dir, run_cli  # noqa: F401 (photo_files: a fixture)

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray[data] not installed: pip install -e '.[ray]'")

SHARDS = 8  # 64 images in shards of 8, encoded in batches of 3 (3 + 3 + 2): partial batches in every shard
OPTS = ["--shard-size", 8, "--batch-size", 3, "--flip", "--skip-bad", "--workers", 1, "--quiet"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, photo_files):  # noqa: F811
    """64 photos (PNG and JPEG, several sizes and modes); sample 21 is a truncated JPEG (its
    error message, recorded in the manifest, is the same in every run)."""
    d = tmp_path_factory.mktemp("ray-data")
    for i in range(64):
        f = photo_files[i % len(photo_files)]
        (d / f"{i:03d}{f.suffix}").write_bytes(f.read_bytes())
    jpeg = (d / "021.jpg").read_bytes()
    (d / "021.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return d


@pytest.fixture(scope="module")
def local_out(tmp_path_factory, dataset, trained_or_tiny_ckpt):
    out = tmp_path_factory.mktemp("local") / "lat"
    r = run_cli("extract", dataset, "--out", out, "--model", trained_or_tiny_ckpt, *OPTS)
    assert r.returncode == 0, r.stderr
    return out


def records(out: Path) -> int:
    return len(list((out / "parts").glob("shard-*.json"))) if (out / "parts").is_dir() else 0


def descendants(pid: int):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def encoder_actors(pid: int) -> list:
    """The processes of the encoding actors under the driver `pid` (Ray names them after the class)."""
    out = []
    for p in descendants(pid):
        try:
            if "MapWorker(Map(_Encoder))" in p.name() or "MapWorker(Map(_Encoder))" in " ".join(p.cmdline()):
                out.append(p)
        except Exception:  # exited meanwhile
            pass
    return out


def reap(procs) -> None:
    """End the Ray processes the killed driver had started (left alone, its node's agents notice
    the lost raylet and exit within a minute or so)."""
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


@needs_ray
def test_ray_extract_and_decode_write_the_local_engines_files(tmp_path, dataset, local_out, trained_or_tiny_ckpt):
    out = tmp_path / "ray"
    r = run_cli("extract", dataset, "--out", out, "--model", trained_or_tiny_ckpt, *OPTS, "--engine", "ray")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{SHARDS} computed, 0 already done" in r.stdout and "1 skipped" in r.stdout
    assert read_dir(out) == read_dir(local_out)  # shards, statistics, records, manifest: byte for byte

    # decode: the local engine's PNGs. Given the first 10, the Ray run keeps the two batches of
    # shard 0 that are complete (8 PNGs; batches of 5 stay within a shard) and decodes the rest
    ref = tmp_path / "png-local"
    r = run_cli("decode", local_out, "-o", ref, "--model", trained_or_tiny_ckpt, "--batch-size", 5, "--quiet")
    assert r.returncode == 0, r.stderr
    png = tmp_path / "png-ray"
    png.mkdir()
    for name in [".rpiae-decode.json", *sorted(n for n in os.listdir(ref) if n.endswith(".png"))[:10]]:
        shutil.copy(ref / name, png / name)  # the run record says what made them: the Ray run resumes
    r = run_cli("decode", local_out, "-o", png, "--npz", tmp_path / "ray.npz", "--model", trained_or_tiny_ckpt,
                "--batch-size", 5, "--quiet", "--engine", "ray")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "decoded 55 latent(s)" in r.stdout and "8 already there" in r.stdout
    assert read_dir(png) == read_dir(ref) and len(read_dir(ref)) == 64  # 63 PNGs (sample 21 was skipped at extract), the record
    arr = np.load(tmp_path / "ray.npz")["arr_0"]
    assert arr.shape == (63, 256, 256, 3)


@needs_ray
def test_actor_killed_mid_run_is_replaced_and_nothing_is_lost(tmp_path, dataset, local_out, trained_or_tiny_ckpt):
    out = tmp_path / "ray"
    args = ["extract", dataset, "--out", out, "--model", trained_or_tiny_ckpt, *OPTS, "--engine", "ray"]
    proc = subprocess.Popen([sys.executable, "-m", "rpiae.cli", *map(str, args)], cwd=REPO, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed, done_at_kill, replacement = None, None, None
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        actors = encoder_actors(proc.pid)
        if killed is None and records(out) >= 2 and actors:
            killed, done_at_kill = actors[0].pid, records(out)
            os.kill(killed, signal.SIGKILL)
        elif killed is not None and any(a.pid != killed for a in actors):
            replacement = next(a.pid for a in actors if a.pid != killed)
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    assert killed is not None and done_at_kill < SHARDS, "the actor was not killed mid-run"
    assert replacement is not None  # one actor on this machine: Ray started another and retried its batches
    assert f"{SHARDS} computed" in stdout
    assert read_dir(out) == read_dir(local_out)  # no gap, no duplicate


@needs_ray
def test_killed_driver_resumes_from_finished_shards(tmp_path, dataset, local_out, trained_or_tiny_ckpt):
    out = tmp_path / "ray"
    args = ["extract", dataset, "--out", out, "--model", trained_or_tiny_ckpt, *OPTS, "--engine", "ray"]
    proc = subprocess.Popen([sys.executable, "-m", "rpiae.cli", *map(str, args)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and records(out) < 3:
        time.sleep(0.05)
    ray_procs = descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reap(ray_procs)
    done = records(out)
    assert 3 <= done < SHARDS, f"killed after {done} of {SHARDS} shards"
    assert not (out / "manifest.json").exists()

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{SHARDS - done} computed, {done} already done" in again.stdout
    assert read_dir(out) == read_dir(local_out)


def test_without_ray_the_engine_says_what_to_install(tmp_path, monkeypatch, trained_or_tiny_ckpt):
    from rpiae.cli.main import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    (tmp_path / "data").mkdir()  # checked first: the dataset is not even opened
    np.save(tmp_path / "z.npy", np.zeros((1, 64, 16, 16), np.float32))
    for args in (["extract", tmp_path / "data", "--out", tmp_path / "o"], ["decode", tmp_path / "z.npy", "-o", tmp_path / "p"]):
        r = CliRunner().invoke(main, [*map(str, args), "--model", trained_or_tiny_ckpt, "--engine", "ray"])
        assert r.exit_code == 1
        assert r.output == "Error: the Ray engine needs Ray Data: pip install -e '.[ray]' (or pip install 'ray[data]')\n"
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()


def test_ray_options_need_the_ray_engine(tmp_path, trained_or_tiny_ckpt):
    from rpiae.cli.main import main

    np.save(tmp_path / "z.npy", np.zeros((1, 64, 16, 16), np.float32))
    r = CliRunner().invoke(main, ["decode", str(tmp_path / "z.npy"), "-o", str(tmp_path / "p"), "--address", "auto"])
    assert r.exit_code == 2 and "--engine ray" in r.output
