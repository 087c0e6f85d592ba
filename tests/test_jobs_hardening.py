"""Dataset jobs on inputs an audit found mishandled: decode into a folder holding another run,
extract folders decoded with other statistics or keys, damaged latent files, extreme aspect
ratios, symlinked and unreadable folders, non-UTF-8 names, list lines with spaces."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from rpiae.data.latents import LatentFile
from rpiae.data.sources import Source, SourceError, open_source
from rpiae.imageio import ImageError, crop_image, find_images, save_image


def cli(*args):
    from rpiae.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r, *parts: str) -> None:
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines[-1].startswith("Error: ") and "Traceback" not in r.output and "Aborted" not in r.output, r.output
    for p in parts:
        assert p in lines[-1], r.output


@pytest.fixture(scope="module")
def work(tmp_path_factory, sample_photos):
    """Four photos, their latents (.npy) and an extract folder of them (default tiny model)."""
    root = tmp_path_factory.mktemp("hardening")
    for i, img in enumerate(sample_photos[:4]):
        save_image(img, root / "photos" / f"p{i}.png")
    r = cli("encode", root / "photos", "-o", root / "z.npy", "--workers", "0")
    assert r.exit_code == 0, r.output
    r = cli("extract", root / "photos", "--out", root / "lat", "--quiet", "--workers", "0", "--flip")
    assert r.exit_code == 0, r.output
    return root


# -- 1. decode records what made its PNGs ------------------------------------------------------------


def test_decode_refuses_a_folder_holding_another_run(work, tmp_path):
    z = np.load(work / "z.npy")
    np.save(tmp_path / "other.npy", z[::-1].copy())
    out = tmp_path / "dref"
    assert cli("decode", work / "z.npy", "-o", out, "--npz", tmp_path / "ref.npz", "--quiet").exit_code == 0
    assert json.loads((out / ".rpiae-decode.json").read_text())["latents"]["sha256"]
    r = cli("decode", work / "z.npy", "-o", out, "--quiet")  # the same run resumes
    assert r.exit_code == 0 and "decoded 0 latent(s)" in r.output and "4 already there" in r.output, r.output
    r = cli("decode", tmp_path / "other.npy", "-o", out, "--npz", tmp_path / "other_adm.npz", "--quiet")
    one_line_error(r, "holds the PNGs of another decode", "other.npy", "--overwrite")
    assert not (tmp_path / "other_adm.npz").exists()
    one_line_error(cli("decode", work / "z.npy", "-o", out, "-p", "bf16", "--quiet"), "precision 'fp32' there, 'bf16' now")
    stats = work / "lat" / "stats" / "latents_stats.safetensors"
    one_line_error(cli("decode", work / "z.npy", "-o", out, "--latent-stats", stats, "--quiet"), "latent_stats")
    r = cli("decode", tmp_path / "other.npy", "-o", out, "--npz", tmp_path / "other_adm.npz", "--quiet", "--overwrite")
    assert r.exit_code == 0 and "decoded 4 latent(s)" in r.output, r.output
    ref, other = np.load(tmp_path / "ref.npz")["arr_0"], np.load(tmp_path / "other_adm.npz")["arr_0"]
    np.testing.assert_array_equal(other, ref[::-1])  # the new latents' images, not the stale ones


def test_decode_refuses_numbered_pngs_it_has_no_record_of(work, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    Image.new("RGB", (256, 256)).save(out / "000000.png")  # a folder decoded before runs were recorded
    one_line_error(cli("decode", work / "z.npy", "-o", out, "--quiet"), "1 PNG(s) that no .rpiae-decode.json describes")
    assert cli("decode", work / "z.npy", "-o", out, "--quiet", "--overwrite").exit_code == 0
    assert len(list(out.glob("*.png"))) == 4


def test_npz_suffix_is_checked_before_decoding(work, tmp_path):
    one_line_error(cli("decode", work / "z.npy", "-o", tmp_path / "png", "--npz", tmp_path / "x.zip"), "must end in .npz")
    assert not (tmp_path / "png").exists()


# -- 2. an extract folder is decoded with what made it ------------------------------------------------


def test_decode_of_an_extract_folder_checks_its_model_and_statistics(work, tmp_path, tiny_ckpt):
    stats = work / "lat" / "stats" / "latents_stats.safetensors"
    norm = tmp_path / "lat_norm"
    r = cli("extract", work / "photos", "--out", norm, "--latent-stats", stats, "--quiet", "--workers", "0")
    assert r.exit_code == 0, r.output
    one_line_error(cli("decode", norm, "-o", tmp_path / "a", "--quiet"),
                   "normalised at extraction with --latent-stats", "decode with the same --latent-stats")
    assert not (tmp_path / "a").exists()
    r = cli("decode", norm, "-o", tmp_path / "b", "--quiet", "--latent-stats", stats)
    assert r.exit_code == 0, r.output
    # the authors'-format file of the same folder holds the same values: accepted
    r = cli("decode", norm, "-o", tmp_path / "c", "--quiet", "--latent-stats", work / "lat" / "normalization_stats.pt")
    assert r.exit_code == 0, r.output
    one_line_error(cli("decode", work / "lat", "-o", tmp_path / "d", "--quiet", "--latent-stats", stats),
                   "extracted without latent statistics")
    one_line_error(cli("decode", work / "lat", "-o", tmp_path / "e", "-m", tiny_ckpt, "--quiet"),
                   "was extracted with model", "decode with the model that made the latents")
    # on purpose (a decoder fine-tuned on the same encoder's latents): --any-model
    res = cli("decode", work / "lat", "-o", tmp_path / "e", "-m", tiny_ckpt, "--quiet", "--any-model")
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "e").glob("*.png"))) == 4  # the fixture's four photos


# -- 6-9. damaged latent files, --key, byte order, NaN ---------------------------------------------


def test_damaged_latent_files_are_one_line_errors(work, tmp_path):
    (tmp_path / "empty.npy").write_bytes(b"")
    one_line_error(cli("decode", tmp_path / "empty.npy", "-o", tmp_path / "o1"), "empty.npy", "empty or truncated")
    for name, data in (("empty.safetensors", b""), ("short.safetensors", b"\x05\x00"),
                       ("junk.safetensors", b"\xff" * 64)):
        (tmp_path / name).write_bytes(data)
        one_line_error(cli("decode", tmp_path / name, "-o", tmp_path / "o2"), name, "not a readable latent file")
    # an extract folder with a truncated shard
    bad = tmp_path / "lat"
    bad.mkdir()
    (bad / "manifest.json").write_text((work / "lat" / "manifest.json").read_text())
    (bad / "shard-00000.safetensors").write_bytes((work / "lat" / "shard-00000.safetensors").read_bytes()[:40])
    one_line_error(cli("decode", bad, "-o", tmp_path / "o3"), "shard-00000.safetensors", "not a readable latent file")


def test_key_is_honoured_for_extract_folders_and_refused_for_npy(work, tmp_path):
    from safetensors.numpy import load_file

    flipped = load_file(str(work / "lat" / "shard-00000.safetensors"))["latents_flip"]
    np.save(tmp_path / "flip.npy", flipped)
    assert cli("decode", work / "lat", "--key", "latents_flip", "-o", tmp_path / "a", "--quiet").exit_code == 0
    assert cli("decode", tmp_path / "flip.npy", "-o", tmp_path / "b", "--quiet").exit_code == 0
    for name in ("000000.png", "000003.png"):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a" / name)), np.asarray(Image.open(tmp_path / "b" / name)))
    one_line_error(cli("decode", work / "lat", "--key", "nope", "-o", tmp_path / "c"), "no tensor 'nope'")
    one_line_error(cli("decode", work / "z.npy", "--key", "latents", "-o", tmp_path / "d"), "a .npy file holds one array")


def test_big_endian_latents_decode_as_native(work, tmp_path):
    z = np.load(work / "z.npy")
    np.save(tmp_path / "be.npy", z.astype(">f4"))
    np.savez(tmp_path / "be.npz", z.astype(">f4"))
    for f in ("be.npy", "be.npz"):
        lf = LatentFile(tmp_path / f)
        lf.check((64, 16, 16))
        np.testing.assert_array_equal(np.concatenate([b for _, b in lf.batches(3)]), z)


def test_nan_latents_name_the_file_and_sample(work, tmp_path):
    z = np.load(work / "z.npy")
    z[2, 5, 1, 1] = np.inf
    np.save(tmp_path / "nan.npy", z)
    one_line_error(cli("decode", tmp_path / "nan.npy", "-o", tmp_path / "o", "--batch-size", "2", "--quiet"),
                   "nan.npy: the latent of sample 2 contains NaN or Inf")


# -- 3. extreme aspect ratios ---------------------------------------------------------------------------


def test_the_aspect_ratio_limit_refuses_only_extreme_images():
    """Every ordinary shape, and elongated ones up to the limit (512:1 at 256), crops to
    (3, 256, 256) under both policies; one pixel past the limit is refused before any resize."""
    from rpiae.imageio import MAX_RESIZED_PIXELS, resized_size

    assert MAX_RESIZED_PIXELS == 256 * 256 * 512
    for w, h in ((256, 256), (300, 200), (17, 700), (2560, 256), (1030, 515), (512, 1), (1, 512)):
        img = Image.new("RGB", (w, h), (90, 120, 30))
        for crop in ("adm", "torch-aa"):
            assert crop_image(img, 256, crop).shape == (3, 256, 256)
    assert resized_size(1, 512, 256, "adm") == (256, 131072)  # 2^25 pixels: at the limit, accepted
    for crop in ("adm", "torch-aa"):
        with pytest.raises(ImageError, match="1x513 is too elongated"):
            crop_image(Image.new("RGB", (1, 513)), 256, crop, "1x513")


def test_extreme_aspect_ratios_are_refused_per_image(tmp_path, sample_photos):
    import resource

    line = Image.new("RGB", (1, 60000), (200, 10, 10))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for crop in ("adm", "torch-aa"):
        with pytest.raises(ImageError, match=r"line\.png: 1x60000 is too elongated to crop"):
            crop_image(line, 256, crop, "line.png")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing was resized
    photos = tmp_path / "photos"
    line.save(tmp_path / "line.png")
    save_image(sample_photos[0], photos / "a.png")
    Image.new("RGB", (20000, 1)).save(photos / "b.png")
    one_line_error(cli("extract", photos, "--out", tmp_path / "x", "--workers", "0", "--quiet"), "b.png: 20000x1 is too elongated")
    r = cli("extract", photos, "--out", tmp_path / "y", "--workers", "0", "--quiet", "--skip-bad")
    assert r.exit_code == 0 and "1 skipped" in r.output, r.output


def test_wide_grayscale_warning_names_the_file(tmp_path, monkeypatch):
    import rpiae.imageio as imageio

    monkeypatch.setattr(imageio, "_warned_wide_gray", False)
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "deep.png")
    src = open_source(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        crop_image(src.open(0), 256, "adm", src.refs[0])
    assert any(str(w.message).startswith("deep.png: I;16") for w in caught), [str(w.message) for w in caught]


# -- 4. folders: symlinks, loops, unreadable and empty folders --------------------------------------------


def _tree(root: Path, photo) -> None:
    for rel in ("a/0.png", "b/sub/1.png", "elsewhere/2.png"):
        save_image(photo, root / rel)
    os.symlink(root / "elsewhere", root / "b" / "linked")  # a symlinked folder
    os.symlink("..", root / "a" / "up")  # a loop back to the root


def test_symlinked_folders_are_followed_in_every_mode_without_looping(tmp_path, sample_photos):
    data = tmp_path / "data"
    _tree(data, sample_photos[0])
    tree = open_source(data)  # ImageFolder: classes a, b, elsewhere
    assert tree.kind == "imagefolder" and "b/linked/2.png" in tree.refs and not any("up/a" in r for r in tree.refs)
    plain = open_source(data, no_labels=True)
    assert plain.kind == "folder" and "b/linked/2.png" in plain.refs
    assert plain.refs == sorted(plain.refs, key=lambda r: Path(r).parts)
    files = [p.relative_to(data).as_posix() for p in find_images(data)]
    assert "b/linked/2.png" in files and len(files) == len(set(files))


def test_an_unreadable_folder_is_named_or_skipped(tmp_path, sample_photos, monkeypatch):
    data = tmp_path / "data"
    for rel in ("cat/0.png", "cat/locked/1.png", "dog/2.png"):
        save_image(sample_photos[0], data / rel)
    real = os.scandir

    def scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(ImageError, match=r"locked: cannot list folder \(Permission denied\)"):
        find_images(data)
    for no_labels in (False, True):
        src = open_source(data, no_labels=no_labels)
        i = src.refs.index("cat/locked/")
        with pytest.raises(ImageError, match=r"cat/locked/: cannot list folder \(Permission denied\)"):
            src.open(i)
    r = cli("extract", data, "--out", tmp_path / "x", "--workers", "0", "--quiet")
    one_line_error(r, "cat/locked/: cannot list folder")
    r = cli("extract", data, "--out", tmp_path / "y", "--workers", "0", "--quiet", "--skip-bad")
    assert r.exit_code == 0 and "1 skipped" in r.output, r.output


def test_empty_class_folders_are_an_error_as_in_torchvision(tmp_path, sample_photos):
    save_image(sample_photos[0], tmp_path / "cat" / "0.png")
    (tmp_path / "dog").mkdir()
    with pytest.raises(SourceError, match="found no valid file for the classes dog"):
        open_source(tmp_path)
    assert open_source(tmp_path, no_labels=True).refs == ["cat/0.png"]


# -- 5. file names that are not UTF-8 --------------------------------------------------------------------


def test_non_utf8_file_names_extract_and_stay_in_the_manifest(tmp_path, sample_photos):
    photos = tmp_path / "photos"
    save_image(sample_photos[0], photos / "a.png")
    try:
        save_image(sample_photos[1], photos / os.fsdecode(b"caf\xe9.png"))
    except (OSError, UnicodeError):
        pytest.skip("the file system takes only UTF-8 names")
    r = cli("extract", photos, "--out", tmp_path / "lat", "--workers", "0", "--quiet")
    assert r.exit_code == 0, r.output
    refs = json.loads((tmp_path / "lat" / "manifest.json").read_text())["source"]["refs"]
    assert os.fsencode(refs[1]) == b"caf\xe9.png" and (photos / refs[1]).is_file()
    r = cli("extract", photos, "--out", tmp_path / "lat", "--workers", "0", "--quiet")
    assert r.exit_code == 0 and "0 computed, 1 already done" in r.output, r.output
    # a UTF-8 ref hashes as before (keys of shards written earlier stay valid)
    src = Source("folder", "", ["é.png"], np.asarray([3]))
    import hashlib

    assert src.fingerprint() == hashlib.sha256("é.png\t3\n".encode()).hexdigest()


# -- 10. list files ------------------------------------------------------------------------------------------


def test_list_lines_with_spaces_and_other_encodings(tmp_path, sample_photos):
    save_image(sample_photos[0], tmp_path / "my photo.png")
    save_image(sample_photos[1], tmp_path / "b.png")
    (tmp_path / "l.txt").write_text("my photo.png\nb.png 7\nother photo.png\nmissing 2.png 4\n")
    src = open_source(tmp_path / "l.txt")
    assert src.refs == ["my photo.png", "b.png", "other photo.png", "missing 2.png"]
    assert src.labels.tolist() == [-1, 7, -1, 4]
    with pytest.raises(ImageError, match="other photo.png: no such image file"):
        src.open(2)
    (tmp_path / "typo.txt").write_text("b.png seven\n")
    with pytest.raises(SourceError, match=r"typo.txt:1: label 'seven' is not an integer"):
        open_source(tmp_path / "typo.txt")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9.png 1\n")
    assert os.fsencode(open_source(tmp_path / "latin1.txt").refs[0]) == b"caf\xe9.png"
    (tmp_path / "utf16.txt").write_text("b.png\n", encoding="utf-16")
    with pytest.raises(SourceError, match=r"utf16.txt: not a text list"):
        open_source(tmp_path / "utf16.txt")
    r = cli("extract", tmp_path / "l.txt", "--out", tmp_path / "x", "--workers", "0", "--quiet", "--skip-bad")
    assert r.exit_code == 0 and "2 skipped" in r.output, r.output
