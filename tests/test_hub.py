"""Hugging Face: `RPiAE.from_pretrained` (local folder, pre-filled cache, offline), `--model hf://...`,
the diffusers class `AutoencoderRPiAE`, and `rpiae push`. No network: a local cache stands in."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rpiae import RPiAE
from rpiae.hub import RELEASE_FILE, RELEASE_REPO, HubError

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed")
from rpiae.integrations.diffusers import AutoencoderRPiAE  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cli(*args, env=None):
    from rpiae.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def fill_cache(cache, repo_id: str, files: dict) -> None:
    """The Hub cache layout huggingface_hub reads: refs/main -> snapshots/<commit>/<file>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        shutil.copyfile(src, snap / name)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def model(trained_or_tiny_ckpt):
    return RPiAE.from_checkpoint(trained_or_tiny_ckpt).float()


@pytest.fixture(scope="module")
def x(photos):
    return torch.from_numpy(photos[:4])


def test_diffusers_class_gives_the_same_numbers(model, x, tmp_path):
    vae = AutoencoderRPiAE.from_rpiae(model)
    with torch.no_grad():
        z = model.encode(x)
        post = vae.encode(x * 2 - 1).latent_dist  # diffusers' image range
        tol = 1e-6 * float(z.abs().max())
        assert float((post.mean - z).abs().max()) <= tol and float((post.mode() - z).abs().max()) <= tol
        assert post.sample(generator=torch.Generator().manual_seed(0)).shape == z.shape
        torch.testing.assert_close(post.logvar, model.posterior(x).logvar, atol=1e-5, rtol=1e-5)
        y = vae.decode(z).sample
        torch.testing.assert_close((y + 1) / 2, model.decode(z), atol=1e-6, rtol=0)
        # save_pretrained / from_pretrained, and back to RPiAE: the same weights
        vae.save_pretrained(tmp_path / "vae")
        again = AutoencoderRPiAE.from_pretrained(tmp_path / "vae")
        torch.testing.assert_close(again.encode(x * 2 - 1).latent_dist.mean, post.mean, rtol=0, atol=0)
        back = again.to_rpiae()
        for k, v in model.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), k
        assert torch.equal(RPiAE.from_pretrained(tmp_path / "vae").encode(x), z)


def test_latent_statistics_in_the_config(model, x, tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    mean, var = rng.normal(0, 1, (64, 16, 16)), rng.uniform(0.5, 3, (64, 16, 16))
    stats = tmp_path / "latents_stats.safetensors"
    save_file({"mean": mean, "var": var, "channel_mean": mean.mean((1, 2)), "channel_var": var.mean((1, 2))}, str(stats))
    per_channel = AutoencoderRPiAE.from_rpiae(model, latent_stats=stats, scaling_factor=0.5)
    assert len(per_channel.config.latents_mean) == 64 and per_channel.config.scaling_factor == 0.5
    element = AutoencoderRPiAE.from_rpiae(model, latent_stats=stats, per="element")
    with torch.no_grad():
        z = model.encode(x)
        # per element, the pipelines' normalisation is exactly what `rpiae encode --latent-stats` returns
        normed = RPiAE.from_checkpoint(model.source).float().set_latent_stats(torch.tensor(mean).float(), torch.tensor(var).float())
        torch.testing.assert_close(element.normalize_latents(element.encode(x * 2 - 1).latent_dist.mean), normed.encode(x),
                                   atol=1e-5, rtol=1e-5)
        # a model that carries its statistics moves them into the config, and back to raw latents
        moved = AutoencoderRPiAE.from_rpiae(normed)
        torch.testing.assert_close(moved.encode(x * 2 - 1).latent_dist.mean, z, atol=1e-5, rtol=0)
        torch.testing.assert_close(per_channel.denormalize_latents(per_channel.normalize_latents(z)), z, atol=1e-5, rtol=1e-5)


def test_from_pretrained_offline_cache_and_release_default(model, x, tmp_path, offline_cache):
    # the authors' release file for the default repository, in the cache
    release = tmp_path / RELEASE_FILE
    torch.save({"ema": model.state_dict(), "disc": {"w": torch.zeros(1)}}, release)
    fill_cache(offline_cache, RELEASE_REPO, {RELEASE_FILE: release})
    loaded = RPiAE.from_pretrained()
    assert torch.equal(loaded.encode(x), model.encode(x))
    # a repository in the project's (diffusers) layout
    AutoencoderRPiAE.from_rpiae(model).save_pretrained(tmp_path / "vae")
    fill_cache(offline_cache, "someone/rpiae-tiny", {n: tmp_path / "vae" / n for n in ("config.json", "diffusion_pytorch_model.safetensors")})
    assert torch.equal(RPiAE.from_pretrained("someone/rpiae-tiny").encode(x), model.encode(x))
    assert torch.equal(RPiAE.from_pretrained("hf://someone/rpiae-tiny@main").encode(x), model.encode(x))
    # what is not cached is one clear error
    with pytest.raises(HubError, match="not in the local Hugging Face cache.*offline"):
        RPiAE.from_pretrained("someone/missing")


def test_cli_model_hf_reference(model, tmp_path, offline_cache, photos):
    from PIL import Image

    AutoencoderRPiAE.from_rpiae(model).save_pretrained(tmp_path / "vae")
    fill_cache(offline_cache, "someone/rpiae-tiny", {n: tmp_path / "vae" / n for n in ("config.json", "diffusion_pytorch_model.safetensors")})
    img = tmp_path / "p.png"
    Image.fromarray((photos[0].transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(img)
    r = cli("encode", "--model", "hf://someone/rpiae-tiny", img, "-o", tmp_path / "z.npy", "--workers", 0)
    assert r.exit_code == 0, r.output
    from rpiae.imageio import load_image

    with torch.no_grad():
        ref = model.encode(torch.from_numpy(load_image(img)[None])).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "z.npy"), ref, atol=1e-5)
    r = cli("encode", "--model", "hf://someone/missing", img, "-o", tmp_path / "z2.npy")
    assert r.exit_code == 1 and r.output.startswith("Error: someone/missing: not in the local Hugging Face cache")


def test_unreachable_hub_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(c, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("time.sleep", lambda s: None)  # huggingface_hub's retry back-off, which takes ~24 s
    with pytest.raises(HubError) as e:
        RPiAE.from_pretrained("someone/rpiae-tiny")
    assert str(e.value).startswith("someone/rpiae-tiny: not in the local Hugging Face cache and the Hub cannot be reached")
    assert "\n" not in str(e.value)


def test_push_writes_the_repository_and_uploads_it(model, tmp_path, monkeypatch, trained_or_tiny_ckpt):
    report = {"format": "rpiae-eval", "data": "sample photos", "command": "rpiae eval photos", "rows": [
        {"backend": "torch", "precision": "fp32", "n": 9, "psnr": 23.1, "ssim": 0.66, "lpips": "skipped: --lpips-weights", "rfid": None}]}
    (tmp_path / "eval.json").write_text(json.dumps(report))
    r = cli("push", "me/tiny", "--model", trained_or_tiny_ckpt, "--eval", tmp_path / "eval.json", "--dry-run", "--out", tmp_path / "repo")
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in (tmp_path / "repo").iterdir())
    assert files == ["README.md", "config.json", "diffusion_pytorch_model.safetensors"]
    card = (tmp_path / "repo" / "README.md").read_text()
    assert "library_name: rpiae" in card and "| torch | fp32 | 9 | 23.1 | 0.66 |" in card and 'from_pretrained("me/tiny")' in card
    assert torch.equal(RPiAE.from_pretrained(tmp_path / "repo").decoder.decoder_pred.weight, model.decoder.decoder_pred.weight)

    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls["create"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, revision, commit_message):
            calls["upload"] = (repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir()))
            return type("Info", (), {"commit_url": "https://huggingface.co/me/tiny/commit/1"})()

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    r = cli("push", "me/tiny", "--model", trained_or_tiny_ckpt, "--private")
    assert r.exit_code == 0, r.output
    assert calls["create"] == ("me/tiny", True, True)
    assert calls["upload"] == ("me/tiny", ["README.md", "config.json", "diffusion_pytorch_model.safetensors"])
    assert "uploaded me/tiny: https://huggingface.co/me/tiny/commit/1" in r.output
    r = cli("push", "not a repo", "--model", trained_or_tiny_ckpt, "--dry-run", "--out", tmp_path / "x")
    assert r.exit_code == 1 and "hf://owner/name" in r.output


def test_model_card_names_the_family():
    from rpiae.config import get_preset
    from rpiae.publish import model_card

    assert "PS-VAE image tokenizer" in model_card("me/p", get_preset("ps-vae-tiny").to_dict())
    assert "RPiAE image tokenizer" in model_card("me/r", get_preset("tiny").to_dict())
    assert "(96, 16, 16)" in model_card("me/p", get_preset("ps-vae").to_dict())
