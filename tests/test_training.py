"""Three-stage training: a few steps per stage on the tiny preset, batch 1-2, on the CPU."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from rpiae import RPiAE
from rpiae.training.config import STAGE_DEFAULTS, TrainConfig, load_train_config, parse_override
from rpiae.metrics import psnr
from rpiae.training.data import ImageFolderDataset
from rpiae.training.discriminator import Discriminator, diff_augment, load_dino_features, quantize_fake
from rpiae.training.lpips import LPIPS, load_lpips
from rpiae.training.checkpoint import read_training_checkpoint
from rpiae.training.stages import STAGE_PARTS, trainable_names
from rpiae.training.trainer import Trainer
from tests.conftest import make_tiny

SMALL_LPIPS = (4, 8, 8, 8, 8)  # VGG16 structure, narrow: fast on a CPU
SMALL_DISC = dict(dim=32, depth=12, heads=2, patch=8)  # ViT/8 structure (785 tokens), narrow


def small_lpips(seed: int = 0) -> LPIPS:
    torch.manual_seed(seed)
    net = LPIPS(SMALL_LPIPS)
    with torch.no_grad():
        for k in range(5):
            w = getattr(net, f"lin{k}").model[1].weight
            w.abs_()  # LPIPS heads are non-negative
    return net


def small_disc(seed: int = 0) -> Discriminator:
    torch.manual_seed(seed)
    return Discriminator(**SMALL_DISC)


def make_cfg(stage: int, **kw) -> TrainConfig:
    base = dict(
        batch_size=2, epochs=1, warmup_epochs=0.0, lr=1e-3, min_lr=1e-3, ema_decay=0.5, num_workers=0,
        gan_start_epoch=0.0, disc_start_epoch=0.0, pivot_warmup_steps=0, sample_every=0, save_every=0,
    )
    base.update(kw)
    return load_train_config(stage, overrides=base)


def make_trainer(stage: int, tmp_path, gan: bool = True, lpips: bool = True, seed: int = 0, **kw) -> Trainer:
    cfg = make_cfg(stage, **kw)
    model = make_tiny(seed)
    use = stage in (1, 3)
    return Trainer(
        model, cfg, tmp_path / f"s{stage}",
        lpips=small_lpips() if (lpips and use) else None,
        disc=small_disc() if (gan and use) else None,
        steps_per_epoch=100,
    )


@pytest.fixture(scope="module")
def batch(photos) -> torch.Tensor:
    return torch.from_numpy(photos[:2]).clone()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- config --------------------------------------------------------------------------------------


def test_config_defaults_are_the_paper(tmp_path):
    c1, c2, c3 = (load_train_config(s) for s in (1, 2, 3))
    assert (c1.lr, c1.betas, c1.weight_decay, c1.min_lr, c1.ema_decay) == (2e-4, (0.9, 0.95), 0.0, 2e-5, 0.9978)
    assert (c1.epochs, c1.batch_size, c1.noise_tau, c1.pivot_warmup_steps) == (16, 256, 0.8, 1000)
    assert (c1.gan_start_epoch, c1.disc_start_epoch, c1.gan_weight, c1.pivot_weight) == (8, 6, 0.75, 0.75)
    assert (c1.resize_min, c1.resize_max, c1.crop) == (384, 384, 256)
    assert (c2.epochs, c2.batch_size, c2.kl_weight, c2.l1_weight) == (32, 512, 1e-3, 0.05)
    assert (c3.epochs, c3.batch_size, c3.noise_tau) == (16, 256, 0.0)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"batch_size": 8, "stage2": {"epochs": 3}}))
    assert load_train_config(2, path).batch_size == 8 and load_train_config(2, path).epochs == 3
    assert load_train_config(1, path).epochs == STAGE_DEFAULTS[1]["epochs"]
    assert load_train_config(1, path, {"lr": 1e-3}).lr == 1e-3
    path.write_text(json.dumps({"bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        load_train_config(1, path)
    assert parse_override("hflip=true") == ("hflip", True)
    assert parse_override("betas=0.9,0.99") == ("betas", (0.9, 0.99))


# -- every stage: finite losses, only the intended parameters move, frozen really frozen -----------


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_trains_only_its_parameters(stage, batch, tmp_path):
    trainer = make_trainer(stage, tmp_path)
    model = trainer.model
    before = snapshot(model)
    ema_before = snapshot(trainer.ema)
    pivot_before = snapshot(trainer.pivot) if trainer.pivot is not None else None
    disc_feat_before = snapshot(trainer.disc.features) if trainer.disc is not None else None
    disc_heads_before = snapshot(trainer.disc.heads) if trainer.disc is not None else None

    for i in range(2):
        logs = trainer.train_step([batch[i : i + 1]])
        assert all(math.isfinite(v) for v in logs.values()), logs
    if stage in (1, 3):
        assert "w_gan" in logs and "d_loss" in logs and "lpips" in logs
    if stage == 1:
        assert "w_piv" in logs
    if stage == 2:
        assert "kl" in logs and "feat" in logs

    names = set(trainable_names(model, trainer.cfg))
    assert names and all(n.startswith(STAGE_PARTS[stage]) for n in names)
    after = model.state_dict()
    params = dict(model.named_parameters())
    for k, v in after.items():
        if k in names:
            assert not torch.equal(v, before[k]), f"{k} did not train"
            assert not torch.equal(trainer.ema.state_dict()[k], ema_before[k]), f"EMA of {k} did not move"
        else:
            assert torch.equal(v, before[k]), f"frozen {k} changed"
            assert torch.equal(trainer.ema.state_dict()[k], ema_before[k])
            if k in params:
                assert not params[k].requires_grad and params[k].grad is None, k
    # optimiser state only for the trainable parameters
    opt_params = {id(p) for g in trainer.opt.param_groups for p in g["params"]}
    assert opt_params == {id(params[n]) for n in names}
    assert len(trainer.opt.state) == len(names)
    # modes: trainable parts train, frozen parts eval; the replica never changes
    for part in ("encoder", "vb_feature_encoder", "vb_feature_decoder", "decoder"):
        assert getattr(model, part).training == (part + "." in STAGE_PARTS[stage])
    if pivot_before is not None:
        assert not trainer.pivot.training
        assert all(not p.requires_grad for p in trainer.pivot.parameters())
        for k, v in trainer.pivot.state_dict().items():
            assert torch.equal(v, pivot_before[k]), f"pivot {k} changed"
    if disc_feat_before is not None:
        for k, v in trainer.disc.features.state_dict().items():
            assert torch.equal(v, disc_feat_before[k]), f"discriminator backbone {k} changed"
        assert any(not torch.equal(v, disc_heads_before[k]) for k, v in trainer.disc.heads.state_dict().items())
        assert len(trainer.disc_opt.state) == sum(1 for _ in trainer.disc.heads.parameters())


def test_gan_and_disc_start_epochs(batch, tmp_path):
    trainer = make_trainer(1, tmp_path, gan_start_epoch=0.02, disc_start_epoch=0.01, pivot_warmup_steps=1000)
    x = batch[:1]
    logs = trainer.train_step([x])  # step 0 = epoch 0.00: neither
    assert "w_gan" not in logs and "d_loss" not in logs and logs["w_piv"] == 0.75
    logs = trainer.train_step([x])  # epoch 0.01: discriminator only
    assert "w_gan" not in logs and "d_loss" in logs
    logs = trainer.train_step([x])  # epoch 0.02: both
    assert "w_gan" in logs and "d_loss" in logs


# -- adaptive weights = the formula, recomputed independently --------------------------------------


def test_adaptive_weights_match_formula(batch, tmp_path):
    trainer = make_trainer(1, tmp_path)
    cfg, model = trainer.cfg, trainer.model
    x = batch[:2]
    disc_state = snapshot(trainer.disc)  # spectral norm's power iteration updates buffers per call

    torch.manual_seed(123)
    _, logs, _ = trainer.compute_losses(x)

    trainer.disc.load_state_dict(disc_state)
    torch.manual_seed(123)
    # the same computation, written out from the paper's objective (docs/TRAINING.md)
    b = x.shape[0]
    tokens = model.tokens(x)
    sigma = cfg.noise_tau * torch.rand(b, 1, 1)
    noised = tokens + sigma * torch.randn(tokens.shape)
    recon = model.decode_tokens(noised)
    lp = trainer.lpips(recon * 2 - 1, x * 2 - 1).mean()
    l_rec = (recon - x).abs().mean() + lp
    with torch.no_grad():
        target = trainer.pivot(x)
    l_piv = ((tokens - target) ** 2).mean()
    g = -trainer.disc(recon * 2 - 1).mean()  # the raw reconstruction: no clamp, no 8-bit rounding

    last_e = model.encoder.encoder.encoder.layer[-1].layer_scale2.lambda1
    last_d = model.decoder.decoder_pred.weight
    gr_e, gp_e = (torch.autograd.grad(l, last_e, retain_graph=True)[0] for l in (l_rec, l_piv))
    gr_d, gg_d = (torch.autograd.grad(l, last_d, retain_graph=True)[0] for l in (l_rec, g))
    w_piv = 0.75 * min(max(gr_e.norm().item() / (gp_e.norm().item() + 1e-4), 0.0), 1e5)
    w_gan = min(max(gr_d.norm().item() / (gg_d.norm().item() + 1e-6), 0.0), 1e4)

    assert logs["pivot"] == pytest.approx(l_piv.item(), rel=1e-5)
    assert logs["gan"] == pytest.approx(g.item(), rel=1e-4, abs=1e-6)
    assert logs["w_piv"] == pytest.approx(w_piv, rel=1e-4)
    assert logs["w_gan"] == pytest.approx(w_gan, rel=1e-4)
    assert 0 < logs["w_piv"] and 0 < logs["w_gan"]

    # during the warm-up the pivot weight is the constant 0.75
    trainer.cfg.pivot_warmup_steps = 10
    _, logs, _ = trainer.compute_losses(x)
    assert logs["w_piv"] == 0.75


# -- learning: one batch, L1 goes down ----------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_overfit_one_batch(stage, batch, tmp_path):
    """L1 falls when D learns (stages I, III); in stage II (D frozen, random here) the VB's
    own objective, the token MSE, falls and L1 does not get worse."""
    torch.manual_seed(0)
    trainer = make_trainer(stage, tmp_path, gan=False, lpips=False, lr=2e-3, min_lr=2e-3)
    x = batch[:1]
    logs = [trainer.train_step([x]) for _ in range(12)]
    l1 = [r["l1"] for r in logs]
    if stage == 2:
        feat = [r["feat"] for r in logs]
        assert np.mean(feat[-3:]) < 0.7 * feat[0], feat
        assert np.mean(l1[-3:]) <= l1[0] + 1e-3, l1
    else:
        assert np.mean(l1[-3:]) < 0.7 * l1[0], l1


def test_gradient_accumulation_equals_one_big_batch(batch, tmp_path):
    """Stage III has no noise: 2 micro-batches of 1 give the same update as one batch of 2."""
    x = batch[:2]
    one = make_trainer(3, tmp_path, gan=False, lpips=False, batch_size=2, grad_accum=1)
    two = make_trainer(3, tmp_path, gan=False, lpips=False, batch_size=2, grad_accum=2)
    la = one.train_step([x])
    lb = two.train_step([x[:1], x[1:]])
    assert la["l1"] == pytest.approx(lb["l1"], rel=1e-5)
    for (k, a), b in zip(one.model.state_dict().items(), two.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), k


# -- resume is bit-identical ----------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_bit_identical_one_step(stage, batch, tmp_path):
    x1, x2 = batch[:1], batch[1:2]
    a = make_trainer(stage, tmp_path, lr=1e-3, min_lr=1e-4, warmup_epochs=0.01)  # schedule mid-warm-up
    a.train_step([x1])
    a.train_step([x2])
    path = tmp_path / "state.pt"
    torch.save(a.state_dict(), path)
    logs_a = a.train_step([x1])
    rng_a = torch.get_rng_state()

    b = make_trainer(stage, tmp_path, seed=7, lr=1e-3, min_lr=1e-4, warmup_epochs=0.01)  # different init
    torch.manual_seed(999)  # a different global RNG too: the checkpoint must restore it
    b.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    logs_b = b.train_step([x1])
    assert torch.equal(rng_a, torch.get_rng_state())

    assert logs_a == logs_b
    for name, ma, mb in (("model", a.model, b.model), ("ema", a.ema, b.ema), ("disc", a.disc, b.disc)):
        if ma is None:
            continue
        sa, sb = ma.state_dict(), mb.state_dict()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs after resume"
    for ga, gb in zip(a.opt.state.values(), b.opt.state.values()):
        assert all(torch.equal(ga[k], gb[k]) for k in ga)
    assert a.step == b.step == 3


@pytest.fixture
def image_dir(tmp_path, photos):
    d = tmp_path / "images" / "nested"
    d.mkdir(parents=True)
    for i, p in enumerate(photos[:3]):
        Image.fromarray((p.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(d / f"img{i}.png")
    (d / "broken.jpg").write_bytes(b"not a jpeg at all")
    return tmp_path / "images"


@pytest.mark.filterwarnings("ignore:skipping unreadable")
def test_run_training_resume_matches_uninterrupted(image_dir, tmp_path):
    """Through the data loader, checkpoints on disk and the RNG: 2 steps == 1 step + resume + 1 step."""
    from rpiae.training.run import run_training

    common = dict(
        preset="tiny", no_lpips=True, no_gan=True, progress=False,
        overrides=dict(batch_size=1, num_workers=0, resize_min=256, resize_max=300, hflip=True, epochs=1, warmup_epochs=0.5),
    )
    with pytest.warns(UserWarning):
        run_training(1, image_dir, tmp_path / "full", **{**common, "overrides": {**common["overrides"], "max_steps": 2}})
    with pytest.warns(UserWarning):
        run_training(1, image_dir, tmp_path / "part", **{**common, "overrides": {**common["overrides"], "max_steps": 1}})
    run_training(1, image_dir, tmp_path / "part", resume=tmp_path / "part" / "last",
                 **{**common, "overrides": {**common["overrides"], "max_steps": 2}})
    full = read_training_checkpoint(tmp_path / "full" / "last")
    part = read_training_checkpoint(tmp_path / "part" / "last")
    assert full["step"] == part["step"] == 2
    for key in ("model", "ema", "pivot"):
        for k, v in full[key].items():
            assert torch.equal(v, part[key][k]), f"{key}.{k}"
    assert torch.equal(full["rng"]["torch"], part["rng"]["torch"])
    # the run's outputs: an inference model, a sample grid, a log; the broken file was counted
    model = RPiAE.from_checkpoint(tmp_path / "full" / "last" / "checkpoint.pt")
    assert model.config.name == "tiny"
    assert (tmp_path / "full" / "model.safetensors").is_file()
    assert (tmp_path / "full" / "log.jsonl").read_text().strip()
    assert json.loads((tmp_path / "full" / "config.json").read_text())["train"]["max_steps"] == 2
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["step"] == 2


# -- data ---------------------------------------------------------------------------------------------------


def test_dataset_skips_unreadable_files(image_dir):
    ds = ImageFolderDataset(image_dir, crop=256, resize_min=256, resize_max=320, seed=0)
    assert len(ds.files) == 4  # recursive, broken.jpg included until it is read
    with pytest.warns(UserWarning, match="broken.jpg"):
        items = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (3, 256, 256) and 0 <= float(x.min()) and float(x.max()) <= 1 for x, _ in items)
    assert ds.skipped == 1 and sum(bad for _, bad in items) == 1
    # deterministic per (seed, epoch, index): another dataset with the seed, after other draws, crops alike
    torch.rand(10)
    again = ImageFolderDataset(image_dir, crop=256, resize_min=256, resize_max=320, seed=0)
    assert torch.equal(again[1][0], items[1][0])
    ds.set_epoch(1)
    assert not torch.equal(ds[1][0], items[1][0])  # a new epoch, new crops


# -- loss networks from local files ----------------------------------------------------------------------


def test_lpips_loads_torchvision_and_lpips_layouts(tmp_path):
    net = small_lpips(3)
    sd = net.state_dict()
    feats = {k: v for k, v in sd.items() if k.startswith("features.")}
    feats["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision's vgg16 file has a classifier
    heads = {k: v for k, v in sd.items() if k.startswith("lin")}
    assert sorted(heads) == [f"lin{k}.model.1.weight" for k in range(5)]
    assert "features.28.weight" in feats  # torchvision's index layout: last conv of VGG16
    torch.save(feats, tmp_path / "vgg16.pth")
    torch.save(heads, tmp_path / "lpips_vgg.pth")
    loaded = load_lpips([tmp_path / "vgg16.pth", tmp_path / "lpips_vgg.pth"], channels=SMALL_LPIPS)
    x, y = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    assert torch.equal(loaded(x, y), net(x, y))
    assert float(loaded(x, x)) == 0.0
    from rpiae.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="lin0"):
        load_lpips(tmp_path / "vgg16.pth", channels=SMALL_LPIPS)


def test_discriminator_loads_dino_layout(tmp_path):
    disc = small_disc(1)
    sd = disc.features.state_dict()
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.11.attn.qkv.weight", "norm.weight"} <= set(sd)
    assert sd["pos_embed"].shape == (1, 785, 32)
    torch.save({**sd, "head.weight": torch.zeros(1)}, tmp_path / "dino.pth")
    other = small_disc(2)
    load_dino_features(other, tmp_path / "dino.pth")
    for k, v in other.features.state_dict().items():
        assert torch.equal(v, sd[k])
    assert all(not p.requires_grad for p in other.features.parameters())
    other.diffaug = False
    logits = other(torch.rand(2, 3, 256, 256) * 2 - 1)
    assert logits.shape == (2, 5 * 784)  # five maps of 28x28 tokens, CLS dropped


def test_diffaug_and_quantize():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    y = diff_augment(x)
    assert y.shape == x.shape and not torch.equal(x, y)
    r = torch.rand(1, 3, 8, 8, requires_grad=True)
    q = quantize_fake(r * 1.2)
    assert torch.allclose(q * 255, (q * 255).round(), atol=1e-4) and float(q.detach().max()) <= 1
    q.sum().backward()
    assert torch.allclose(r.grad, torch.full_like(r, 1.2))  # straight-through


# -- command line: bad input is one line, exit 1 ----------------------------------------------------------


def _cli(*args):
    from rpiae.cli.main import main

    return CliRunner().invoke(main, ["train", *map(str, args)])


@pytest.mark.filterwarnings("ignore:stage I without --init-encoder")
def test_cli_refuses_bad_input(tmp_path, image_dir):
    r = _cli("--stage", 1, "--data", tmp_path / "missing", "--out", tmp_path / "o", "--no-lpips", "--no-gan")
    assert r.exit_code == 1 and "not found" in r.output and "Traceback" not in r.output
    (tmp_path / "empty").mkdir()
    r = _cli("--stage", 1, "--data", tmp_path / "empty", "--out", tmp_path / "o", "--no-lpips", "--no-gan", "--preset", "tiny")
    assert r.exit_code == 1 and "no images" in r.output
    r = _cli("--stage", 1, "--data", image_dir, "--out", tmp_path / "o", "--preset", "tiny")
    assert r.exit_code == 1 and "--lpips-weights" in r.output and "--no-lpips" in r.output
    r = _cli("--stage", 1, "--data", image_dir, "--out", tmp_path / "o", "--no-lpips", "--preset", "tiny")
    assert r.exit_code == 1 and "--disc-weights" in r.output
    r = _cli("--stage", 1, "--data", image_dir, "--out", tmp_path / "o", "--lpips-weights", tmp_path / "nope.pth", "--no-gan")
    assert r.exit_code == 1 and "nope.pth" in r.output
    r = _cli("--stage", 2, "--data", image_dir, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "--resume" in r.output
    r = _cli("--stage", 2, "--data", image_dir, "--out", tmp_path / "o", "--resume", tmp_path / "nothing")
    assert r.exit_code == 1 and "resume" in r.output
    r = _cli("--stage", 1, "--data", image_dir, "--out", tmp_path / "o", "--no-lpips", "--no-gan", "--set", "nonsense=1")
    assert r.exit_code == 2 and "nonsense" in r.output


@pytest.mark.filterwarnings("ignore:skipping unreadable")
def test_cli_stage2_from_stage1(tmp_path, image_dir):
    """`rpiae train --stage 2 --resume s1/last` starts from stage I's raw (not EMA) weights."""
    from rpiae.training.run import run_training

    with pytest.warns(UserWarning):
        run_training(1, image_dir, tmp_path / "s1", preset="tiny", no_lpips=True, no_gan=True, progress=False,
                     overrides=dict(batch_size=1, num_workers=0, max_steps=1, resize_min=256, resize_max=256))
    r = _cli("--stage", 2, "--data", image_dir, "--out", tmp_path / "s2", "--resume", tmp_path / "s1" / "last",
             "--quiet", "--set", "batch_size=1", "--set", "max_steps=1", "--set", "num_workers=0",
             "--set", "resize_min=256", "--set", "resize_max=256", "--val-data", image_dir)
    assert r.exit_code == 0, r.output
    s1 = read_training_checkpoint(tmp_path / "s1" / "last")
    s2 = read_training_checkpoint(tmp_path / "s2" / "last")
    assert s2["stage"] == 2 and s2["step"] == 1
    moved = 0
    for k, v in s1["model"].items():
        if k.startswith(("encoder.", "decoder.")):
            assert torch.equal(v, s2["model"][k]), k
            moved += not torch.equal(v, s1["ema"][k])
    assert moved > 0  # stage I's EMA differs from its raw weights, so the test tells them apart
    assert "val_psnr" in json.loads((tmp_path / "s2" / "metrics.json").read_text())
    grids = list((tmp_path / "s2" / "samples").glob("final_*.png"))
    assert len(grids) == 1 and Image.open(grids[0]).size[1] == 2 * 256  # originals over reconstructions


# -- the shipped checkpoint ----------------------------------------------------------------------------------


def test_shipped_tiny_checkpoint(photos):
    from rpiae.assets import DEFAULT_CHECKPOINT

    if not DEFAULT_CHECKPOINT.is_file():
        pytest.skip("no shipped checkpoint in this checkout")
    info = json.loads(DEFAULT_CHECKPOINT.with_suffix(".json").read_text())
    assert info["preset"] == "tiny" and {"coffee", "china"} <= set(info["held_out_photos"])
    model = RPiAE.from_checkpoint(DEFAULT_CHECKPOINT).float()
    assert model.config.name == "tiny"
    # coffee and china (indices 1 and 6 of the fixture) were never trained on
    x = torch.from_numpy(photos[[1, 6]])
    with torch.no_grad():
        psnrs = psnr(model(x).clamp(0, 1), x)
    assert min(psnrs) > 19.0, psnrs


# -- GPU-facing details, checked on the CPU ----------------------------------------------------------------


def test_resume_on_a_machine_with_fewer_gpus(tmp_path, batch, monkeypatch):
    """A checkpoint saved on a 4-GPU machine (one CUDA RNG state per GPU, older format) or with
    this rank's GPU state resumes on a 1-GPU machine: rank 0 restores its own GPU's state only
    (torch.cuda.set_rng_state_all would index GPUs that do not exist). torch.cuda is a
    recording stand-in that raises IndexError for a GPU index that does not exist, as torch does."""
    import torch.cuda.random as cuda_random

    restored = []

    def set_state(state, device="cuda"):
        index = torch.device(device).index if isinstance(device, (str, torch.device)) else device
        index = 0 if index is None else index
        if index >= 1:
            raise IndexError("list index out of range")
        restored.append((index, int(state[0])))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(cuda_random, "set_rng_state", set_state)
    a = make_trainer(2, tmp_path)
    state = a.state_dict()
    b = make_trainer(2, tmp_path)
    b.device = torch.device("cuda", 0)  # rank 0's GPU on the resuming machine
    old = {**state, "rng": {"torch": state["rng"]["torch"], "cuda": [torch.full((4,), i, dtype=torch.uint8) for i in range(4)]}}
    b.load_state_dict(old)
    assert restored == [(0, 0)]
    new = {**state, "rng": {"torch": state["rng"]["torch"], "cuda_device": torch.full((4,), 7, dtype=torch.uint8)}}
    b.load_state_dict(new)
    assert restored[-1] == (0, 7)
    b.device = torch.device("cpu")  # a CUDA checkpoint resumed on the CPU: nothing to restore
    b.load_state_dict(old)
    assert len(restored) == 2


def test_one_device_read_per_step(tmp_path, batch, monkeypatch):
    """Losses stay on the device during a step; the project's code reads them once per
    optimiser step, however many micro-batches and loss terms (before: one .item() per term
    per micro-batch). Reads inside torch itself (AdamW's step counters, host tensors) are not
    the trainer's and are not counted."""
    import sys

    trainer = make_trainer(1, tmp_path, batch_size=2, grad_accum=2)
    project = str(Path(__file__).resolve().parents[1])
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(project) and "site-packages" not in caller:
                reads.append((_name, Path(caller).name))
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    logs = trainer.train_step([batch[:1], batch[1:2]])
    monkeypatch.undo()
    assert {"l1", "lpips", "pivot", "w_piv", "gan", "w_gan", "loss", "d_loss", "lr", "d_lr"} <= set(logs)
    assert all(isinstance(v, float) and math.isfinite(v) for v in logs.values())
    assert reads == [("tolist", "trainer.py")], reads


def test_ema_is_one_fused_lerp(tmp_path, batch, monkeypatch):
    trainer = make_trainer(2, tmp_path, ema_decay=0.9)
    before = {k: v.clone() for k, v in trainer.ema_params.items()}
    calls = []
    real = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: (calls.append(len(a[0])), real(*a))[1])
    trainer.train_step([batch[:1]])
    assert calls == [len(trainer.params)]
    for name, p in trainer.params.items():
        assert torch.equal(trainer.ema_params[name], before[name].lerp(p.detach(), 0.1)), name
    frozen = set(trainer.ema_params) - set(trainer.params)
    assert frozen and all(torch.equal(trainer.ema_params[n], before[n]) for n in frozen)


def test_deterministic_flag_and_cudnn_autotuning(kernel_flags):
    import os

    from rpiae.training.trainer import configure_kernels

    torch.backends.cudnn.benchmark = False
    configure_kernels(False, torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False and not torch.are_deterministic_algorithms_enabled()
    configure_kernels(False, torch.device("cuda", 0))  # fixed crop size: cuDNN may autotune
    assert torch.backends.cudnn.benchmark is True
    configure_kernels(True, torch.device("cuda", 0))
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert parse_override("deterministic=true") == ("deterministic", True)
    assert TrainConfig().deterministic is False


def test_deterministic_run_still_resumes_exactly(tmp_path, batch, kernel_flags):
    a = make_trainer(2, tmp_path, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    a.train_step([batch[:1]])
    state = copy.deepcopy(a.state_dict())  # a snapshot: the live state dict is the trainer's own tensors
    logs_a = a.train_step([batch[1:2]])
    b = make_trainer(2, tmp_path, deterministic=True, seed=3)
    b.load_state_dict(state)
    assert b.train_step([batch[1:2]]) == logs_a


# -- fine-tuning a finished stage -----------------------------------------------------------------------------


def _patch_offsets(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A target and a reconstruction that differs by a constant offset per 16x16 patch."""
    target = torch.rand(2, 3, 64, 64, generator=g)
    offsets = torch.rand(2, 3, 4, 4, generator=g)
    return target, target + offsets.repeat_interleave(16, dim=2).repeat_interleave(16, dim=3), offsets


def test_patch_seam_loss_sees_only_the_patch_borders():
    from rpiae.training.losses import image_gradient_l1, patch_seam_loss

    g = torch.Generator().manual_seed(0)
    target, recon, offsets = _patch_offsets(g)
    # the step across each border is off by the offsets' difference, the 3 + 3 steps beside it are exact
    col = (offsets[..., :, 1:] - offsets[..., :, :-1]).square()  # (2, 3, 4, 3): one per border column, per patch row
    row = (offsets[..., 1:, :] - offsets[..., :-1, :]).square()
    expected = 0.5 * (col.repeat_interleave(16, dim=2).mean() + row.repeat_interleave(16, dim=3).mean()) / 7
    assert torch.allclose(patch_seam_loss(recon, target, 16), expected)
    # a ramp added everywhere is off by its slope at every step, the border steps included
    ramp = torch.linspace(0, 0.63, 64)  # slope 0.01 per pixel
    assert torch.allclose(patch_seam_loss(target + ramp + ramp[:, None], target, 16), torch.tensor(1e-4), rtol=1e-3)
    # noise more than 3 steps from the borders changes the gradient term, not the seam term
    inner = (torch.arange(64) % 16 >= 4) & (torch.arange(64) % 16 <= 11)
    noisy = target + 0.1 * torch.rand(2, 3, 64, 64, generator=g) * (inner[:, None] & inner[None, :])
    assert patch_seam_loss(noisy, target, 16) == 0
    assert image_gradient_l1(noisy, target) > 0.01


def test_patch_seam_loss_prefers_a_gradual_seam_and_refuses_ridges():
    """A seam of height J costs J^2 in one step and J^2/7 spread over the 7 steps of the band
    (the L1 of the gradients costs both the same, so only a square drives a decoder to blend its
    patches); a ridge along the borders (a line of brighter pixels on either side, which an
    earlier seam term, the step across minus the steps beside it, let a trained decoder draw)
    only adds to it."""
    from rpiae.training.losses import image_gradient_l1, patch_seam_loss

    g = torch.Generator().manual_seed(1)
    target = torch.rand(1, 3, 64, 64, generator=g)
    col = torch.arange(64, dtype=torch.float32)
    sharp = (col >= 32).float() * 0.2  # one seam of 0.2 at the border between columns 31 and 32
    gradual = ((col - 28) / 7).clamp(0, 1) * 0.2  # the same seam spread over steps 28..34 (the band)
    assert torch.allclose(image_gradient_l1(target + sharp, target), image_gradient_l1(target + gradual, target))
    one, spread = patch_seam_loss(target + sharp, target, 16), patch_seam_loss(target + gradual, target, 16)
    assert torch.allclose(spread, one / 7)
    edge = ((col % 16 == 0) | (col % 16 == 15)) & (col > 0) & (col < 63)
    for a in (0.02, 0.1, -0.05):
        assert patch_seam_loss(target + sharp + a * edge, target, 16) > one


@pytest.mark.filterwarnings("ignore:skipping unreadable")
def test_cli_restart_fine_tunes_a_finished_stage(tmp_path, image_dir):
    """`--restart --resume s2/last --stage 2`: a new run from stage II's raw weights, step 0,
    with new loss weights; without --restart the same command would continue s2 instead."""
    from rpiae.training.run import run_training

    small = dict(batch_size=1, num_workers=0, max_steps=1, resize_min=256, resize_max=256)
    with pytest.warns(UserWarning):
        run_training(1, image_dir, tmp_path / "s1", preset="tiny", no_lpips=True, no_gan=True, progress=False,
                     overrides=small)
    with pytest.warns(UserWarning):
        run_training(2, image_dir, tmp_path / "s2", resume=tmp_path / "s1" / "last", no_lpips=True, no_gan=True,
                     progress=False, overrides=small)
    sets = [a for k, v in small.items() for a in ("--set", f"{k}={v}")]
    r = _cli("--stage", 2, "--data", image_dir, "--out", tmp_path / "s2b", "--resume", tmp_path / "s2" / "last",
             "--restart", "--quiet", "--no-lpips", "--no-gan", "--set", "l1_weight=0.5", *sets)
    assert r.exit_code == 0, r.output
    s2 = read_training_checkpoint(tmp_path / "s2" / "last")
    s2b = read_training_checkpoint(tmp_path / "s2b" / "last")
    assert s2b["stage"] == 2 and s2b["step"] == 1  # a new schedule: one step of its own
    trained = [k for k in s2["model"] if not torch.equal(s2["model"][k], s2b["model"][k])]
    assert trained and all(k.startswith("vb_feature_") for k in trained), trained[:5]  # stage II trains the bridge
    assert json.loads((tmp_path / "s2b" / "config.json").read_text())["train"]["l1_weight"] == 0.5
    # refusals: a second restart into the same run; no checkpoint to restart from; stage I
    # (its frozen encoder copy would be wrong)
    r = _cli("--stage", 2, "--data", image_dir, "--out", tmp_path / "s2b", "--resume", tmp_path / "s2" / "last",
             "--restart", "--no-lpips", "--no-gan")
    assert r.exit_code == 1 and "continue it with --resume" in r.output
    r = _cli("--stage", 2, "--data", image_dir, "--out", tmp_path / "x", "--restart", "--no-lpips", "--no-gan")
    assert r.exit_code == 1 and "--resume" in r.output
    r = _cli("--stage", 1, "--data", image_dir, "--out", tmp_path / "x", "--resume", tmp_path / "s1" / "last",
             "--restart", "--no-lpips", "--no-gan")
    assert r.exit_code == 1 and "frozen copy" in r.output


@pytest.mark.filterwarnings("ignore:skipping unreadable")
def test_training_with_loader_workers_leaves_sigchld_alone(tmp_path, image_dir, monkeypatch):
    """The training DataLoader with workers (the default is 4) runs through epochs and never
    installs torch's SIGCHLD handler (with it, a worker's exit could end the process)."""
    import signal

    from torch.utils.data._utils import signal_handling

    from rpiae.training.run import run_training

    before = signal.getsignal(signal.SIGCHLD)
    monkeypatch.setattr(signal_handling, "_SIGCHLD_handler_set", False)  # as in a fresh process
    with pytest.warns(UserWarning):
        run_training(1, image_dir, tmp_path / "s1", preset="tiny", no_lpips=True, no_gan=True, progress=False,
                     overrides=dict(batch_size=1, num_workers=1, epochs=2, warmup_epochs=0.0,
                                    resize_min=256, resize_max=256))
    assert read_training_checkpoint(tmp_path / "s1" / "last")["step"] >= 2
    assert signal.getsignal(signal.SIGCHLD) is before and signal_handling._SIGCHLD_handler_set is False
