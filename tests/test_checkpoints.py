"""Checkpoint formats: the release's .pt, our safetensors, DINOv2 (HF/Meta/timm), RAE decoder."""

from __future__ import annotations

import pickle
import sys

import pytest
import torch

from rpiae import RPiAE
from rpiae.checkpoints import CheckpointError, load_encoder_weights, load_pixel_decoder_weights, read_config
from tests.conftest import make_tiny
from tests.reference import ReferenceRPiAE


def release_dict(model: RPiAE, ema_model: RPiAE | None = None) -> dict:
    """The authors' training-checkpoint layout: ema + model (with the teacher inside), disc,
    optimizer and scheduler state."""
    sd = model.state_dict()
    teacher = {f"teacher_encoder.{k[len('encoder.'):]}": v.clone() for k, v in sd.items() if k.startswith("encoder.")}
    return {
        "ema": (ema_model or model).state_dict(),
        "model": {**sd, **teacher},
        "disc": {"heads.0.weight": torch.randn(4, 4)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.95), "params": [0, 1]}]},
        "scheduler": {"last_epoch": 3, "base_lrs": [2e-4]},
        "epoch": 16,
    }


def outputs(model, x):
    with torch.no_grad():
        z = model.encode(x)
        return z, model.decode(z)


def test_release_checkpoint_loads_ema_and_matches(tmp_path, tiny_model):
    other = make_tiny(seed=1)
    path = tmp_path / "rpiae_stage3_1_c64_ema.pt"
    torch.save(release_dict(other, ema_model=tiny_model), path)
    loaded = RPiAE.from_checkpoint(path)
    assert loaded.config.name == "tiny"
    x = torch.rand(2, 3, 256, 256)
    for a, b in zip(outputs(loaded, x), outputs(tiny_model, x)):
        assert torch.equal(a, b)


def test_release_checkpoint_without_ema_uses_model(tmp_path, tiny_model):
    d = release_dict(tiny_model)
    del d["ema"]
    torch.save(d, tmp_path / "ck.pt")
    loaded = RPiAE.from_checkpoint(tmp_path / "ck.pt")
    x = torch.rand(1, 3, 256, 256)
    assert torch.equal(outputs(loaded, x)[1], outputs(tiny_model, x)[1])


def test_release_layout_matches_independent_reference(tiny_model):
    """Our modules vs the architecture assembled from transformers/torch.nn parts."""
    ref = ReferenceRPiAE(tiny_model.config, tiny_model.state_dict())
    x = torch.rand(2, 3, 256, 256)
    z_ref = ref.encode(x)
    z, y = outputs(tiny_model, x)
    assert (z - z_ref).abs().max().item() <= 1e-4
    y_ref = ref.decode(z)
    assert (y - y_ref).abs().max().item() <= 1e-4


def test_safetensors_round_trip_carries_config(tmp_path, tiny_model):
    path = tiny_model.save(tmp_path / "m.safetensors")
    assert read_config(path) == tiny_model.config
    loaded = RPiAE.from_checkpoint(path)
    x = torch.rand(2, 3, 256, 256)
    for a, b in zip(outputs(loaded, x), outputs(tiny_model, x)):
        assert torch.equal(a, b)


def _mapped_ranges(path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of `path` (/proc/self/maps)."""
    spans = []
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith(str(path)):
            lo, hi = line.split()[0].split("-")
            spans.append((int(lo, 16), int(hi, 16)))
    return spans


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_from_checkpoint_takes_the_files_tensors_without_a_copy(tmp_path, tiny_model):
    """Built on the meta device, the weights are the file's (memory-mapped, copy-on-write):
    nothing left on meta, the constants recomputed, writes stay in the process."""
    path = tiny_model.save(tmp_path / "m.safetensors")
    loaded = RPiAE.from_checkpoint(path)
    tensors = [*loaded.parameters(), *loaded.buffers()]
    assert not any(t.is_meta for t in tensors)
    spans = _mapped_ranges(path.resolve())
    inside = [p for p in loaded.parameters() if any(lo <= p.data_ptr() < hi for lo, hi in spans)]
    assert spans and len(inside) == len(list(loaded.parameters()))  # no parameter was copied
    for name, buf in tiny_model.named_buffers():  # mean/std and the resized position embedding
        assert torch.equal(dict(loaded.named_buffers())[name], buf), name
    x = torch.rand(2, 3, 256, 256)
    for a, b in zip(outputs(loaded, x), outputs(tiny_model, x)):
        assert torch.equal(a, b)
    w = loaded.decoder.decoder_pred.weight
    before = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)  # copy-on-write: the file keeps its weights
    del loaded
    assert torch.equal(RPiAE.from_checkpoint(path).decoder.decoder_pred.weight, before)


def test_fp16_safetensors_loads_as_fp32(tmp_path, tiny_model):
    path = tiny_model.save(tmp_path / "m16.safetensors", dtype=torch.float16)
    loaded = RPiAE.from_checkpoint(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.rand(1, 3, 256, 256)
    z16, z32 = outputs(loaded, x)[0], outputs(tiny_model, x)[0]
    assert torch.nn.functional.cosine_similarity(z16.flatten(), z32.flatten(), dim=0) > 0.999


def test_mismatched_checkpoint_names_the_keys(tmp_path, tiny_model):
    sd = dict(tiny_model.state_dict())
    sd.pop("decoder.decoder_pred.weight")
    sd["decoder.extra.weight"] = torch.zeros(1)
    torch.save({"ema": sd}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="match no preset"):
        RPiAE.from_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        RPiAE.from_checkpoint(tmp_path / "bad.pt", config="tiny")
    msg = str(e.value)
    assert "missing keys: decoder.decoder_pred.weight" in msg and "unexpected keys: decoder.extra.weight" in msg
    assert "\n" not in msg


def test_shape_mismatch_is_reported(tmp_path):
    b_like = RPiAE.from_preset("tiny").state_dict()
    b_like["decoder.decoder_pred.bias"] = torch.zeros(7)
    torch.save({"model": b_like}, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatch .*decoder_pred.bias \(7,\) vs \(768,\)"):
        RPiAE.from_checkpoint(tmp_path / "shape.pt", config="tiny")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_arbitrary_pickles_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"ema": _Evil()}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        RPiAE.from_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        RPiAE.from_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        RPiAE.from_checkpoint(tmp_path / "junk.safetensors")


# -- DINOv2 layouts ----------------------------------------------------------------------------------


def hf_encoder_sd(model: RPiAE) -> dict:
    """The public HF file: our keys plus the final-norm affine RPiAE drops."""
    sd = {k[len("encoder.encoder.") :]: v.clone() for k, v in model.state_dict().items() if k.startswith("encoder.encoder.")}
    c = model.config.encoder_hidden_size
    sd["layernorm.weight"], sd["layernorm.bias"] = torch.ones(c), torch.zeros(c)
    return sd


def hf_to_meta(sd: dict, depth: int) -> dict:
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "mask_token": sd["embeddings.mask_token"],
        "register_tokens": sd["embeddings.register_tokens"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    names = {
        "norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense",
        "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    }
    for i in range(depth):
        p = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [sd[p + f"attention.attention.{n}.{kind}"] for n in ("query", "key", "value")]
            )
            for meta, hf in names.items():
                out[f"blocks.{i}.{meta}.{kind}"] = sd[p + f"{hf}.{kind}"]
        out[f"blocks.{i}.ls1.gamma"] = sd[p + "layer_scale1.lambda1"]
        out[f"blocks.{i}.ls2.gamma"] = sd[p + "layer_scale2.lambda1"]
    return out


def meta_to_timm(sd: dict) -> dict:
    out = dict(sd)
    pos = out.pop("pos_embed")
    out["pos_embed"] = pos[:, 1:].clone()
    out["cls_token"] = sd["cls_token"] + pos[:, :1]  # timm folds the CLS pos-embed in
    out["reg_token"] = out.pop("register_tokens")
    del out["mask_token"]
    return out


@pytest.mark.parametrize("layout", ["hf", "meta", "timm"])
def test_dinov2_layouts_give_the_same_encoder(tmp_path, tiny_model, layout):
    hf = hf_encoder_sd(tiny_model)
    sd = {"hf": lambda: hf, "meta": lambda: hf_to_meta(hf, tiny_model.config.encoder_depth)}
    sd["timm"] = lambda: meta_to_timm(sd["meta"]())
    path = tmp_path / f"dinov2_{layout}.pth"
    torch.save(sd[layout](), path)
    fresh = RPiAE.from_preset("tiny")
    assert load_encoder_weights(fresh, path) == layout
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        a, b = fresh.tokens(x), tiny_model.tokens(x)
    assert (a - b).abs().max().item() <= 1e-5


def test_dinov2_hf_safetensors_with_transformers5_names(tmp_path, tiny_model):
    """transformers >= 5 saves q_proj/k_proj/v_proj/o_proj; both namings load."""
    from safetensors.torch import save_file

    from tests.reference import _hf4_to_hf5

    sd = _hf4_to_hf5(hf_encoder_sd(tiny_model))
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    fresh = RPiAE.from_preset("tiny")
    load_encoder_weights(fresh, tmp_path / "model.safetensors")
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(fresh.tokens(x), tiny_model.tokens(x))


def test_encoder_against_transformers_dinov2(tiny_model):
    """Our encoder vs `transformers.Dinov2WithRegistersModel` on shared random weights."""
    ref = ReferenceRPiAE(tiny_model.config, tiny_model.state_dict())
    x = torch.rand(2, 3, 256, 256)
    xx = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
    with torch.no_grad():
        hf = ref.dino(pixel_values=(xx - tiny_model.encoder.mean) / tiny_model.encoder.std).last_hidden_state[:, 5:]
        ours = tiny_model.tokens(x)
    assert (hf - ours).abs().max().item() <= 1e-4


def test_unknown_encoder_layout_is_refused(tmp_path):
    torch.save({"foo": torch.zeros(1)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="unrecognised encoder weights"):
        load_encoder_weights(RPiAE.from_preset("tiny"), tmp_path / "x.pth")


def test_rae_decoder_state_dict_loads(tmp_path, tiny_model):
    dec = {k[len("decoder.") :]: v for k, v in tiny_model.state_dict().items() if k.startswith("decoder.")}
    torch.save(dec, tmp_path / "rae_decoder.pt")
    fresh = RPiAE.from_preset("tiny")
    load_pixel_decoder_weights(fresh, tmp_path / "rae_decoder.pt")
    tokens = torch.randn(1, 256, tiny_model.config.encoder_hidden_size)
    with torch.no_grad():
        assert torch.equal(fresh.decoder(tokens), tiny_model.decoder(tokens))
    dec.pop("decoder_norm.weight")
    torch.save(dec, tmp_path / "bad_decoder.pt")
    with pytest.raises(CheckpointError, match="missing keys: decoder_norm.weight"):
        load_pixel_decoder_weights(fresh, tmp_path / "bad_decoder.pt")


@pytest.mark.slow
def test_rpiae_b_release_layout_770_keys_loads_strictly(tmp_path):
    """The paper-size model, saved in the release's exact layout from random weights."""
    torch.manual_seed(0)
    model = RPiAE.from_preset("rpiae-b")
    path = tmp_path / "rpiae_stage3_1_c64_ema.pt"
    torch.save({"ema": model.state_dict(), "epoch": 16}, path)
    loaded = RPiAE.from_checkpoint(path)
    assert loaded.config.name == "rpiae-b" and len(loaded.state_dict()) == 770
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        z = loaded.encode(x)
        assert torch.equal(z, model.encode(x))
        ref = ReferenceRPiAE(loaded.config, loaded.state_dict())
        assert (ref.encode(x) - z).abs().max().item() <= 1e-4
