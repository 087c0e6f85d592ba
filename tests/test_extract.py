"""Dataset-scale jobs: `rpiae extract` (sources, shards, statistics, resume, ranks) and the
streaming `rpiae decode` (every latent format, the ADM .npz)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.numpy import load_file

from rpiae.data.latents import LatentFile, Moments
from rpiae.data.sources import SourceError, open_source
from rpiae.imageio import ImageError

REPO = Path(__file__).resolve().parents[1]


def cli(*args):
    from rpiae.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def run_cli(*args, env=None, timeout=600):
    """The command as a user runs it, in its own process, one thread (results do not depend on timing)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "rpiae.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory, sample_photos):
    """Real photos at several sizes and modes (PNG and JPEG), 24 files."""
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    files = []
    for i in range(24):
        a = (sample_photos[i % len(sample_photos)].transpose(1, 2, 0) * 255).round().astype(np.uint8)
        img = Image.fromarray(a).resize((int(rng.integers(200, 600)), int(rng.integers(200, 600))), Image.BICUBIC)
        if i % 5 == 3:
            img = img.convert("L")
        p = d / (f"img{i:02d}.jpg" if i % 2 else f"img{i:02d}.png")
        img.save(p, quality=92) if p.suffix == ".jpg" else img.save(p)
        files.append(p)
    return files


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory, photo_files):
    root = tmp_path_factory.mktemp("imagefolder")
    for i, f in enumerate(photo_files):
        cls = ("zebra", "ant", "moth")[i % 3]
        sub = root / cls / ("nested" if i % 4 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f.name).write_bytes(f.read_bytes())
    return root


def read_dir(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def all_latents(d: Path, key: str = "latents") -> np.ndarray:
    m = json.loads((d / "manifest.json").read_text())
    return np.concatenate([load_file(str(d / s["file"]))[key] for s in m["shards"]])


# -- sources ------------------------------------------------------------------------------------------


def test_imagefolder_labels_and_order(imagefolder):
    src = open_source(imagefolder)
    assert src.kind == "imagefolder" and src.classes == ["ant", "moth", "zebra"]
    assert len(src) == 24
    # torchvision's order: classes sorted, then os.walk sorted (a class's own files before its sub-folders')
    assert src.refs[:3] == ["ant/img01.jpg", "ant/img07.jpg", "ant/img10.png"]
    assert "ant/nested/img04.png" in src.refs and src.refs.index("ant/nested/img04.png") > src.refs.index("ant/img22.png")
    for ref, label in zip(src.refs, src.labels):
        assert src.classes[label] == ref.split("/")[0]
    flat = open_source(imagefolder, no_labels=True)
    assert flat.kind == "folder" and len(flat) == 24 and set(flat.labels) == {-1}


def test_list_source(tmp_path, photo_files):
    lst = tmp_path / "list.txt"
    rel = os.path.relpath(photo_files[1], tmp_path)
    lst.write_text(f"# a comment\n{photo_files[0]} 7\n\n{rel}\n{photo_files[2]} 3\n")
    src = open_source(lst)
    assert src.kind == "list" and len(src) == 3 and src.labels.tolist() == [7, -1, 3]
    assert src.open(1).size == Image.open(photo_files[1]).size
    lst.write_text(f"{photo_files[0]}\n{photo_files[1]} cat\n")
    with pytest.raises(SourceError, match=r"list.txt:2: label 'cat' is not an integer"):
        open_source(lst)
    lst.write_text(f"{photo_files[0]}\nmissing.png 1\n")  # listed, missing: fails when read (stop, or --skip-bad)
    src = open_source(lst)
    assert src.refs == [os.path.relpath(photo_files[0], tmp_path), "missing.png"] and src.labels.tolist() == [-1, 1]
    with pytest.raises(ImageError, match=r"^missing.png: no such image file$"):
        src.open(1)


def make_tars(tmp_path, photo_files, per_tar=10):
    import webdataset as wds

    tars = []
    for t in range(0, len(photo_files), per_tar):
        path = tmp_path / f"train-{t // per_tar:03d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i, f in enumerate(photo_files[t : t + per_tar], start=t):
                sample = {"__key__": f"sample{i:04d}", f.suffix[1:]: f.read_bytes()}
                if i % 6:
                    sample["cls"] = str(i % 4).encode()
                w.write(sample)
        tars.append(path)
    return tars


def test_webdataset_source_reads_what_webdataset_reads(tmp_path, photo_files):
    import webdataset as wds

    tars = make_tars(tmp_path, photo_files)
    pattern = str(tmp_path / "train-{000..002}.tar")
    src = open_source(pattern)
    assert src.kind == "webdataset" and len(src) == 24
    ref_samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False))
    assert len(ref_samples) == 24
    for i, s in enumerate(ref_samples):
        assert src.refs[i].endswith(":" + s["__key__"])
        image = s.get("jpg", s.get("png"))
        assert src.read_bytes(i) == image
        assert src.labels[i] == (int(s["cls"]) if "cls" in s else -1)
    assert len(open_source(str(tmp_path / "train-*.tar"))) == 24  # a glob
    with pytest.raises(SourceError, match="matches no .tar"):
        open_source(str(tmp_path / "nothing-*.tar"))


# -- extract ------------------------------------------------------------------------------------------------


def test_extract_shards_stats_and_manifest(tmp_path, imagefolder, trained_or_tiny_ckpt):
    out = tmp_path / "lat"
    r = cli("extract", imagefolder, "--out", out, "--model", trained_or_tiny_ckpt, "--shard-size", 10,
            "--batch-size", 4, "--workers", 2, "--flip", "--quiet")
    assert r.exit_code == 0, r.output
    assert "extracted 24 latent(s) of 24 image(s) into 3 shard(s)" in r.output
    m = json.loads((out / "manifest.json").read_text())
    assert [s["rows"] for s in m["shards"]] == [10, 10, 4] and m["samples"] == 24 and not m["skipped"]
    assert m["source"]["kind"] == "imagefolder" and len(m["source"]["refs"]) == 24
    assert m["preprocessing"]["crop"] == "adm" and m["options"]["flip"] is True
    shard = load_file(str(out / "shard-00000.safetensors"))
    assert set(shard) == {"latents", "latents_flip", "labels", "index"}
    assert shard["latents"].shape == (10, 64, 16, 16) and shard["latents"].dtype == np.float32
    assert shard["index"].tolist() == list(range(10))
    src = open_source(imagefolder)
    assert shard["labels"].tolist() == src.labels[:10].tolist()

    # the latents are the backend's on the authors' crop of each file, flipped ones too
    from rpiae import RPiAE
    from rpiae.imageio import load_image

    model = RPiAE.from_checkpoint(trained_or_tiny_ckpt).float()
    x = torch.from_numpy(np.stack([load_image(src.path(i)) for i in range(3)]))
    with torch.no_grad():
        np.testing.assert_allclose(shard["latents"][:3], model.encode(x).numpy(), atol=2e-5)
        np.testing.assert_allclose(shard["latents_flip"][:3], model.encode(x.flip(-1)).numpy(), atol=2e-5)

    # statistics: exact, over the latents and the flipped latents, against numpy in float64
    z = np.concatenate([all_latents(out), all_latents(out, "latents_flip")]).astype(np.float64)
    stats = load_file(str(out / "stats" / "latents_stats.safetensors"))
    assert stats["count"][0] == 48 and stats["mean"].dtype == np.float64
    np.testing.assert_allclose(stats["mean"], z.mean(0), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(stats["var"], z.var(0), rtol=1e-10, atol=1e-13)
    per_channel = z.transpose(1, 0, 2, 3).reshape(64, -1)
    np.testing.assert_allclose(stats["channel_mean"], per_channel.mean(1), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(stats["channel_var"], per_channel.var(1), rtol=1e-10, atol=1e-13)
    authors = torch.load(out / "normalization_stats.pt", weights_only=True)
    assert set(authors) == {"mean", "var"} and authors["mean"].shape == (64, 16, 16)
    torch.testing.assert_close(authors["var"], torch.from_numpy(z.var(0)).float())


def test_moments_merge_is_exact_in_any_split():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, (103, 4, 2, 2)) * rng.uniform(0.1, 10, (1, 4, 2, 2))
    for cuts in ([50], [1, 2, 3], [10, 90, 100]):
        parts = np.split(x, cuts)
        m = Moments.of(parts[0])
        for p in parts[1:]:
            m = m.merge(Moments.of(p))
        assert m.count == 103
        np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-13)
        np.testing.assert_allclose(m.var, x.var(0), rtol=1e-12)
    for chunk in (1, 7, 256):  # rows taken `chunk` at a time inside one call
        m = Moments.of(x, chunk=chunk)
        assert m.count == 103
        np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-13)
        np.testing.assert_allclose(m.var, x.var(0), rtol=1e-12)


def test_extract_list_and_tar_inputs_fp16(tmp_path, photo_files, trained_or_tiny_ckpt):
    lst = tmp_path / "files.txt"
    lst.write_text("".join(f"{f} {i % 3}\n" for i, f in enumerate(photo_files[:6])))
    r = cli("extract", lst, "--out", tmp_path / "a", "--model", trained_or_tiny_ckpt, "--shard-size", 4,
            "--workers", 0, "--dtype", "fp16", "--quiet")
    assert r.exit_code == 0, r.output
    a = load_file(str(tmp_path / "a" / "shard-00000.safetensors"))
    assert a["latents"].dtype == np.float16 and a["labels"].tolist() == [0, 1, 2, 0]
    stats = load_file(str(tmp_path / "a" / "stats" / "latents_stats.safetensors"))
    np.testing.assert_allclose(stats["mean"], all_latents(tmp_path / "a").astype(np.float64).mean(0), rtol=1e-12, atol=1e-13)

    make_tars(tmp_path, photo_files[:6], per_tar=4)
    r = cli("extract", str(tmp_path / "train-{000..001}.tar"), "--out", tmp_path / "b", "--model", trained_or_tiny_ckpt,
            "--shard-size", 4, "--workers", 1, "--dtype", "fp16", "--quiet")
    assert r.exit_code == 0, r.output
    b = load_file(str(tmp_path / "b" / "shard-00000.safetensors"))
    np.testing.assert_array_equal(a["latents"], b["latents"])  # same images, same latents
    assert b["labels"].tolist() == [-1, 1, 2, 3]  # sample 0 has no cls


def test_bad_image_stops_with_one_line_then_skip_bad(tmp_path, photo_files, trained_or_tiny_ckpt):
    d = tmp_path / "data"
    d.mkdir()
    for i, f in enumerate(photo_files[:9]):
        (d / f"{i:02d}{f.suffix}").write_bytes(f.read_bytes())
    (d / "05.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")  # sample 5, in the second shard
    out = tmp_path / "lat"
    r = cli("extract", d, "--out", out, "--model", trained_or_tiny_ckpt, "--shard-size", 4, "--workers", 0, "--quiet")
    assert r.exit_code == 1
    assert r.output.startswith("Error: 05.jpg: cannot read image") and r.output.count("\n") == 1
    assert (out / "shard-00000.safetensors").is_file() and not (out / "shard-00001.safetensors").exists()
    assert not (out / "manifest.json").exists()
    r = cli("extract", d, "--out", out, "--model", trained_or_tiny_ckpt, "--shard-size", 4, "--workers", 0, "--quiet", "--skip-bad")
    assert r.exit_code == 0, r.output
    assert "2 computed, 1 already done" in r.output  # the shard finished without skipping is kept
    m = json.loads((out / "manifest.json").read_text())
    assert [s["ref"] for s in m["skipped"]] == ["05.jpg"] and m["rows"] == 8
    assert m["skipped"][0]["error"] == "05.jpg: cannot read image (not a format Pillow can identify)"  # no address in it
    assert load_file(str(out / "shard-00001.safetensors"))["index"].tolist() == [4, 6, 7]


def test_extract_resumes_after_sigkill_byte_identical(tmp_path, photo_files, trained_or_tiny_ckpt):
    d = tmp_path / "data"
    d.mkdir()
    for i in range(40):
        f = photo_files[i % len(photo_files)]
        (d / f"{i:02d}{f.suffix}").write_bytes(f.read_bytes())
    args = ["extract", d, "--model", trained_or_tiny_ckpt, "--shard-size", 4, "--batch-size", 2, "--workers", 1, "--quiet"]
    full = run_cli(*args, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "rpiae.cli", *map(str, args), "--out", str(out)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "parts").glob("shard-*.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((out / "parts").glob("shard-*.json")))
    assert 3 <= done < 10, f"killed after {done} of 10 shards"
    assert not (out / "manifest.json").exists()
    for f in out.glob("shard-*.safetensors"):  # whatever is visible under a final name is complete
        assert load_file(str(f))["latents"].shape[1:] == (64, 16, 16)

    again = run_cli(*args, "--out", out)
    assert again.returncode == 0, again.stderr
    assert f"{10 - done} computed, {done} already done" in again.stdout
    assert read_dir(out) == read_dir(tmp_path / "full")


def test_torchrun_two_processes_equal_one(tmp_path, photo_files, trained_or_tiny_ckpt):
    d = tmp_path / "data"
    d.mkdir()
    for i, f in enumerate(photo_files[:14]):
        (d / f"{i:02d}{f.suffix}").write_bytes(f.read_bytes())
    args = ["extract", d, "--model", trained_or_tiny_ckpt, "--shard-size", 3, "--batch-size", 2, "--workers", 0,
            "--flip", "--quiet"]
    one = run_cli(*args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "rpiae.cli",
         *map(str, args), "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    ranks = {json.loads(p.read_text())["shard"] for p in (tmp_path / "two" / "parts").glob("shard-*.json")}
    assert ranks == set(range(5))
    assert read_dir(tmp_path / "one") == read_dir(tmp_path / "two")


def test_extract_cli_errors(tmp_path, trained_or_tiny_ckpt):
    r = cli("extract", tmp_path / "nope", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "no such folder, list or tar file" in r.output
    (tmp_path / "empty").mkdir()
    r = cli("extract", tmp_path / "empty", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "no images found" in r.output
    r = cli("extract", tmp_path, "--out", tmp_path / "o", "--dtype", "int4")
    assert r.exit_code == 2


# -- latent normalisation ----------------------------------------------------------------------------------


def test_latent_stats_round_trip(tmp_path, photo_files, trained_or_tiny_ckpt):
    from rpiae import RPiAE
    from rpiae.checkpoints import read_latent_stats

    d = tmp_path / "data"
    d.mkdir()
    for f in photo_files[:8]:
        (d / f.name).write_bytes(f.read_bytes())
    assert cli("extract", d, "--out", tmp_path / "lat", "--model", trained_or_tiny_ckpt, "--workers", 0, "--quiet").exit_code == 0
    stats = tmp_path / "lat" / "stats" / "latents_stats.safetensors"
    raw = all_latents(tmp_path / "lat")

    r = cli("encode", d, "-o", tmp_path / "z.npy", "--model", trained_or_tiny_ckpt, "--latent-stats", stats, "--workers", 0)
    assert r.exit_code == 0, r.output
    z = np.load(tmp_path / "z.npy")
    mean, var = (t.numpy() for t in read_latent_stats(stats))
    np.testing.assert_allclose(z, (raw - mean) / np.sqrt(var + 1e-5), atol=1e-4)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)  # normalised over this very data set
    # the authors' .pt gives the same model
    r = cli("encode", d, "-o", tmp_path / "z2.npy", "--model", trained_or_tiny_ckpt, "--latent-stats",
            tmp_path / "lat" / "normalization_stats.pt", "--workers", 0)
    assert r.exit_code == 0 and np.allclose(np.load(tmp_path / "z2.npy"), z, atol=1e-5)

    # decode undoes it: images from normalised latents + stats == images from raw latents
    model = RPiAE.from_checkpoint(trained_or_tiny_ckpt).float()
    with torch.no_grad():
        ref = model.decode(torch.from_numpy(raw[:2])).numpy()
        normed = RPiAE.from_checkpoint(trained_or_tiny_ckpt).float().set_latent_stats(*read_latent_stats(stats))
        np.testing.assert_allclose(normed.decode(torch.from_numpy(z[:2])).numpy(), ref, atol=1e-4)
        # and the statistics travel with the weights
        normed.save(tmp_path / "normed.safetensors")
        back = RPiAE.from_checkpoint(tmp_path / "normed.safetensors")
        assert back.config.latent_norm and torch.equal(back.latent_var, normed.latent_var)
        y = torch.from_numpy(z[:2])
        torch.testing.assert_close(back.decode(y), normed.decode(y), rtol=0, atol=0)

    bad = tmp_path / "bad.pt"
    torch.save({"mean": torch.zeros(768, 16, 16), "var": torch.ones(768, 16, 16)}, bad)
    r = cli("encode", d, "-o", tmp_path / "z3.npy", "--model", trained_or_tiny_ckpt, "--latent-stats", bad)
    assert r.exit_code == 1 and "(768, 16, 16)" in r.output and "(64, 16, 16)" in r.output
    assert not (tmp_path / "z3.npy").exists()


# -- streaming decode ----------------------------------------------------------------------------------------


def test_decode_reads_every_format_and_writes_the_adm_npz(tmp_path, trained_or_tiny_ckpt):
    from safetensors.numpy import save_file

    z = np.random.default_rng(0).normal(0, 1, (5, 64, 16, 16)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    np.savez_compressed(tmp_path / "z.npz", arr_0=z, other=z[:2])
    save_file({"latents": z}, str(tmp_path / "z.safetensors"))
    pngs = {}
    for name in ("z.npy", "z.npz", "z.safetensors"):
        out = tmp_path / f"out_{name}"
        r = cli("decode", tmp_path / name, "-o", out, "--model", trained_or_tiny_ckpt, "--batch-size", 2, "--quiet")
        assert r.exit_code == 0, r.output
        pngs[name] = {k: v for k, v in read_dir(out).items() if k.endswith(".png")}  # beside them: the run record
    assert list(pngs["z.npy"]) == [f"{i:06d}.png" for i in range(5)]
    assert pngs["z.npy"] == pngs["z.npz"] == pngs["z.safetensors"]

    r = cli("decode", tmp_path / "z.npz", "--key", "other", "-o", tmp_path / "two", "--npz", tmp_path / "two.npz",
            "--model", trained_or_tiny_ckpt, "--quiet")
    assert r.exit_code == 0, r.output
    arr = np.load(tmp_path / "two.npz")["arr_0"]
    assert arr.shape == (2, 256, 256, 3) and arr.dtype == np.uint8
    for i in range(2):
        np.testing.assert_array_equal(arr[i], np.asarray(Image.open(tmp_path / "two" / f"{i:06d}.png")))
    # a re-run skips what is there
    r = cli("decode", tmp_path / "z.npy", "-o", tmp_path / "out_z.npy", "--model", trained_or_tiny_ckpt, "--quiet")
    assert "decoded 0 latent(s)" in r.output and "5 already there" in r.output


def test_decode_an_extract_directory_names_by_sample(tmp_path, photo_files, trained_or_tiny_ckpt):
    d = tmp_path / "data"
    d.mkdir()
    for i, f in enumerate(photo_files[:5]):
        (d / f"{i}{f.suffix}").write_bytes(f.read_bytes())
    (d / "2.png").write_bytes(b"broken")
    assert cli("extract", d, "--out", tmp_path / "lat", "--model", trained_or_tiny_ckpt, "--shard-size", 2,
               "--workers", 0, "--skip-bad", "--quiet").exit_code == 0
    lf = LatentFile(tmp_path / "lat")
    assert len(lf) == 4
    r = cli("decode", tmp_path / "lat", "-o", tmp_path / "rec", "--npz", tmp_path / "rec.npz", "--model", trained_or_tiny_ckpt, "--quiet")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == [".rpiae-decode.json", "000000.png", "000001.png",
                                                                    "000003.png", "000004.png"]
    assert np.load(tmp_path / "rec.npz")["arr_0"].shape == (4, 256, 256, 3)


def test_decode_refuses_bad_input_in_one_line(tmp_path, trained_or_tiny_ckpt):
    np.save(tmp_path / "wrong.npy", np.zeros((2, 32, 16, 16), np.float32))
    r = cli("decode", tmp_path / "wrong.npy", "-o", tmp_path / "o", "--model", trained_or_tiny_ckpt)
    assert r.exit_code == 1 and "(2, 32, 16, 16)" in r.output and r.output.count("\n") == 1
    (tmp_path / "junk.npy").write_bytes(b"junk")
    r = cli("decode", tmp_path / "junk.npy", "-o", tmp_path / "o", "--model", trained_or_tiny_ckpt)
    assert r.exit_code == 1 and "junk.npy" in r.output
    nan = np.zeros((1, 64, 16, 16), np.float32)
    nan[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    r = cli("decode", tmp_path / "nan.npy", "-o", tmp_path / "o2", "--model", trained_or_tiny_ckpt)
    assert r.exit_code == 1 and "NaN" in r.output and not list((tmp_path / "o2").glob("*.png"))
    r = cli("decode", tmp_path / "missing.npy", "-o", tmp_path / "o", "--model", trained_or_tiny_ckpt)
    assert r.exit_code == 1 and "no such" in r.output


def test_export_bakes_latent_stats_into_the_graphs(tmp_path, sample_photos, trained_or_tiny_ckpt):
    from rpiae.engines import load_backend
    from rpiae.verify import export_bundle

    rng = np.random.default_rng(0)
    stats = tmp_path / "stats.pt"
    torch.save({"mean": torch.from_numpy(rng.normal(0, 0.3, (64, 16, 16))).float(),
                "var": torch.from_numpy(rng.uniform(0.5, 2, (64, 16, 16))).float()}, stats)
    bundle = export_bundle(trained_or_tiny_ckpt, tmp_path / "b", latent_stats=stats, progress=False)
    assert bundle.config.latent_norm and bundle.manifest.latent_stats["file"] == "stats.pt"
    assert "normalised" in bundle.manifest.io["encode"]["output"]["meaning"]
    x = sample_photos[:3]
    with load_backend(trained_or_tiny_ckpt, "torch", latent_stats=stats) as ref, load_backend(bundle.root, "ort") as ort:
        z_ref, z = ref.encode(x), ort.encode(x)
        np.testing.assert_allclose(z, z_ref, atol=1e-4 * np.abs(z_ref).max())
        np.testing.assert_allclose(ort.decode(z_ref), ref.decode(z_ref), atol=1e-4)
    with load_backend(trained_or_tiny_ckpt, "torch") as raw:  # the raw latent differs: the stats are really in the graph
        assert np.abs(raw.encode(x) - z).max() > 0.1
    other = tmp_path / "other.pt"
    torch.save({"mean": torch.zeros(64, 16, 16), "var": torch.ones(64, 16, 16)}, other)
    np.save(tmp_path / "z.npy", z)
    r = cli("decode", tmp_path / "z.npy", "-o", tmp_path / "o", "--model", bundle.root, "--backend", "ort", "--latent-stats", other)
    assert r.exit_code == 1 and "other latent statistics" in r.output
