"""The training recipe as the authors' code runs it (360CVGroup/RPiAE, src/train_stage1_rpiae_*.py,
src/disc/*, the stage 1/2/3 yaml configs): one test per difference from earlier behaviour.

The reference computations here are written from the authors' code, independently of ours.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from rpiae.imageio import quantize_8bit
from rpiae.training.config import TrainConfig, load_train_config, parse_override
from rpiae.training.discriminator import BatchNormLocal, DinoFeatures, SpectralNormVU, diff_augment, spectral_normed
from rpiae.training.stages import DECODER_POS_EMBED, trainable_names
from rpiae.training.trainer import Trainer
from tests.conftest import make_tiny
from tests.test_training import make_cfg, make_trainer, small_disc


@pytest.fixture(scope="module")
def batch(photos) -> torch.Tensor:
    return torch.from_numpy(photos[:2]).clone()


# 1. stage II trains the bridge on the posterior mean -------------------------------------------


@pytest.mark.parametrize("sample", [False, True])
def test_stage2_loss_uses_the_posterior_mean(sample, batch, tmp_path):
    trainer = make_trainer(2, tmp_path, sample_posterior=sample)
    m, x = trainer.model, batch[:2]
    torch.manual_seed(5)
    _, logs, _ = trainer.compute_losses(x)

    torch.manual_seed(5)
    with torch.no_grad():
        tokens = m.tokens(x)
        sigma = 0.8 * torch.rand(2, 1, 1)
        noised = tokens + sigma * torch.randn(tokens.shape)
        post = m.vb_feature_encoder(noised)
        z = post.mean + post.std * torch.randn(post.mean.shape) if sample else post.mean
        tokens_hat = m.vb_feature_decoder(z)
        feat = F.mse_loss(tokens_hat, tokens).item()
        kl = (post.mean**2 + post.var - 1 - post.logvar).mean().item()
        l1 = (m.decode_tokens(tokens_hat) - x).abs().mean().item()
    assert logs["feat"] == pytest.approx(feat, rel=1e-5)
    assert logs["kl"] == pytest.approx(kl, rel=1e-5)
    assert logs["l1"] == pytest.approx(l1, rel=1e-5)
    assert logs["loss"] == pytest.approx(feat + 1e-3 * kl + 0.05 * l1, rel=1e-5)


# 2. the generator's learning rate: the yaml's cosine, floor at epoch 16 -----------------------------


def yaml_cosine(step: int, spe: int, warmup_epochs=1, decay_end_epoch=16, base=2e-4, final=2e-5) -> float:
    """utils/optim_utils.build_scheduler, type cosine, warmup_from_zero: true."""
    warm, end = int(warmup_epochs * spe), int(decay_end_epoch * spe)
    if step < warm:
        return base * (step + 1) / warm
    if step >= end:
        return final
    p = (step - warm) / max(end - warm, 1)
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * p))


@pytest.mark.parametrize("stage,epochs", [(1, 16), (2, 32), (3, 16)])
def test_lr_schedule_matches_the_authors_configs(stage, epochs, tmp_path):
    spe = 10
    cfg = load_train_config(stage)
    assert (cfg.epochs, cfg.warmup_epochs, cfg.decay_epochs, cfg.lr, cfg.min_lr) == (epochs, 1.0, 16.0, 2e-4, 2e-5)
    trainer = Trainer(make_tiny(), cfg, tmp_path, steps_per_epoch=spe)
    seen = []
    for step in range(epochs * spe + 1):  # one past the end: where the floor is
        seen.append(trainer.opt.param_groups[0]["lr"])
        trainer.opt.step()
        trainer.sched.step()
    for step, lr in enumerate(seen):
        assert lr == pytest.approx(yaml_cosine(step, spe), rel=1e-9), step
    assert seen[0] == pytest.approx(2e-5)  # warm-up from 0: 1/10 of the base after the first step
    assert seen[16 * spe] == pytest.approx(2e-5)  # the floor at epoch 16 ...
    assert seen[-1] == pytest.approx(2e-5)  # ... and flat after it (stage II's second half)
    assert seen[8 * spe] > 1e-4


# 3. and 10. the discriminator step: fresh fakes from the updated model, no noise, 8 bits -----------


def record_disc_inputs(trainer):
    """The discriminator's inputs before DiffAug, in the order it augments them, and its mode."""
    calls = []
    augment = trainer.disc.augment

    def recording(x):
        calls.append((x.detach().clone(), trainer.disc.training))
        return augment(x)

    trainer.disc.augment = recording
    return calls


@pytest.mark.parametrize("stage", [1, 3])
def test_disc_fakes_come_from_the_updated_model_without_noise(stage, batch, tmp_path):
    trainer = make_trainer(stage, tmp_path, lpips=False)
    x = batch[:2]
    calls = record_disc_inputs(trainer)
    trainer.train_step([x])
    # generator step (disc in eval mode), then fake and real of the discriminator step (train mode)
    assert [training for _, training in calls] == [False, True, True]
    gen_fake, fake, real = (c for c, _ in calls)
    assert torch.equal(real, x * 2 - 1)

    m = trainer.model
    m.eval()
    with torch.no_grad():  # the *updated* weights, eval mode: no token noise
        recon = m.decode_tokens(m.tokens(x)) if stage == 1 else m(x)
    expected = torch.round(recon.clamp(0, 1) * 255) / 255 * 2 - 1
    assert torch.allclose(fake, expected, atol=1e-6)
    levels = (fake + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-3) and fake.min() >= -1 and fake.max() <= 1  # 8 bits
    # 9. the generator step's fake is the raw reconstruction, not clamped or rounded
    assert not torch.allclose(gen_fake, expected, atol=1e-3)
    gen_levels = (gen_fake + 1) * 127.5
    assert (gen_levels - gen_levels.round()).abs().max() > 0.01

    # the switch restores the older behaviour: the generator step's own reconstruction
    old = make_trainer(stage, tmp_path, lpips=False, disc_fresh_fakes=False)
    calls = record_disc_inputs(old)
    old.train_step([x])
    gen_fake, fake, _ = (c for c, _ in calls)
    assert torch.allclose(fake, torch.round(((gen_fake + 1) / 2).clamp(0, 1) * 255) / 255 * 2 - 1, atol=1e-6)


def test_spectral_norm_power_iteration_only_in_the_disc_step(batch, tmp_path):
    # the GAN term is on, discriminator updates not yet: its buffers must not move
    trainer = make_trainer(1, tmp_path, lpips=False, gan_start_epoch=0.0, disc_start_epoch=1.0)
    before = {k: v.clone() for k, v in trainer.disc.heads.state_dict().items()}
    logs = trainer.train_step([batch[:1]])
    assert "w_gan" in logs and "d_loss" not in logs
    for k, v in trainer.disc.heads.state_dict().items():
        assert torch.equal(v, before[k]), k


# 4. the discriminator's own learning-rate schedule ---------------------------------------------------


def test_disc_lr_schedule(batch, tmp_path):
    spe = 10
    cfg = make_cfg(1, lr=2e-4, min_lr=2e-5, warmup_epochs=1.0, disc_lr=2e-4, disc_min_lr=2e-5, disc_warmup_epochs=1.0,
                   disc_decay_epochs=16.0, gan_start_epoch=0.0, disc_start_epoch=0.2)
    trainer = Trainer(make_tiny(), cfg, tmp_path, disc=small_disc(), steps_per_epoch=spe)
    x = batch[:1]
    for _ in range(2):  # epoch 0.0 and 0.1: no discriminator update, its schedule does not move
        assert "d_loss" not in trainer.train_step([x])
    assert trainer.disc_sched.last_epoch == 0
    logs = trainer.train_step([x])  # the first update runs at 1/10 of the base: warm-up from 0
    assert logs["d_lr"] == pytest.approx(2e-5)
    assert trainer.opt.param_groups[0]["lr"] == pytest.approx(yaml_cosine(3, spe))  # the generator's own
    # the authors' stage: updates from epoch 6 to 16 = 100 updates at 10 steps per epoch
    used = [logs["d_lr"]]
    for _ in range(99):
        used.append(trainer.disc_opt.param_groups[0]["lr"])
        trainer.disc_opt.step()
        trainer.disc_sched.step()
    for i, lr in enumerate(used):
        assert lr == pytest.approx(yaml_cosine(i, spe), rel=1e-9), i
    assert trainer.disc_opt.param_groups[0]["lr"] == pytest.approx(8.22e-5, rel=1e-3)  # where it ends, far above the floor


# 5. heads normalise each sample on its own ---------------------------------------------------------------


def test_disc_heads_normalise_per_sample():
    torch.manual_seed(0)
    bn = BatchNormLocal(8)
    assert (bn.virtual_bs, bn.eps) == (1, 1e-6)
    a, b = torch.randn(1, 8, 50), torch.randn(3, 8, 50) * 5 + 2
    together = bn(torch.cat([a, b]))
    assert torch.allclose(together[:1], bn(a), atol=1e-6)  # no statistics shared across the batch
    ref = (a - a.mean(dim=(0, 2), keepdim=True)) / torch.sqrt(a.var(dim=(0, 2), keepdim=True, unbiased=False) + 1e-6)
    assert torch.allclose(bn(a), ref, atol=1e-5)
    assert bn(a.half()).dtype == torch.float32  # statistics in fp32

    disc = small_disc()
    disc.diffaug = False
    disc.eval()
    img = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(disc(img)[:1], disc(img[:1]), atol=1e-5)


# 6. the feature taps, the token count, the MLP's GELU, DiffAug's order ---------------------------------


def test_disc_feature_taps():
    torch.manual_seed(0)
    net = DinoFeatures(dim=32, depth=12, heads=2, patch=8)
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        feats = net(x)
        # written out: bilinear to 224, normalise, patchify, CLS, pos-embed, 12 blocks with tanh GELU
        h = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        h = ((h + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        h = net.patch_embed.proj(h).flatten(2).transpose(1, 2)
        h = torch.cat([net.cls_token.expand(2, -1, -1), h], 1) + net.pos_embed
        taps = {}
        for i, blk in enumerate(net.blocks):
            b, n, c = h.shape
            qkv = blk.attn.qkv(blk.norm1(h)).view(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
            att = ((qkv[0] @ qkv[1].transpose(-2, -1)) / math.sqrt(c // 2)).softmax(-1) @ qkv[2]
            h = h + blk.attn.proj(att.transpose(1, 2).reshape(b, n, c))
            y = blk.mlp.fc1(blk.norm2(h))
            y = 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))
            h = h + blk.mlp.fc2(y)
            taps[i] = h
    expected = [h] + [taps[i] for i in (2, 5, 8, 11)]  # the last block's output (not normed) first
    assert len(feats) == 5
    for f, e in zip(feats, expected):
        assert f.shape == (2, 32, 784)  # (B, C, N): 28x28 tokens, CLS dropped
        assert torch.allclose(f, e[:, 1:].transpose(1, 2), atol=1e-5)


def styleganT_diffaug(x: torch.Tensor) -> torch.Tensor:
    """StyleGAN-T's DiffAug.aug(prob=1, cutout=0), transcribed (translation, then colour)."""
    torch.rand(3)
    B, dev = x.shape[0], x.device
    rand01 = torch.rand(7, B, 1, 1, device=dev)
    raw_h, raw_w = x.shape[-2:]
    dh, dw = round(raw_h * 0.125), round(raw_w * 0.125)
    th = rand01[0].mul(dh + dh + 1).floor().long() - dh
    tw = rand01[1].mul(dw + dw + 1).floor().long() - dw
    gb, gh, gw = torch.meshgrid(torch.arange(B), torch.arange(raw_h), torch.arange(raw_w), indexing="ij")
    gh = (gh + th).add_(1).clamp_(0, raw_h + 1)
    gw = (gw + tw).add_(1).clamp_(0, raw_w + 1)
    x = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0]).permute(0, 2, 3, 1).contiguous()[gb, gh, gw].permute(0, 3, 1, 2)
    x = x.add(rand01[2].unsqueeze(-1).sub(0.5))
    m = x.mean(dim=1, keepdim=True)
    x = x.sub(m).mul(rand01[3].unsqueeze(-1).mul(2)).add_(m)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return x.sub(m).mul(rand01[4].unsqueeze(-1).add(0.5)).add_(m)


def test_diffaug_is_translation_then_colour():
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    torch.manual_seed(3)
    ours = diff_augment(x)
    torch.manual_seed(3)
    ref = styleganT_diffaug(x)
    assert torch.allclose(ours, ref, atol=1e-6)
    # translation first: the zero fill goes through the colour jitter, so no border is exactly 0
    torch.manual_seed(0)
    y = diff_augment(torch.ones(8, 3, 64, 64))
    assert float((y == 0).float().mean()) == 0.0
    assert ours.dtype == torch.float32 and diff_augment(x.half()).dtype == torch.float32


# 7. D's pos-embed trains in stages I and III ------------------------------------------------------------


@pytest.mark.parametrize("stage,trains", [(1, True), (2, False), (3, True)])
def test_decoder_pos_embed_trainable_per_stage(stage, trains, batch, tmp_path):
    trainer = make_trainer(stage, tmp_path, gan=False, lpips=False)
    assert (DECODER_POS_EMBED in trainable_names(trainer.model, trainer.cfg)) == trains
    pos = trainer.model.decoder.decoder_pos_embed
    assert pos.requires_grad == trains
    before = pos.detach().clone()
    trainer.train_step([batch[:1]])
    assert (not torch.equal(before, pos.detach())) == trains
    # the paper's fixed sin-cos table, on request
    fixed = make_trainer(stage, tmp_path, gan=False, lpips=False, train_decoder_pos_embed=False)
    assert not fixed.model.decoder.decoder_pos_embed.requires_grad
    assert "encoder.encoder.embeddings.mask_token" not in trainable_names(fixed.model, fixed.cfg)


# an addition outside the authors' recipe, off by default ----------------------------------------------


def test_image_gradient_term(batch, tmp_path):
    from rpiae.training.losses import image_gradient_l1

    x = batch[:1]
    assert load_train_config(3).grad_weight == 0.0
    seams = x.clone()
    seams[..., :, 16::16] += 0.1  # a step at every 16-pixel column border
    g = image_gradient_l1(seams, x).item()
    # 15 of the 255 horizontal differences per row change by 0.1 (twice each: the step up and back down
    # lands on the next column), vertical ones not at all
    expected = 0.5 * (0.1 * 15 * 2 * 256 * 3 / (255 * 256 * 3)) + 0.0
    assert g == pytest.approx(expected, rel=1e-3)
    assert image_gradient_l1(x + 0.3, x).item() == pytest.approx(0.0, abs=1e-6)  # a constant offset has no gradient
    trainer = make_trainer(3, tmp_path, gan=False, lpips=False, grad_weight=2.0)
    _, logs, _ = trainer.compute_losses(x)
    assert logs["loss"] == pytest.approx(logs["l1"] + 2.0 * logs["grad"], rel=1e-6)


# 11. a new run's pixel decoder keeps PyTorch's default Linear init --------------------------------------


def _decoder_linears(model) -> dict[str, nn.Linear]:
    layer = model.decoder.decoder_layers[0]
    return {"mlp output": layer.output.dense, "query": layer.attention.attention.query,
            "decoder_pred": model.decoder.decoder_pred}


@pytest.mark.parametrize("scheme", ["torch", "normal"])
def test_new_run_decoder_init(scheme):
    """PyTorch's default Linear init draws weights and biases from U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    std 1/sqrt(3 fan_in): at rpiae-b's sizes 0.0090 for the MLP output (fan-in 4096) and 0.017 for
    the query and decoder_pred (1152), the authors' decoder's. "normal" is normal(0.02), zero biases."""
    from rpiae.training.run import _new_model

    assert TrainConfig().decoder_init == "torch"
    with pytest.raises(ValueError, match="decoder_init"):
        TrainConfig(decoder_init="xavier")
    assert round(1 / math.sqrt(3 * 4096), 4) == 0.0090 and round(1 / math.sqrt(3 * 1152), 3) == 0.017
    torch.manual_seed(0)
    model = _new_model("rpiae", "tiny", None, scheme)
    for name, lin in _decoder_linears(model).items():
        w, b, fan_in = lin.weight.detach(), lin.bias.detach(), lin.weight.shape[1]
        if scheme == "torch":
            bound = 1 / math.sqrt(fan_in)
            assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.03), name
            assert float(b.std()) == pytest.approx(bound / math.sqrt(3), rel=0.25), name
            assert float(w.abs().max()) <= bound and float(b.abs().max()) <= bound, name
            assert float(w.abs().max()) > 0.95 * bound, name  # uniform: it reaches its bound
        else:
            assert float(w.std()) == pytest.approx(0.02, rel=0.03), name
            assert float(w.abs().max()) > 3 * 0.02 and torch.all(b == 0), name  # normal: tails past 3 sigma
    d = model.decoder
    assert torch.all(d.trainable_cls_token == 0) and torch.all(d.decoder_norm.weight == 1)
    # "normal" is the constructor's own init: a run with it starts bit-identical to before
    torch.manual_seed(0)
    plain = _new_model("rpiae", "tiny", None, "normal")
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                    type(plain)(plain.config).state_dict().values()))


# 12. training images: the authors' 8-bit PIL pipeline ----------------------------------------------------


@pytest.fixture
def rocket_dir(tmp_path):
    """scikit-image's rocket, 640 x 427: at short side 384 the long side is 384 * 640 / 427 = 575.6,
    575 truncated (the authors), 576 rounded (ours before)."""
    from skimage import data

    d = tmp_path / "rocket"
    d.mkdir()
    Image.fromarray(data.rocket()).save(d / "rocket.png")
    return d


def test_training_images_are_pil_bicubic_of_8bit_rgb_truncated(rocket_dir):
    from rpiae.training.data import ImageFolderDataset, resize_short_pil

    assert TrainConfig().image_pipeline == "pil" and parse_override("image_pipeline=torch") == ("image_pipeline", "torch")
    with pytest.raises(ValueError, match="image_pipeline"):
        TrainConfig(image_pipeline="cv2")
    img = Image.open(rocket_dir / "rocket.png").convert("RGB")
    assert resize_short_pil(img, 384).size == (575, 384)
    resized = np.asarray(img.resize((575, 384), Image.BICUBIC))  # torchvision Resize(384, BICUBIC) on the PIL image
    expected = torch.from_numpy(resized.transpose(2, 0, 1).copy()).float() / 255.0  # ToTensor
    ds = ImageFolderDataset(rocket_dir, crop=384, resize_min=384, resize_max=384)  # all rows, a random column offset
    for epoch in range(3):
        ds.set_epoch(epoch)
        x, _ = ds[0]
        assert any(torch.equal(x, expected[:, :, left : left + 384]) for left in range(575 - 384 + 1)), epoch

    # ours before: torch's bicubic on floats, rounded to 576 columns; no crop of it matches PIL's
    from rpiae.imageio import resize_short

    ours = ImageFolderDataset(rocket_dir, crop=384, resize_min=384, resize_max=384, pipeline="torch")
    x, _ = ours[0]
    floats = torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy()).float() / 255.0
    wide = resize_short(floats, 384)
    assert wide.shape == (3, 384, 576)
    assert any(torch.equal(x, wide[:, :, left : left + 384]) for left in range(576 - 384 + 1))
    assert not any(torch.equal(x, expected[:, :, left : left + 384]) for left in range(575 - 384 + 1))


def test_training_images_ignore_exif_rotation(tmp_path):
    from skimage import data

    from rpiae.training.data import _decode, _decode_rgb8

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.png"
    Image.fromarray(data.rocket()[:300, :400]).save(path, exif=exif)  # stored 400 wide, 300 high
    assert _decode_rgb8(path).size == (400, 300)  # the authors': as stored
    assert tuple(_decode(path).shape) == (3, 400, 300)  # ours before: turned upright


# 13. spectral norm: the authors' variant (no warm-up, v then u) ------------------------------------------


def _conv(seed: int = 0) -> nn.Conv1d:
    torch.manual_seed(seed)
    return nn.Conv1d(48, 48, 9, padding=4, padding_mode="circular")


def test_spectral_norm_is_the_authors_variant():
    conv, ref = _conv(), _conv()
    torch.manual_seed(1)
    spectral_normed(conv, warmup=False)
    torch.manual_seed(1)
    torch.nn.utils.spectral_norm(ref)  # the authors' SpectralNorm.apply(n_power_iterations=1, dim=0, eps=1e-12)
    sn = conv.parametrizations.weight[0]
    assert isinstance(sn, SpectralNormVU)
    u0, v0 = ref.weight_u.clone(), ref.weight_v.clone()
    assert torch.equal(sn._u, u0) and torch.equal(sn._v, v0)  # no warm-up: the normalised random draws
    w = ref.weight_orig.detach().flatten(1)  # (48, 48 * 9)
    x = torch.randn(2, 48, 40)
    assert torch.allclose(conv(x), ref(x), atol=1e-6)  # train mode: one power iteration each
    v1 = F.normalize(w.t() @ u0, dim=0)  # v first ...
    u1 = F.normalize(w @ v1, dim=0)  # ... then u
    assert torch.allclose(sn._v, v1, atol=1e-6) and torch.allclose(sn._u, u1, atol=1e-6)
    first = float(u1 @ w @ v1)  # the first sigma estimate
    conv.eval()  # eval: the weight from the current u and v, no further iteration
    assert torch.allclose(conv.weight, w.view_as(conv.weight) / first, rtol=1e-5)
    assert torch.allclose(sn._u, u1, atol=1e-6)
    u_first = F.normalize(w @ v0, dim=0)  # the other order would estimate differently
    assert abs(float(u_first @ w @ F.normalize(w.t() @ u_first, dim=0)) - first) > 1e-4


def test_spectral_norm_warmup_option_is_torchs_parametrization():
    conv = _conv()
    torch.manual_seed(1)
    spectral_normed(conv, warmup=True)
    w = conv.parametrizations.weight.original.detach().flatten(1)
    torch.manual_seed(1)
    u, v = F.normalize(torch.randn(48), dim=0), F.normalize(torch.randn(48 * 9), dim=0)
    for _ in range(15 + 1 + 1):  # 15 at construction, 1 in the registration's trial forward, 1 now: u, then v
        u = F.normalize(w @ v, dim=0)
        v = F.normalize(w.t() @ u, dim=0)
    conv(torch.randn(2, 48, 40))
    sn = conv.parametrizations.weight[0]
    assert not isinstance(sn, SpectralNormVU)
    assert torch.allclose(sn._u, u, atol=1e-5) and torch.allclose(sn._v, v, atol=1e-5)
    # the whole discriminator follows `disc_sn_warmup` (default: the authors')
    assert TrainConfig().disc_sn_warmup is False
    assert isinstance(small_disc().heads[0].cls.parametrizations.weight[0], SpectralNormVU)
    from rpiae.training.discriminator import Discriminator

    warm = Discriminator(dim=32, depth=3, heads=2, patch=8, sn_warmup=True)
    assert not isinstance(warm.heads[0].cls.parametrizations.weight[0], SpectralNormVU)
    assert set(warm.state_dict()) == set(Discriminator(dim=32, depth=3, heads=2, patch=8).state_dict())


# 14. stage III token noise: on E's tokens, before the bridge ----------------------------------------------


@pytest.mark.parametrize("after_bridge", [False, True])
def test_stage3_noise_goes_on_the_encoder_tokens(after_bridge, batch, tmp_path):
    trainer = make_trainer(3, tmp_path, gan=False, lpips=False, noise_tau=0.5, noise_after_bridge=after_bridge)
    m, x = trainer.model, batch[:2]
    trainer.set_modes()
    torch.manual_seed(4)
    with torch.no_grad():
        recon = trainer.fwd(x)["recon"]

    def written_out(noise_encoder_tokens: bool) -> torch.Tensor:
        torch.manual_seed(4)
        with torch.no_grad():
            def noised(t):
                sigma = 0.5 * torch.rand(t.shape[0], 1, 1)
                return t + sigma * torch.randn(t.shape)

            tokens = m.tokens(x)
            tokens = noised(tokens) if noise_encoder_tokens else tokens
            dec = m.vb_feature_decoder(m.vb_feature_encoder(tokens).mean)
            return m.decode_tokens(dec if noise_encoder_tokens else noised(dec))

    assert torch.allclose(recon, written_out(not after_bridge), atol=1e-5)
    assert not torch.allclose(recon, written_out(after_bridge), atol=1e-3)


# 15. the discriminator's AdamW: its own betas and weight decay ------------------------------------------------


def test_disc_optimiser_has_its_own_betas_and_weight_decay(tmp_path):
    gen = dict(betas=(0.5, 0.9), weight_decay=0.1, lpips=False)
    groups = lambda t: [(tuple(g["betas"]), g["weight_decay"]) for g in t.disc_opt.param_groups]
    trainer = make_trainer(1, tmp_path, **gen)
    assert groups(trainer) == [((0.9, 0.95), 0.0)]  # the authors' gan.disc.optimizer, not the generator's
    assert (tuple(trainer.opt.param_groups[0]["betas"]), trainer.opt.param_groups[0]["weight_decay"]) == ((0.5, 0.9), 0.1)
    assert groups(make_trainer(1, tmp_path, disc_betas=(0.8, 0.99), disc_weight_decay=0.05, **gen)) == [((0.8, 0.99), 0.05)]
    assert groups(make_trainer(1, tmp_path, disc_optim_tied=True, **gen)) == [((0.5, 0.9), 0.1)]  # ours before
    assert parse_override("disc_betas=0.8,0.99") == ("disc_betas", (0.8, 0.99))


# 16. the discriminator step: the fake batch first -----------------------------------------------------------


@pytest.mark.parametrize("fake_first", [True, False])
def test_disc_step_augments_and_classifies_the_fake_batch_first(fake_first, batch, tmp_path):
    trainer = make_trainer(1, tmp_path, lpips=False, disc_fresh_fakes=False, disc_fake_first=fake_first)
    assert TrainConfig().disc_fake_first is True
    x = batch[:2]
    recon = (x.flip(-1) * 0.9 + 0.05).clamp(0, 1)  # a stand-in reconstruction
    real, fake = x * 2 - 1, quantize_8bit(recon) * 2 - 1
    disc = trainer.disc
    augment, classify = disc.augment, disc.classify
    calls, augmented = [], {}

    def recording_augment(t):
        name = "real" if torch.equal(t, real) else "fake" if torch.equal(t, fake) else "?"
        augmented[name] = out = augment(t)
        calls.append(("augment", name))
        return out

    def recording_classify(t):
        calls.append(("classify", next(k for k, v in augmented.items() if v is t)))
        return classify(t)

    disc.augment, disc.classify = recording_augment, recording_classify
    torch.manual_seed(11)
    trainer._disc_step([(x, recon)])
    if fake_first:  # the authors': fake_input = aug(fake); real_input = aug(real); disc(fake_input, real_input)
        assert calls == [("augment", "fake"), ("augment", "real"), ("classify", "fake"), ("classify", "real")]
    else:
        assert calls == [("augment", "real"), ("classify", "real"), ("augment", "fake"), ("classify", "fake")]
    # the seeded DiffAug draws go to the batches in that order
    torch.manual_seed(11)
    first, second = ("fake", "real") if fake_first else ("real", "fake")
    assert torch.equal(augmented[first], diff_augment({"fake": fake, "real": real}[first]))
    assert torch.equal(augmented[second], diff_augment({"fake": fake, "real": real}[second]))
