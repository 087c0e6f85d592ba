"""PS-VAE (arXiv 2512.17909) as a family of the same model: its presets, its SigLIP2 encoder
option, its two-stage recipe, and the export/serving path it shares with RPiAE."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from rpiae import RPiAE
from rpiae.checkpoints import CheckpointError, load_encoder_weights
from rpiae.config import PRESETS, RPiAEConfig
from rpiae.training.config import load_train_config
from rpiae.training.checkpoint import read_training_checkpoint
from rpiae.training.stages import trainable_names
from rpiae.training.trainer import Trainer
from tests.test_training import small_disc, small_lpips, snapshot

PARTS = ("encoder", "vb_feature_encoder", "vb_feature_decoder", "decoder")


def make_psvae_tiny(seed: int = 0, **overrides) -> RPiAE:
    """A seeded ps-vae-tiny with every tensor perturbed (no constant-initialised tensor can
    hide a wrongly wired part)."""
    torch.manual_seed(seed)
    model = RPiAE.from_preset("ps-vae-tiny", **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.encoder.refresh_pos_embed()
    return model.eval()


def siglip2_overrides(pos_grid: int = 16) -> dict:
    return dict(encoder_type="siglip2", encoder_input_size=256, encoder_patch_size=16, encoder_registers=0,
                encoder_pos_grid=pos_grid, mean=[0.5] * 3, std=[0.5] * 3)


@pytest.fixture(scope="module")
def batch(photos) -> torch.Tensor:
    return torch.from_numpy(photos[:2]).clone()


# -- the family as a config ------------------------------------------------------------------------------


def test_presets_say_their_family_and_older_configs_load_unchanged():
    for name in ("ps-vae", "ps-vae-siglip2", "ps-vae-tiny"):
        cfg = PRESETS[name]
        assert cfg.family == "ps-vae" and cfg.latent_shape == (96, 16, 16) and cfg.image_shape == (3, 256, 256)
    assert PRESETS["rpiae-b"].family == PRESETS["tiny"].family == "rpiae"
    # a config without the family fields (as older files carry it) is an RPiAE config, equal to the preset
    old = {k: v for k, v in PRESETS["tiny"].to_dict().items()
           if k not in ("family", "encoder_type", "bridge_encoder_depth", "bridge_encoder_mlp_size")}
    assert RPiAEConfig.from_dict(old) == PRESETS["tiny"]
    assert json.loads(PRESETS["ps-vae-tiny"].to_json())["family"] == "ps-vae"
    with pytest.raises(ValueError, match="unknown model family 'vq'"):
        RPiAEConfig(family="vq")
    with pytest.raises(ValueError, match="unknown encoder_type"):
        RPiAEConfig(encoder_type="clip")
    with pytest.raises(ValueError, match="no register tokens"):
        RPiAEConfig(**{**siglip2_overrides(), "encoder_registers": 4, "mean": (0.5,) * 3, "std": (0.5,) * 3})


def test_psvae_adds_only_its_semantic_layers_to_the_rpiae_layout():
    tiny = set(RPiAE.from_preset("tiny").state_dict())
    ps = RPiAE.from_preset("ps-vae-tiny").state_dict()
    assert not any(k.startswith("vb_feature_encoder.net.") for k in tiny)
    layer = ("self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
             "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
             "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")
    extra = {f"vb_feature_encoder.net.{i}.{n}" for i in range(2) for n in layer}
    extra |= {f"vb_feature_decoder.net.2.{n}" for n in layer}  # 3 decoder layers instead of 2
    assert set(ps) - tiny == extra and tiny <= set(ps)
    assert ps["vb_feature_encoder.to_moments.weight"].shape == (2 * 96, 192)
    assert ps["vb_feature_decoder.in_proj.weight"].shape == (192, 96)


def test_psvae_tiny_encodes_to_96_channels_through_every_semantic_layer(batch):
    model = make_psvae_tiny()
    with torch.no_grad():
        z = model.encode(batch)
        assert z.shape == (2, 96, 16, 16)
        assert model.decode(z).shape == (2, 3, 256, 256)
        for layer in model.vb_feature_encoder.net:  # each further layer is on the path
            saved = snapshot(layer)
            layer.linear2.bias.add_(1.0)
            assert not torch.allclose(model.encode(batch), z)
            layer.load_state_dict(saved)
        torch.testing.assert_close(model.encode(batch), z, rtol=0, atol=0)


@pytest.mark.slow
def test_paper_size_presets_construct_and_count_their_parameters():
    with torch.device("meta"):
        ps, rp = RPiAE(PRESETS["ps-vae"]), RPiAE(PRESETS["rpiae-b"])
    counts, ref = ps.parameter_counts(), rp.parameter_counts()
    assert counts["encoder"] == ref["encoder"]  # the same DINOv2-B/14-reg4
    assert counts["pixel_decoder"] == ref["pixel_decoder"]  # the same ViT-XL pixel decoder
    d, m, c = 768, 3072, 96
    layer = (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d) + 4 * d  # attention, MLP, 2 LayerNorms
    first_block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * d + d) + 2 * d + 2 * (d * d + d)
    assert counts["vb_encoder"] == first_block + 2 * layer + (d * 2 * c + 2 * c)
    assert counts["vb_decoder"] == (c * d + d) + 3 * layer + (d * d + d)

    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    with torch.device("meta"):
        siglip = RPiAE(PRESETS["ps-vae-siglip2"])
        hf = Siglip2VisionModel(Siglip2VisionConfig())  # SigLIP2-B/16, 256 patches
    hf_params = sum(p.numel() for n, p in hf.named_parameters() if not n.startswith("head."))
    assert siglip.parameter_counts()["encoder"] == hf_params
    assert siglip.parameter_counts()["vb_encoder"] == counts["vb_encoder"]


# -- SigLIP2 encoder: HF Siglip2VisionModel weights, random ------------------------------------------------


def _hf_patches(images: torch.Tensor, p: int) -> torch.Tensor:
    """transformers' `convert_image_to_patches`, per image: (C, H, W) -> (N, p*p*C), row-major patches."""
    out = []
    for img in images:
        c, h, w = img.shape
        out.append(img.reshape(c, h // p, p, w // p, p).permute(1, 3, 2, 4, 0).reshape((h // p) * (w // p), -1))
    return torch.stack(out)


@pytest.mark.parametrize("pos_grid", [16, 8])
def test_siglip2_encoder_against_transformers(tmp_path, pos_grid):
    """Our SigLIP2 encoder vs `transformers.Siglip2VisionModel` on shared random weights, loaded
    from its own file layouts (vision model alone, and the vision tower of a Siglip2Model)."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    torch.manual_seed(0)
    hf_cfg = Siglip2VisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                                 num_patches=pos_grid**2, patch_size=16)
    hf = Siglip2VisionModel(hf_cfg).eval()
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.startswith("head.") for k in sd)  # the pooling head is in the file and dropped
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        ref = hf(pixel_values=_hf_patches((x - 0.5) / 0.5, 16), pixel_attention_mask=torch.ones(2, 256, dtype=torch.long),
                 spatial_shapes=torch.tensor([[16, 16]] * 2)).last_hidden_state

    save_file(sd, tmp_path / "siglip2.safetensors")
    full = {f"vision_model.{k}": v for k, v in sd.items()} | {"text_model.embeddings.token_embedding.weight": torch.zeros(4, 8),
                                                              "logit_scale": torch.zeros(1)}
    torch.save(full, tmp_path / "siglip2_full.pth")
    for f in ("siglip2.safetensors", "siglip2_full.pth"):
        model = RPiAE.from_preset("ps-vae-tiny", **siglip2_overrides(pos_grid))
        assert load_encoder_weights(model, tmp_path / f) == "siglip2"
        with torch.no_grad():
            ours = model.eval().tokens(x)
        assert ours.shape == (2, 256, 192)
        assert (ours - ref).abs().max().item() <= 1e-5, f


def test_encoder_weights_of_the_other_type_are_refused(tmp_path, tiny_model):
    dino = {k[len("encoder.encoder."):]: v for k, v in tiny_model.state_dict().items() if k.startswith("encoder.encoder.")}
    torch.save(dino, tmp_path / "dinov2.pth")
    with pytest.raises(CheckpointError, match="missing keys: .*patch_embedding"):
        load_encoder_weights(RPiAE.from_preset("ps-vae-tiny", **siglip2_overrides()), tmp_path / "dinov2.pth")


# -- the recipe ---------------------------------------------------------------------------------------------


def test_recipe_defaults_and_stages():
    s1, s2 = (load_train_config(s, recipe="ps-vae") for s in (1, 2))
    for c in (s1, s2):
        assert c.recipe == "ps-vae" and c.noise_tau == 0.0 and c.sample_posterior and not c.train_decoder_pos_embed
        assert (c.feature_weight, c.feature_cos_weight, c.kl_weight, c.l1_weight, c.lpips_weight) == (1.0, 1.0, 1e-3, 1.0, 1.0)
        assert c.decoder_stage
    assert (s1.gan_weight, s2.gan_weight) == (0.0, 0.75)
    # E unfreezes progressively in stage 2 only (our reading; the schedule is ours)
    assert (s1.unfreezes_progressively, s2.unfreezes_progressively) == (False, True)
    assert (s2.unfreeze_groups, s2.unfreeze_every_epochs) == (4, 2.0)
    assert not load_train_config(1, overrides={"progressive_unfreeze": True}).unfreezes_progressively  # RPiAE: never
    assert not load_train_config(1, recipe="ps-vae", overrides={"svae_pixel_decoder": False}).decoder_stage
    assert load_train_config(1).recipe == "rpiae" and load_train_config(1).feature_cos_weight == 0.0
    with pytest.raises(ValueError, match="ps-vae recipe has stages 1, 2, got 3"):
        load_train_config(3, recipe="ps-vae")
    with pytest.raises(ValueError, match="recipe: expected one of rpiae, ps-vae, got 'sd-vae'"):
        load_train_config(1, recipe="sd-vae")


def make_trainer(stage: int, tmp_path, gan: bool = True, lpips: bool = True, model: RPiAE | None = None, **kw) -> Trainer:
    base = dict(batch_size=2, epochs=1, warmup_epochs=0.0, lr=1e-3, min_lr=1e-3, ema_decay=0.5, num_workers=0,
                gan_start_epoch=0.0, disc_start_epoch=0.0, sample_every=0, save_every=0)
    cfg = load_train_config(stage, overrides={**base, **kw}, recipe="ps-vae")
    return Trainer(model or make_psvae_tiny(), cfg, tmp_path / f"s{stage}", lpips=small_lpips() if lpips else None,
                   disc=small_disc() if gan else None, steps_per_epoch=100)


@pytest.mark.parametrize("stage,pixel_decoder,progressive", [(1, True, False), (1, False, False), (2, True, True),
                                                             (2, True, False)])
def test_stage_trains_only_its_parameters(stage, pixel_decoder, progressive, batch, tmp_path):
    trainer = make_trainer(stage, tmp_path, svae_pixel_decoder=pixel_decoder, progressive_unfreeze=progressive)
    model = trainer.model
    # stage 2, progressive (the default): 2 steps at 100 steps per epoch, only E's top group unfrozen
    waiting = {n for n, group in trainer.unfreeze_plan.items() if group > 0}
    assert bool(waiting) == progressive
    trains = {1: {"vb_feature_encoder", "vb_feature_decoder"} | ({"decoder"} if pixel_decoder else set()),
              2: set(PARTS)}[stage]
    before, ema_before = snapshot(model), snapshot(trainer.ema)
    pivot_before = snapshot(trainer.pivot) if trainer.pivot is not None else None
    assert (trainer.pivot is not None) == (stage == 2)  # the frozen copy of E: stage 2's semantic target

    for i in range(2):
        logs = trainer.train_step([batch[i : i + 1]])
        assert all(math.isfinite(v) for v in logs.values()), logs
    assert {"feat", "feat_cos", "kl", "l1", "loss"} <= set(logs)
    assert ("lpips" in logs) == pixel_decoder
    assert ("w_gan" in logs and "d_loss" in logs) == (stage == 2)

    names = set(trainable_names(model, trainer.cfg))
    fixed = {"encoder.encoder.embeddings.mask_token", "decoder.decoder_pos_embed"}
    expected = {n for n, _ in model.named_parameters() if n.split(".")[0] in trains} - fixed
    assert names == expected
    for k, v in model.state_dict().items():
        if k in names - waiting:
            assert not torch.equal(v, before[k]), f"{k} did not train"
            assert not torch.equal(trainer.ema.state_dict()[k], ema_before[k]), f"EMA of {k} did not move"
        else:
            assert torch.equal(v, before[k]), f"frozen {k} changed"
    for part in PARTS:
        assert getattr(model, part).training == (part in trains)
    if pivot_before is not None:
        assert not trainer.pivot.training
        for k, v in trainer.pivot.state_dict().items():
            assert torch.equal(v, pivot_before[k]), f"frozen copy {k} changed"


def test_siglip2_psvae_trains_its_encoder_in_stage_2(batch, tmp_path):
    trainer = make_trainer(2, tmp_path, model=make_psvae_tiny(**siglip2_overrides()), progressive_unfreeze=False)
    e = trainer.model.encoder.encoder
    assert trainer.last_enc_param is e.post_layernorm.bias  # E's last parameter, for any encoder type
    before = snapshot(e)
    logs = trainer.train_step([batch[:1]])
    assert all(math.isfinite(v) for v in logs.values()) and "w_gan" in logs
    assert all(not torch.equal(v, before[k]) for k, v in e.state_dict().items())
    # progressive (the default): the top block and the final LayerNorm first, the embeddings last
    plan = make_trainer(2, tmp_path, gan=False, lpips=False, model=make_psvae_tiny(**siglip2_overrides())).unfreeze_plan
    assert plan["encoder.encoder.post_layernorm.weight"] == plan["encoder.encoder.encoder.layers.3.mlp.fc1.weight"] == 0
    assert plan["encoder.encoder.embeddings.patch_embedding.weight"] == plan["encoder.encoder.encoder.layers.0.mlp.fc1.weight"] == 3


def _block_params(model: RPiAE, i: int) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.startswith(f"encoder.encoder.encoder.layer.{i}.")}


def test_psvae_stage2_unfreezes_e_from_its_last_block_down(batch, tmp_path):
    """ps-vae-tiny's E has 4 blocks, so 4 groups of one block; a new group every 0.01 epoch =
    every step at 100 steps per epoch. Every block is in the optimiser from the start; a block
    still frozen gets no gradient and does not move, an unfrozen one trains."""
    trainer = make_trainer(2, tmp_path, gan=False, lpips=False, unfreeze_every_epochs=0.01)
    model = trainer.model
    blocks = [_block_params(model, i) for i in range(4)]
    embeddings = {n: p for n, p in model.named_parameters() if n.startswith("encoder.encoder.embeddings.")
                  and not n.endswith("mask_token")}
    in_opt = {id(p) for g in trainer.opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for b in (*blocks, embeddings) for p in b.values())
    rebuilt = []
    trainer._wrap_ddp = lambda: rebuilt.append(trainer.step)  # what a multi-GPU run rebuilds DDP on
    trainer.world = 2  # one micro-batch: no no_sync, no collective in the generator step
    for step in range(5):
        before = [{n: p.detach().clone() for n, p in b.items()} for b in (*blocks, embeddings)]
        trainer.train_step([batch[:1]])  # sets requires_grad for its step first
        unfrozen = [3 - i <= step for i in range(4)]  # block 3 first, block 0 last
        assert [all(p.requires_grad for p in b.values()) for b in blocks] == unfrozen, step
        assert [any(p.requires_grad for p in b.values()) for b in blocks] == unfrozen, step
        assert all(p.requires_grad == (step >= 3) for p in embeddings.values()), step  # with the bottom group
        moved = [any(not torch.equal(p, prev[n]) for n, p in b.items()) for b, prev in zip((*blocks, embeddings), before)]
        assert moved == unfrozen + [step >= 3], step
    assert rebuilt == [1, 2, 3]  # at each change; step 4 changes nothing
    assert len(trainer.opt.state) == len(trainer.params)  # every E parameter has trained by now


def test_psvae_unfreezing_schedule_at_full_size():
    """The default schedule on the `ps-vae` preset (DINOv2-B, 12 blocks): blocks 9-11 train from
    the start, 6-8 from epoch 2, 3-5 from epoch 4, 0-2 and the embeddings from epoch 6."""
    from rpiae.training.stages import encoder_groups, unfrozen_groups

    cfg = load_train_config(2, recipe="ps-vae")
    with torch.device("meta"):
        model = RPiAE(PRESETS["ps-vae"])
    plan = encoder_groups(model, cfg.unfreeze_groups)
    for i in range(12):
        assert {g for n, g in plan.items() if f".layer.{i}." in n} == {(11 - i) // 3}, i
    assert {g for n, g in plan.items() if ".embeddings." in n} == {3}
    assert [unfrozen_groups(cfg, e, 4) for e in (0.0, 1.99, 2.0, 3.0, 4.0, 6.0, 15.9)] == [1, 1, 2, 2, 3, 4, 4]


def _written_out(model: RPiAE, tokens: torch.Tensor, target: torch.Tensor) -> dict:
    """The PS-VAE objective from its definition, with the posterior sampled from the global RNG."""
    moments = model.vb_feature_encoder.moments(tokens)  # (B, 2*96, 16, 16)
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape)
    tokens_hat = model.vb_feature_decoder(z)  # (B, 256, C)
    feat = ((tokens_hat - target) ** 2).mean()
    cos = 1 - ((tokens_hat * target).sum(-1) / (tokens_hat.norm(dim=-1) * target.norm(dim=-1))).mean()
    kl = (mean**2 + logvar.exp() - 1 - logvar).mean()
    return {"feat": feat, "feat_cos": cos, "kl": kl, "tokens_hat": tokens_hat}


def test_svae_loss_is_the_written_out_objective_and_pixel_losses_stop_at_the_decoder(batch, tmp_path):
    trainer = make_trainer(1, tmp_path, gan=False)
    model, x = trainer.model, batch[:2]
    trainer.set_modes()

    torch.manual_seed(7)
    loss, logs, _ = trainer._losses(x)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    torch.manual_seed(7)
    with torch.no_grad():
        tokens = model.tokens(x)  # E frozen
    ref = _written_out(model, tokens, tokens)
    recon = model.decode_tokens(ref["tokens_hat"].detach())
    l1 = (recon - x).abs().mean()
    lp = trainer.lpips(recon * 2 - 1, x * 2 - 1).mean()
    semantic = ref["feat"] + ref["feat_cos"] + 1e-3 * ref["kl"]
    total = semantic + l1 + lp
    for key in ("feat", "feat_cos", "kl"):
        assert logs[key].item() == pytest.approx(ref[key].item(), rel=1e-5), key
    assert logs["l1"].item() == pytest.approx(l1.item(), rel=1e-5)
    assert logs["lpips"].item() == pytest.approx(lp.item(), rel=1e-5)
    assert loss.item() == pytest.approx(total.item(), rel=1e-5)

    # the semantic autoencoder's gradient is the semantic terms' alone; D's the pixel terms'
    w = model.vb_feature_encoder.to_moments.weight
    semantic_grad = torch.autograd.grad(semantic, w, retain_graph=True)[0]
    torch.testing.assert_close(grads["vb_feature_encoder.to_moments.weight"], semantic_grad)
    d = model.decoder.decoder_pred.weight
    torch.testing.assert_close(grads["decoder.decoder_pred.weight"], torch.autograd.grad(l1 + lp, d)[0])


def test_psvae_loss_targets_the_frozen_encoder_and_reaches_e(batch, tmp_path):
    trainer = make_trainer(2, tmp_path, gan=False)
    model, x = trainer.model, batch[:2]
    trainer.set_modes()
    with torch.no_grad():  # move E away from its frozen copy, so the target is not E's own tokens
        for p in model.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))

    torch.manual_seed(3)
    loss, logs, _ = trainer._losses(x)
    loss.backward()
    # the top block trains from the first step (the blocks below join later: progressive unfreezing)
    e_grad = model.encoder.encoder.encoder.layer[-1].mlp.fc1.weight.grad
    assert e_grad is not None and e_grad.abs().sum() > 0
    assert model.encoder.encoder.embeddings.patch_embeddings.projection.weight.grad is None

    torch.manual_seed(3)
    with torch.no_grad():
        target = trainer.pivot(x)
    tokens = model.tokens(x)  # E trainable (train mode)
    assert not torch.allclose(tokens, target)
    ref = _written_out(model, tokens, target)
    recon = model.decode_tokens(ref["tokens_hat"])
    l1 = (recon - x).abs().mean()
    lp = trainer.lpips(recon * 2 - 1, x * 2 - 1).mean()
    total = l1 + lp + ref["feat"] + ref["feat_cos"] + 1e-3 * ref["kl"]
    assert logs["feat"].item() == pytest.approx(ref["feat"].item(), rel=1e-5)
    assert loss.item() == pytest.approx(total.item(), rel=1e-5)


# -- `rpiae train --recipe ps-vae` ----------------------------------------------------------------------------


@pytest.fixture
def image_dir(tmp_path, photos):
    d = tmp_path / "images"
    d.mkdir()
    for i, p in enumerate(photos[:2]):
        Image.fromarray((p.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(d / f"img{i}.png")
    return d


def _train(*args):
    from rpiae.cli.main import main

    return CliRunner().invoke(main, ["train", *map(str, args)])


@pytest.mark.filterwarnings("ignore:stage I without --init-encoder")
def test_cli_trains_both_stages_and_refuses_the_wrong_family(tmp_path, image_dir):
    fast = ("--set", "batch_size=1", "--set", "max_steps=1", "--set", "num_workers=0", "--set", "resize_min=256",
            "--set", "resize_max=256", "--quiet", "--no-lpips", "--no-gan")
    r = _train("--recipe", "ps-vae", "--stage", 1, "--data", image_dir, "--out", tmp_path / "s1",
               "--preset", "ps-vae-tiny", *fast)
    assert r.exit_code == 0, r.output
    r = _train("--recipe", "ps-vae", "--stage", 2, "--data", image_dir, "--out", tmp_path / "s2",
               "--resume", tmp_path / "s1" / "last", *fast)
    assert r.exit_code == 0, r.output
    s1, s2 = (read_training_checkpoint(tmp_path / s / "last") for s in ("s1", "s2"))
    assert (s1["stage"], s2["stage"]) == (1, 2) and s2["train_config"]["recipe"] == "ps-vae"
    assert s2["config"]["family"] == "ps-vae" and "pivot" in s2
    for k, v in s1["model"].items():  # stage 2 started from stage 1's raw weights
        if k.startswith("encoder."):
            assert torch.equal(v, s2["pivot"][k[len("encoder."):]]), k
    model = RPiAE.from_checkpoint(tmp_path / "s2" / "model.safetensors")
    assert model.config.family == "ps-vae" and model.config.name == "ps-vae-tiny"

    r = _train("--stage", 2, "--data", image_dir, "--out", tmp_path / "x", "--resume", tmp_path / "s1" / "last", *fast)
    assert r.exit_code == 1 and "is a ps-vae model; the rpiae recipe trains rpiae models" in r.output
    r = _train("--recipe", "ps-vae", "--stage", 1, "--data", image_dir, "--out", tmp_path / "x", "--preset", "tiny", *fast)
    assert r.exit_code == 1 and "preset 'tiny' is a rpiae model" in r.output and "ps-vae-tiny" in r.output
    r = _train("--recipe", "ps-vae", "--stage", 3, "--data", image_dir, "--out", tmp_path / "x", *fast)
    assert r.exit_code == 1 and "stages 1, 2, got 3" in r.output and "Traceback" not in r.output
    r = _train("--recipe", "ps-vae", "--stage", 2, "--data", image_dir, "--out", tmp_path / "x",
               "--resume", tmp_path / "s1" / "last", "--set", "batch_size=1", "--quiet", "--no-gan")
    assert r.exit_code == 1 and "stage 2 uses LPIPS" in r.output

    # the paper's channel ablation: the latent width is a model config switch of a new run
    r = _train("--recipe", "ps-vae", "--stage", 1, "--data", image_dir, "--out", tmp_path / "c112", "--preset", "ps-vae-tiny",
               "--model-set", "latent_channels=112", *fast)
    assert r.exit_code == 0, r.output
    cfg = read_training_checkpoint(tmp_path / "c112" / "last")["config"]
    assert (cfg["latent_channels"], cfg["name"], cfg["family"]) == (112, "ps-vae-tiny-custom", "ps-vae")
    r = _train("--recipe", "ps-vae", "--stage", 1, "--data", image_dir, "--out", tmp_path / "x", "--model-set", "width=3", *fast)
    assert r.exit_code == 2 and "unknown model config field 'width'" in r.output


# -- the shared export / serving path ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def psvae_ckpt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("psvae") / "ps-vae-tiny.safetensors"
    make_psvae_tiny().save(path)
    return str(path)


@pytest.fixture(scope="module")
def psvae_bundle(tmp_path_factory, psvae_ckpt, sample_photos):
    from rpiae.verify import export_bundle

    out = tmp_path_factory.mktemp("psvae-bundles") / "all"
    return export_bundle(psvae_ckpt, out, precisions="fp32,fp16,int8", calib=sample_photos, progress=False)


def test_bundle_records_the_family_and_passes_the_same_parity_bounds(psvae_bundle, sample_photos):
    from rpiae.engines import load_backend
    from rpiae.verify import verify_bundle
    from rpiae.export.onnx_export import read_metadata
    from rpiae.verify.parity import TOLERANCES

    m = psvae_bundle.manifest
    assert m.config.family == "ps-vae" and m.config.name == "ps-vae-tiny"
    assert m.io["encode"]["output"]["shape"] == ["batch", 96, 16, 16] == m.io["decode"]["input"]["shape"]
    import onnx

    meta = read_metadata(onnx.load(str(psvae_bundle.root / "encode.int8.onnx")))
    assert json.loads(meta["rpiae.config"])["family"] == "ps-vae"
    report = verify_bundle(psvae_bundle, backend="ort", images=sample_photos, batches=[1, 3])
    assert {r["precision"] for r in report["results"]} == {"fp32", "fp16", "int8"}
    for row in report["results"]:
        assert set(row["checks"]) == set(TOLERANCES[row["precision"]]) and row["ok"], row
    with load_backend(psvae_bundle.root, backend="ort") as ort:
        z = ort.encode(sample_photos[:2])
        assert z.shape == (2, 96, 16, 16) and ort.decode(z).shape == (2, 3, 256, 256)


def test_triton_repository_from_the_bundle(tmp_path, psvae_bundle):
    from rpiae.export.triton import parse_config, write_model_repository

    repo = tmp_path / "repo"
    write_model_repository(psvae_bundle, repo, precision="int8", platform="auto", instance_kind="cpu", max_batch=4)
    enc = parse_config((repo / "rpiae_encode" / "config.pbtxt").read_text())
    dec = parse_config((repo / "rpiae_decode" / "config.pbtxt").read_text())
    assert list(enc.output[0].dims) == [96, 16, 16] == list(dec.input[0].dims)


def test_siglip2_variant_exports_and_verifies(tmp_path, sample_photos):
    from rpiae.verify import export_bundle, verify_bundle

    bundle = export_bundle(make_psvae_tiny(**siglip2_overrides()), tmp_path / "b", precisions="fp32", progress=False)
    assert bundle.manifest.config.to_dict()["encoder_type"] == "siglip2"
    report = verify_bundle(bundle, backend="ort", images=sample_photos[:2], batches=[2])
    assert report["ok"], report


def test_extract_and_decode_round_trip(tmp_path, psvae_bundle, psvae_ckpt, sample_photos):
    from rpiae.cli.main import main
    from rpiae.imageio import load_image
    from tests.test_extract import all_latents

    data = tmp_path / "data"
    data.mkdir()
    for i, a in enumerate(sample_photos[:3]):
        Image.fromarray((a.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(data / f"{i}.png")
    run = CliRunner()
    r = run.invoke(main, ["extract", str(data), "--out", str(tmp_path / "lat"), "--model", str(psvae_bundle.root),
                          "--backend", "ort", "--workers", "0", "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "lat" / "manifest.json").read_text())
    assert manifest["model"]["config"]["family"] == "ps-vae"
    z = all_latents(tmp_path / "lat")
    assert z.shape == (3, 96, 16, 16)
    model = RPiAE.from_checkpoint(psvae_ckpt)
    x = torch.from_numpy(np.stack([load_image(data / f"{i}.png") for i in range(3)]))
    with torch.no_grad():
        np.testing.assert_allclose(z, model.encode(x).numpy(), atol=1e-4)

    r = run.invoke(main, ["decode", str(tmp_path / "lat"), "-o", str(tmp_path / "rec"), "--model", psvae_ckpt, "--quiet"],
                   catch_exceptions=False)
    assert r.exit_code == 0, r.output
    pngs = sorted((tmp_path / "rec").glob("*.png"))
    assert [p.name for p in pngs] == ["000000.png", "000001.png", "000002.png"]
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == [".rpiae-decode.json"] + [p.name for p in pngs]
    with torch.no_grad():
        y = model.decode(torch.from_numpy(z[:1]))[0].clamp(0, 1)
    expected = (y.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.abs(np.asarray(Image.open(pngs[0])).astype(int) - expected).max() <= 1


@pytest.mark.slow
def test_cpp_runner_runs_the_psvae_packages(tmp_path_factory, tmp_path, psvae_ckpt, sample_photos, cpp_runner):
    """The C++ runner takes the latent shape from the encoder graph (96 channels here)."""
    from rpiae.cli.main import main
    from rpiae.engines.aoti_backend import find_packages
    from rpiae.export import Bundle
    from rpiae.imageio import load_image, save_image
    from tests.test_cpp_runner import _run

    exe = cpp_runner["exe"]
    cache = tmp_path_factory.mktemp("psvae-aoti-cache")
    out = tmp_path / "bundle"
    res = CliRunner().invoke(main, ["export", "--checkpoint", psvae_ckpt, "--target", "aoti", "--device", "cpu",
                                    "--batch", "1:1:2", "--out", str(out)], env={"RPIAE_CACHE_DIR": str(cache)})
    assert res.exit_code == 0, res.output
    bundle = Bundle.open(out)
    pk = find_packages(bundle)
    enc, dec = (bundle.root / pk[g][0] for g in ("encode", "decode"))
    ppm = tmp_path / "photo.ppm"
    Image.open(save_image(sample_photos[0], tmp_path / "photo.png")).convert("RGB").save(ppm)
    zf = tmp_path / "z.f32"
    res = _run(exe, enc, dec, ppm, tmp_path / "out.ppm", "--latent", zf, cache=cache)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "latent (1, 96, 16, 16)" in res.stdout
    z = np.fromfile(zf, np.float32).reshape(1, 96, 16, 16)
    with torch.no_grad():
        z_ref = RPiAE.from_checkpoint(psvae_ckpt).encode(torch.from_numpy(load_image(ppm)[None].copy())).numpy()
    assert np.abs(z - z_ref).max() <= 1e-4 * np.abs(z_ref).max()
