"""The model: shapes, numerics of the release, parameter counts of the paper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rpiae import PRESETS, RPiAE, RPiAEConfig
from rpiae.modules.pixel_decoder import sincos_pos_embed_2d


def test_shapes_and_dtypes(tiny_model):
    x = torch.rand(3, 3, 256, 256)
    with torch.no_grad():
        z = tiny_model.encode(x)
        y = tiny_model.decode(z)
        tokens = tiny_model.tokens(x)
    assert z.shape == (3, 64, 16, 16) and z.dtype == torch.float32
    assert y.shape == (3, 3, 256, 256) and y.dtype == torch.float32
    assert tokens.shape == (3, 256, tiny_model.config.encoder_hidden_size)


def test_any_input_size_is_resized_to_224(tiny_model):
    x = torch.rand(2, 3, 300, 180)
    with torch.no_grad():
        z = tiny_model.encode(x)
        z_ref = tiny_model.encode(F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False))
    assert z.shape == (2, 64, 16, 16)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=0)


def test_batch_independence(tiny_model):
    x = torch.rand(4, 3, 256, 256)
    with torch.no_grad():
        z = tiny_model.encode(x)
        z1 = torch.cat([tiny_model.encode(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(z, z1, rtol=1e-5, atol=1e-5)


def test_latent_is_posterior_mean_and_logvar_clamped(tiny_model):
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        tokens = tiny_model.tokens(x)
        moments = tiny_model.vb_feature_encoder.moments(tokens)
        post = tiny_model.vb_feature_encoder(tokens)
    assert moments.shape == (2, 128, 16, 16)
    assert torch.equal(post.mean, moments[:, :64])
    with torch.no_grad():
        assert torch.equal(tiny_model.encode(x), moments[:, :64])  # the mean, never a sample
    big = torch.cat([moments[:, :64], torch.full_like(moments[:, 64:], 100.0)], 1)
    from rpiae.modules.bridge import DiagonalGaussian

    assert DiagonalGaussian(big).logvar.max().item() == 20.0


def test_decoder_output_is_unnormalised_not_clamped(tiny_model):
    import copy

    tiny_model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        tiny_model.decoder.decoder_pred.bias.fill_(3.0)  # pushes outputs beyond [0, 1]
    z = torch.randn(1, 64, 16, 16)
    with torch.no_grad():
        raw = tiny_model.decoder(tiny_model.vb_feature_decoder(z))
        y = tiny_model.decode(z)
    std = torch.tensor(tiny_model.config.std).view(1, 3, 1, 1)
    mean = torch.tensor(tiny_model.config.mean).view(1, 3, 1, 1)
    torch.testing.assert_close(y, raw * std + mean)
    assert y.max() > 1.5  # no clamp inside the model


def test_pos_embed_is_baked_with_antialiased_bicubic(tiny_model):
    emb = tiny_model.encoder.encoder.embeddings
    pos = emb.position_embeddings
    g = tiny_model.config.encoder_pos_grid
    patch = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(patch, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    ref = torch.cat([pos[:, :1], ref.permute(0, 2, 3, 1).reshape(1, 256, -1)], 1)
    torch.testing.assert_close(tiny_model.encoder.pos_embed, ref, rtol=0, atol=0)
    assert "encoder.pos_embed" not in tiny_model.state_dict()  # not a checkpoint key


def test_baked_pos_embed_follows_weight_changes():
    model = RPiAE.from_preset("tiny")
    before = model.encoder.pos_embed.clone()
    sd = model.state_dict()
    sd["encoder.encoder.embeddings.position_embeddings"] = sd["encoder.encoder.embeddings.position_embeddings"] + 1.0
    model.load_state_dict(sd)
    torch.testing.assert_close(model.encoder.pos_embed[:, 1:], before[:, 1:] + 1.0, rtol=0, atol=1e-5)


def test_sincos_matches_mae_formula():
    import numpy as np

    def mae(embed_dim, grid_size):  # MAE's numpy reference, written out independently
        gh = np.arange(grid_size, dtype=np.float32)
        gw = np.arange(grid_size, dtype=np.float32)
        grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid_size, grid_size)

        def one(d, pos):
            omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
            out = np.einsum("m,d->md", pos.reshape(-1), omega)
            return np.concatenate([np.sin(out), np.cos(out)], axis=1)

        emb = np.concatenate([one(embed_dim // 2, grid[0]), one(embed_dim // 2, grid[1])], axis=1)
        return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)

    ours = sincos_pos_embed_2d(64, 16).numpy()
    np.testing.assert_allclose(ours, mae(64, 16), atol=1e-6)


def test_token_noise_is_per_sample_and_bounded():
    torch.manual_seed(0)
    t = torch.zeros(64, 256, 8)
    noised = RPiAE.add_token_noise(t, tau=0.8)
    stds = noised.flatten(1).std(1)
    assert stds.max() < 0.85 and stds.min() >= 0 and stds.std() > 0.1


@pytest.mark.slow
def test_rpiae_b_parameter_counts_match_paper_table6():
    with torch.device("meta"):
        model = RPiAE(PRESETS["rpiae-b"])
    counts = {k: round(v / 1e6, 2) for k, v in model.parameter_counts().items()}
    assert counts == {"encoder": 86.58, "vb_encoder": 4.24, "vb_decoder": 43.17, "pixel_decoder": 415.35}
    assert len(model.state_dict()) == 770


def test_config_round_trip_and_validation():
    cfg = PRESETS["tiny"]
    assert RPiAEConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown config fields"):
        RPiAEConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="divisible"):
        RPiAEConfig(encoder_heads=7)
    with pytest.raises(ValueError, match="unknown preset"):
        RPiAE.from_preset("huge")


def test_flops_rpiae_b_match_design_estimate():
    f = PRESETS["rpiae-b"].flops()
    assert 45e9 < f["encode"] < 55e9  # design reference: about 49.5 GFLOP
    assert 235e9 < f["decode"] < 255e9  # about 244.5 GFLOP
