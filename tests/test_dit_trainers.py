"""An `rpiae extract --flip` folder, read as-is by a LightningDiT-style latent dataset: the
reading contract of such trainers (`ImgLatentDataset`), written here from their documented
behaviour: glob `DATA_DIR/*.safetensors` sorted, read `labels`, `latents` and (half the time)
`latents_flip` from each file by `get_slice`, and normalise with `DATA_DIR/latents_stats.pt`
({"mean", "std"} of shape (1, C, 1, 1), loaded with torch.load)."""

from __future__ import annotations

import json
import os
import shutil
from glob import glob

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file


class LatentDirDataset(torch.utils.data.Dataset):
    """What a LightningDiT-style trainer does with a latent folder (no rpiae import)."""

    def __init__(self, data_dir: str, latent_norm: bool = True, latent_multiplier: float = 1.0, seed: int = 0):
        self.files = sorted(glob(os.path.join(data_dir, "*.safetensors")))
        self.index = []
        for f in self.files:
            with safe_open(f, framework="pt", device="cpu") as st:
                n = st.get_slice("labels").get_shape()[0]
            self.index += [(f, i) for i in range(n)]
        self.latent_norm, self.latent_multiplier = latent_norm, latent_multiplier
        if latent_norm:
            stats = torch.load(os.path.join(data_dir, "latents_stats.pt"))
            self.mean, self.std = stats["mean"], stats["std"]
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, idx):
        f, i = self.index[idx]
        with safe_open(f, framework="pt", device="cpu") as st:
            key = "latents" if self.rng.uniform(0, 1) > 0.5 else "latents_flip"
            feature = st.get_slice(key)[i : i + 1]
            label = st.get_slice("labels")[i : i + 1]
        if self.latent_norm:
            feature = (feature - self.mean) / self.std
        return (feature * self.latent_multiplier).squeeze(0), label.squeeze(0)


def _cli(*args):
    from rpiae.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tree(tmp_path_factory, sample_photos):
    root = tmp_path_factory.mktemp("tree")
    for i in range(10):
        a = (sample_photos[i % len(sample_photos)].transpose(1, 2, 0) * 255).round().astype(np.uint8)
        cls = ("bird", "cat")[i % 2]
        (root / cls).mkdir(exist_ok=True)
        Image.fromarray(a).save(root / cls / f"{i:02d}.png")
    return root


def test_a_dit_latent_dataset_reads_an_extract_folder_as_is(tmp_path, tree, trained_or_tiny_ckpt):
    out = tmp_path / "lat"
    r = _cli("extract", tree, "--out", out, "--model", trained_or_tiny_ckpt, "--shard-size", 4, "--flip",
             "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    assert sorted(os.path.basename(f) for f in glob(str(out / "*.safetensors"))) == [
        "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    ds = LatentDirDataset(str(out))
    assert len(ds) == 10
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (10, 64, 16, 16) and sorted(y.tolist()) == [0] * 5 + [1] * 5
    # the statistic: per-channel population mean/std over every latent written, flips included
    z = np.concatenate([np.concatenate([load_file(str(f))["latents"], load_file(str(f))["latents_flip"]])
                        for f in ds.files]).astype(np.float64)
    per_channel = z.transpose(1, 0, 2, 3).reshape(64, -1)
    np.testing.assert_allclose(ds.mean.flatten().numpy(), per_channel.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ds.std.flatten().numpy(), per_channel.std(1), rtol=1e-5)
    assert ds.mean.shape == ds.std.shape == (1, 64, 1, 1) and ds.mean.dtype == torch.float32
    normed = (z - per_channel.mean(1)[None, :, None, None]) / per_channel.std(1)[None, :, None, None]
    assert abs(normed.mean()) < 1e-6 and abs(normed.std() - 1) < 1e-6  # what the trainer gets, over all latents
    m = json.loads((out / "manifest.json").read_text())
    assert m["stats"]["file"] == "stats/latents_stats.safetensors" and m["stats"]["trainer_file"] == "latents_stats.pt"
    # the folder is still ours to decode and resume
    assert _cli("decode", out, "-o", tmp_path / "png", "--model", trained_or_tiny_ckpt, "--quiet").exit_code == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == 10
    r = _cli("extract", tree, "--out", out, "--model", trained_or_tiny_ckpt, "--shard-size", 4, "--flip",
             "--workers", 0, "--quiet")
    assert r.exit_code == 0 and "0 computed, 3 already done" in r.output


def test_a_folder_of_the_earlier_layout_is_read_and_moved_on(tmp_path, tree, trained_or_tiny_ckpt):
    out = tmp_path / "lat"
    args = ("extract", tree, "--out", out, "--model", trained_or_tiny_ckpt, "--shard-size", 4, "--workers", 0, "--quiet")
    assert _cli(*args).exit_code == 0
    # as written before: the exact statistics at the top level, no trainer file
    shutil.move(out / "stats" / "latents_stats.safetensors", out / "latents_stats.safetensors")
    (out / "latents_stats.pt").unlink()
    assert _cli("decode", out, "-o", tmp_path / "png", "--model", trained_or_tiny_ckpt, "--quiet").exit_code == 0
    (out / "manifest.json").unlink()  # a resume finalises the folder again, in the new layout
    r = _cli(*args)
    assert r.exit_code == 0 and "3 already done" in r.output
    assert not (out / "latents_stats.safetensors").exists() and (out / "stats" / "latents_stats.safetensors").is_file()
    assert (out / "latents_stats.pt").is_file()


def test_without_flip_shards_have_no_latents_flip(tmp_path, tree, trained_or_tiny_ckpt):
    """Trainers that pick `latents_flip` half the time need `--flip` (said in the README)."""
    out = tmp_path / "lat"
    assert _cli("extract", tree, "--out", out, "--model", trained_or_tiny_ckpt, "--shard-size", 10, "--workers", 0,
                "--quiet").exit_code == 0
    with safe_open(str(out / "shard-00000.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"latents", "labels", "index"}
