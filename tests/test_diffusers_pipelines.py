"""AutoencoderRPiAE in diffusers' own pipelines, as their documented contracts use a VAE:
the config fields a pipeline reads at construction (`block_out_channels` for the spatial
factor, `latent_channels`, `shift_factor`, `force_upcast`), slicing, gradient checkpointing,
and DiTPipeline's decode (`vae.decode(latents / scaling_factor)`), which is right for a DiT
trained on normalised latents only when the VAE maps them back itself (`latents_normalized`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel, PixArtAlphaPipeline, PixArtTransformer2DModel  # noqa: E402

from rpiae.integrations.diffusers import AutoencoderRPiAE  # noqa: E402
from rpiae.model import RPiAE  # noqa: E402


@pytest.fixture(scope="module")
def model(trained_or_tiny_ckpt):
    return RPiAE.from_checkpoint(trained_or_tiny_ckpt).float().eval()


@pytest.fixture(scope="module")
def stats(model, sample_photos):
    """Per-element statistics as `rpiae extract` computes them (here from a few photos)."""
    with torch.no_grad():
        z = model.encode(torch.from_numpy(sample_photos))
    return z.mean(0), z.var(0) + 0.05


def _dit(channels: int, size: int) -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=channels, out_channels=channels,
                                 num_layers=1, sample_size=size, patch_size=2, num_embeds_ada_norm=4).eval()


def test_config_fields_pipelines_read(model):
    vae = AutoencoderRPiAE.from_rpiae(model)
    c, h, _ = model.config.latent_shape
    assert 2 ** (len(vae.config.block_out_channels) - 1) == model.config.image_size // h == 16
    assert vae.config.latent_channels == c and vae.config.in_channels == vae.config.out_channels == 3
    assert vae.config.shift_factor is None and vae.config.force_upcast is True
    assert vae.config.sample_size == model.config.image_size
    with pytest.raises(ValueError, match="latent_channels"):  # never declared twice: a wrong value is refused
        AutoencoderRPiAE(rpiae_config=model.config.to_dict(), latent_channels=c + 1)


def test_pixart_pipeline_accepts_the_vae_and_runs(model):
    torch.manual_seed(0)
    vae = AutoencoderRPiAE.from_rpiae(model)
    c, h, _ = model.config.latent_shape
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=c, out_channels=c,
                                           num_layers=1, sample_size=h, patch_size=2, caption_channels=16,
                                           cross_attention_dim=16, norm_type="ada_norm_single",
                                           use_additional_conditions=False).eval()
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                               scheduler=DDIMScheduler())
    assert pipe.vae_scale_factor == 16
    emb = torch.randn(1, 4, 16)
    out = pipe(prompt_embeds=emb, prompt_attention_mask=torch.ones(1, 4), guidance_scale=1.0, num_inference_steps=2,
               height=256, width=256, use_resolution_binning=False, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 256, 256) and torch.isfinite(out.images).all()


def test_dit_pipeline_decodes_normalised_latents_right(model, stats):
    """A DiT trained on (z - mean) / std: DiTPipeline hands `latents / scaling_factor` to
    `vae.decode`. With `latents_normalized`, that decodes like RPiAE.decode of the raw latent."""
    mean, var = stats
    eps = model.config.latent_norm_eps
    normed = RPiAE.from_checkpoint(model.source).float().set_latent_stats(mean, var, eps).eval()
    c, h, _ = model.config.latent_shape
    seen = []

    def run(vae):
        pipe = DiTPipeline(transformer=_dit(c, h), vae=vae, scheduler=DDIMScheduler())
        decode = vae.decode

        def recording(z, *a, **k):
            seen.append(z.detach().clone())
            return decode(z, *a, **k)

        vae.decode = recording
        with torch.no_grad():
            return pipe(class_labels=[1], num_inference_steps=2, guidance_scale=1.0, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images

    right = run(AutoencoderRPiAE.from_rpiae(normed, latents_normalized=True, scaling_factor=0.5))
    y = seen[-1]  # what the pipeline decoded: the DiT's (normalised) latent / scaling_factor
    with torch.no_grad():
        expected = normed.decode(y).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # RPiAE maps it back itself
        raw = model.decode(y * torch.sqrt(var + eps) + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(right, expected, atol=2e-5)
    np.testing.assert_allclose(expected, raw, atol=2e-5)
    plain = run(AutoencoderRPiAE.from_rpiae(model, scaling_factor=0.5))  # no mapping back: wrong numbers
    assert np.abs(plain - right).mean() > 0.01


def test_latents_normalized_encode_decode_round_trip(model, stats, sample_photos):
    mean, var = stats
    normed = RPiAE.from_checkpoint(model.source).float().set_latent_stats(mean, var).eval()
    vae = AutoencoderRPiAE.from_rpiae(normed, latents_normalized=True)
    x = torch.from_numpy(sample_photos[:2])
    with torch.no_grad():
        post = vae.encode(x * 2 - 1).latent_dist
        torch.testing.assert_close(post.mode(), normed.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close((vae.decode(post.mode()).sample + 1) / 2, normed.decode(normed.encode(x)), atol=1e-5, rtol=0)
        # its spread is the raw posterior's divided by std
        raw = AutoencoderRPiAE.from_rpiae(model).encode(x * 2 - 1).latent_dist
        torch.testing.assert_close(post.std, raw.std / torch.sqrt(var + 1e-5), atol=1e-5, rtol=1e-4)


def test_slicing_is_exact_and_tiling_says_why_not(model, sample_photos):
    vae = AutoencoderRPiAE.from_rpiae(model)
    x = torch.from_numpy(sample_photos[:3]) * 2 - 1
    with torch.no_grad():
        whole = vae.decode(vae.encode(x).latent_dist.mode()).sample
        vae.enable_slicing()
        sliced = vae.decode(vae.encode(x).latent_dist.mode()).sample
    torch.testing.assert_close(sliced, whole, atol=1e-5, rtol=0)
    with pytest.raises(NotImplementedError, match="attend over the whole"):
        vae.enable_tiling()


def test_gradient_checkpointing_gives_the_same_gradients(model, sample_photos):
    x = torch.from_numpy(sample_photos[:2]) * 2 - 1

    def grads(checkpointing):
        vae = AutoencoderRPiAE.from_rpiae(model).train()
        if checkpointing:
            vae.enable_gradient_checkpointing()
        loss = vae(x).sample.square().mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-5, rtol=1e-4)


def test_per_element_statistics_are_weights_and_survive_from_pretrained(model, stats, tmp_path, sample_photos):
    mean, var = stats
    normed = RPiAE.from_checkpoint(model.source).float().set_latent_stats(mean, var).eval()
    vae = AutoencoderRPiAE.from_rpiae(normed)
    vae.save_pretrained(tmp_path / "vae")
    config = (tmp_path / "vae" / "config.json").read_text()
    assert len(config) < 20_000 and vae.config.latents_mean is None and vae.config.latents_stats == "element"
    again = AutoencoderRPiAE.from_pretrained(tmp_path / "vae")
    x = torch.from_numpy(sample_photos[:2])
    with torch.no_grad():
        z = model.encode(x)
        torch.testing.assert_close(again.normalize_latents(z), normed.encode(x), atol=1e-5, rtol=1e-5)
        loaded = RPiAE.from_pretrained(tmp_path / "vae")  # keeps the statistics: the same latent as the model saved
        assert loaded.config.latent_norm
        torch.testing.assert_close(loaded.encode(x), normed.encode(x), atol=1e-5, rtol=1e-5)
