"""Checkpoint formats: read, convert to the release's key layout, load strictly.

Formats (each loaded strictly; a mismatch raises `CheckpointError` naming the keys):

- the authors' release `.pt` (`rpiae_stage3_1_c64_ema.pt`): a dict whose `"ema"` (else
  `"model"`) entry is the 770-key state dict; `teacher_encoder.*`, `disc`, optimizer and
  scheduler entries are ignored;
- this project's `.safetensors`: the same 770 keys, the model config in the metadata;
- DINOv2 ViT/14-reg weights for the encoder, in HF, Meta-original or timm layout;
- SigLIP2 vision weights for a `siglip2` encoder, in HF `Siglip2VisionModel` (or the vision
  tower of `Siglip2Model`) layout;
- RAE's released ViT-XL decoder state dict for the pixel decoder.

Files are never unpickled: `.pt`/`.pth`/`.bin` go through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rpiae.config import PRESETS, RPiAEConfig
from rpiae.fileio import atomic_file, sha256_file
from rpiae.hub import HUB_CONFIG, HUB_WEIGHTS, is_hub_layout
from rpiae.version import __version__

FORMAT_TAG = "rpiae"
StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model."""


# -- reading ----------------------------------------------------------------------------------


def read_file(path: str | Path) -> tuple[object, dict[str, str]]:
    """Return (object, safetensors metadata) without unpickling anything arbitrary."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    head = _head(path)
    if path.suffix == ".safetensors" or _is_safetensors(head):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if not (head.startswith(_ZIP_MAGIC) or head[:1] == _PICKLE_PROTO):
        raise CheckpointError(f"{path} is not a checkpoint ({_what_file(path, head)}); expected a .safetensors "
                              "file or a torch checkpoint (.pt/.pth/.bin)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        refused = _REFUSED_GLOBAL.search(text)
        if refused:
            raise CheckpointError(
                f"{path}: refused by the weights-only loader: the checkpoint holds the Python object "
                f"{refused.group(1)}, and only tensors and plain containers are loaded (checkpoints are untrusted; "
                "save the weights as a plain state dict or .safetensors)"
            ) from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
        first = lines[0].split(". ")[0][:160] if lines else "no details"
        raise CheckpointError(f"{path}: damaged, or not a torch checkpoint the weights-only loader can read "
                              f"({type(e).__name__}: {first}); files that need arbitrary unpickling are refused") from None
    return obj, {}


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip format (PyTorch >= 1.6)
_PICKLE_PROTO = b"\x80"  # a pickle of protocol 2+ (torch.save's legacy format)
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_SIGNATURES = (  # what a file that is not a checkpoint is, by its first bytes
    (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive"), (b"\x7fELF", "an executable"), (b"%PDF", "a PDF document"),
    (b"\x93NUMPY", "a NumPy .npy array"), (b"\x89HDF", "an HDF5 file"),
)


def _head(path: Path, n: int = 512) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def _is_safetensors(head: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then the JSON header."""
    return len(head) > 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < (100 << 20)


def _what_file(path: Path, head: bytes) -> str:
    """What a file that is not a checkpoint looks like (a few words)."""
    if not head:
        return "an empty file"
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return what
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image"
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and (b"onnx" in head.lower() or b"pytorch" in head)):
        return "an ONNX graph"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        text = head[: e.start].decode("utf-8") if e.start >= len(head) - 4 else None  # a character cut at the end
    if text is not None and all(c.isprintable() or c in "\n\r\t" for c in text):
        return "a JSON file" if text.lstrip().startswith(("{", "[")) else "a text file"
    return "an unknown format"


def _tensors_only(d: Mapping) -> StateDict:
    return {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}


def unwrap_state_dict(obj: object, preferred: tuple[str, ...] = ("ema", "model", "state_dict")) -> StateDict:
    """Find the state dict inside a training checkpoint and strip DDP/compile prefixes."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a dict of tensors, found {type(obj).__name__}")
    for key in preferred:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    sd = _tensors_only(obj)
    if not sd:
        raise CheckpointError(f"no tensors found (top-level keys: {', '.join(map(str, list(obj)[:8]))})")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


# -- strict loading with readable errors --------------------------------------------------------


def _summarise(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_keys(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch (checkpoint vs model): {_summarise(wrong, 3)}")
    if problems:
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(problems))


def load_strict(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str, assign: bool = False) -> None:
    """Load every key, each in the module's dtype. `assign`: the module's tensors become the
    state dict's (for a module built on the meta device: no second copy of the weights)."""
    check_keys(module, sd, what)
    ref = module.state_dict()
    module.load_state_dict({k: v.to(ref[k].dtype) for k, v in sd.items()}, strict=True, assign=assign)


# -- the whole model -------------------------------------------------------------------------------


def model_state_dict(obj: object) -> StateDict:
    """The 770-key inference state dict from a release/training checkpoint."""
    sd = unwrap_state_dict(obj)
    # training-only parts that live in the authors' model state dict
    return {k: v for k, v in sd.items() if not k.startswith(("teacher_encoder.", "pivot.", "disc."))}


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file; of a Hub-layout folder, of its config and weights together."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    import hashlib

    return hashlib.sha256((sha256_file(path / HUB_CONFIG) + sha256_file(path / HUB_WEIGHTS)).encode()).hexdigest()


def read_hub_layout(folder: str | Path) -> tuple[RPiAEConfig, StateDict]:
    """A folder in the project's Hub layout (`rpiae push`, `AutoencoderRPiAE.save_pretrained`):
    the config from `config.json`, the release-layout state dict from the diffusers weights
    file (keys under `model.`)."""
    folder = Path(folder)
    cfg = json.loads((folder / HUB_CONFIG).read_text())
    obj, _ = read_file(folder / HUB_WEIGHTS)
    sd = {k[len("model.") :]: v for k, v in obj.items() if k.startswith("model.")}
    if not sd:
        raise CheckpointError(f"{folder / HUB_WEIGHTS}: no weights under model.* (not an AutoencoderRPiAE file)")
    config = RPiAEConfig.from_dict(cfg["rpiae_config"])
    # latent statistics (per channel or per element) stay with the model: it normalises its latent
    mean, std = obj.get("_latents_mean"), obj.get("_latents_std")
    if mean is None and cfg.get("latents_mean") is not None:  # folders written before the buffers
        mean, std = torch.tensor(cfg["latents_mean"]), torch.tensor(cfg["latents_std"])
        if mean.dim() == 1:
            mean, std = mean[:, None, None], std[:, None, None]
    if mean is not None and cfg.get("latents_stats", "channel") != "none":
        shape = tuple(config.latent_shape)
        config = dataclasses.replace(config, latent_norm=True)
        sd["latent_mean"] = mean.float().expand(shape).clone()
        sd["latent_var"] = (std.float() ** 2 - config.latent_norm_eps).expand(shape).clone()
    return config, sd


def read_model_checkpoint(path: str | Path, config: RPiAEConfig | str | None = None) -> tuple[RPiAEConfig | None, StateDict]:
    """(config, release-layout state dict) of a checkpoint file or Hub-layout folder. The
    config is `config` (a preset name or JSON allowed), else the one the file carries, else
    None: the caller matches it against the presets by shapes (`rpiae.model.infer_config`)."""
    if isinstance(config, str):
        config = PRESETS.get(config) or RPiAEConfig.from_json(config)
    if Path(path).is_dir():
        if not is_hub_layout(path):
            raise CheckpointError(f"{path}: a folder that is neither a bundle nor an AutoencoderRPiAE (Hub) folder")
        hub_config, sd = read_hub_layout(path)
        return config or hub_config, sd
    obj, meta = read_file(path)
    if meta.get("format") == FORMAT_TAG and config is None:
        config = RPiAEConfig.from_json(meta["config"])
    sd = model_state_dict(obj)
    if config is None and isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping):
        config = RPiAEConfig.from_dict(obj["config"])  # our trainer's checkpoints
    return config, sd


def save_model(model, path: str | Path, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> Path:
    """This project's format: the release's keys in safetensors, config in the metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"the project's checkpoints are .safetensors files, got {path.name}")
    keep = {"latent_mean", "latent_var"}  # dataset statistics stay float32 whatever `dtype`
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() and k not in keep else v).contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    meta = {"format": FORMAT_TAG, "config": model.config.to_json(), "rpiae_version": __version__}
    meta.update(metadata or {})
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_latent_stats(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element latent statistics (mean, var) as float32, from `rpiae extract`'s
    `latents_stats.safetensors` or a `{"mean": ..., "var": ...}` torch file in the RPiAE
    authors' `calculate_stat.py` format (an extract folder's `normalization_stats.pt`)."""
    obj, _ = read_file(path)
    if not isinstance(obj, Mapping) or not all(isinstance(obj.get(k), torch.Tensor) for k in ("mean", "var")):
        raise CheckpointError(f"{path}: not a latent statistics file (expected tensors 'mean' and 'var')")
    mean, var = obj["mean"].float(), obj["var"].float()
    if mean.shape != var.shape or mean.dim() != 3:
        raise CheckpointError(f"{path}: mean {tuple(mean.shape)} and var {tuple(var.shape)} must both be (C, H, W)")
    return mean, var


def read_config(path: str | Path) -> RPiAEConfig | None:
    """The config stored in one of the project's safetensors files or Hub-layout folders (None
    for other files)."""
    if is_hub_layout(path):
        return RPiAEConfig.from_dict(json.loads((Path(path) / HUB_CONFIG).read_text())["rpiae_config"])
    if Path(path).suffix != ".safetensors":
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return RPiAEConfig.from_json(meta["config"]) if meta.get("format") == FORMAT_TAG else None


# -- encoder initialisation: DINOv2 in HF, Meta-original or timm layout -------------------------

_META_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_META_NAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.proj.weight": "attention.output.dense.weight",
    "attn.proj.bias": "attention.output.dense.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "ls2.gamma": "layer_scale2.lambda1",
}
# Final-norm affine and classifier heads exist in the public DINOv2 files but not in RPiAE
# (its last LayerNorm has no affine), so they are dropped by name, and only these.
_UNUSED_HF = ("layernorm.weight", "layernorm.bias", "pooler.dense.weight", "pooler.dense.bias")
_UNUSED_META = ("norm.weight", "norm.bias", "head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias")


# transformers >= 5 names the attention projections q_proj/k_proj/v_proj/o_proj in memory;
# the released files (and the RPiAE release) use attention.attention.{query,key,value}.
_HF5_NAMES = re.compile(r"\.attention\.(q|k|v|o)_proj\.")
_HF5_TO_HF4 = {"q": "attention.query", "k": "attention.key", "v": "attention.value", "o": "output.dense"}


def _hf5_to_hf4(m: re.Match) -> str:
    return f".attention.{_HF5_TO_HF4[m.group(1)]}."


# SigLIP2's attention-pooling head (used for its image-text loss) is not part of E.
_UNUSED_SIGLIP2 = ("head.",)


def detect_encoder_layout(sd: Mapping[str, torch.Tensor]) -> str:
    if "embeddings.cls_token" in sd:
        return "hf"
    if "embeddings.patch_embedding.weight" in sd:
        return "siglip2"
    if "reg_token" in sd and "pos_embed" in sd:
        return "timm"
    if "register_tokens" in sd and "pos_embed" in sd:
        return "meta"
    raise CheckpointError(
        "unrecognised encoder weights: expected DINOv2-with-registers keys in HF "
        "(embeddings.cls_token), Meta (pos_embed, register_tokens) or timm (pos_embed, reg_token) layout, "
        "or SigLIP2 keys in HF layout (embeddings.patch_embedding)"
    )


def _blocks_to_hf(sd: Mapping[str, torch.Tensor], out: StateDict) -> list[str]:
    leftovers = []
    for k, v in sd.items():
        m = _META_BLOCK.match(k)
        if not m:
            leftovers.append(k)
            continue
        i, name = m.groups()
        prefix = f"encoder.layer.{i}."
        if name in ("attn.qkv.weight", "attn.qkv.bias"):
            q, kk, vv = v.chunk(3, dim=0)  # rows 0:C, C:2C, 2C:3C
            kind = name.rsplit(".", 1)[1]
            out[prefix + f"attention.attention.query.{kind}"] = q
            out[prefix + f"attention.attention.key.{kind}"] = kk
            out[prefix + f"attention.attention.value.{kind}"] = vv
        elif name in _META_NAMES:
            out[prefix + _META_NAMES[name]] = v
        else:
            out[k] = v  # reported as unexpected by the strict check
    return leftovers


def meta_to_hf(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Meta's original DINOv2 layout: pos_embed (1, 1+G*G, C) with a CLS row."""
    out: StateDict = {}
    for k in _blocks_to_hf(sd, out):
        v = sd[k]
        if k == "cls_token":
            out["embeddings.cls_token"] = v
        elif k == "mask_token":
            out["embeddings.mask_token"] = v.reshape(1, -1)
        elif k == "register_tokens":
            out["embeddings.register_tokens"] = v
        elif k == "pos_embed":
            out["embeddings.position_embeddings"] = v
        elif k.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + k.rsplit(".", 1)[1]] = v
        elif k not in _UNUSED_META:
            out[k] = v
    return out


def timm_to_hf(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """timm `vit_*_reg4_dinov2`: pos_embed has no CLS row, the CLS pos-embed is folded into
    cls_token, registers are `reg_token`, no mask_token. A zero CLS pos-embed row and a zero
    mask token reproduce it exactly."""
    sd = dict(sd)
    pos = sd.pop("pos_embed")
    sd["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    sd["register_tokens"] = sd.pop("reg_token")
    sd.setdefault("mask_token", torch.zeros(1, pos.shape[-1], dtype=pos.dtype))
    return meta_to_hf(sd)


def encoder_state_dict(obj: object) -> tuple[StateDict, str]:
    """Any supported DINOv2 or SigLIP2 file -> (`DinoV2Encoder` / `Siglip2Encoder` keys, layout name)."""
    sd = unwrap_state_dict(obj, preferred=("teacher", "model", "state_dict"))
    for prefix in ("encoder.encoder.", "dinov2.", "backbone.", "vision_model."):
        if any(k.startswith(prefix + "embeddings.") for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    layout = detect_encoder_layout(sd)
    if layout == "meta":
        return meta_to_hf(sd), layout
    if layout == "timm":
        return timm_to_hf(sd), layout
    if layout == "siglip2":
        return {k: v for k, v in sd.items() if not k.startswith(_UNUSED_SIGLIP2)}, layout
    return {_HF5_NAMES.sub(_hf5_to_hf4, k): v for k, v in sd.items() if k not in _UNUSED_HF}, layout


def load_encoder_weights(model, path: str | Path) -> str:
    """Initialise E from DINOv2 (HF, Meta or timm layout) or SigLIP2 (HF layout) weights, as
    the model's `encoder_type` needs; returns the layout found."""
    obj, _ = read_file(path)
    sd, layout = encoder_state_dict(obj)
    load_strict(model.encoder.encoder, sd, f"encoder weights {path} ({layout} layout)")
    model.encoder.refresh_pos_embed()
    return layout


# -- pixel decoder initialisation: RAE's released decoder ------------------------------------------


def pixel_decoder_state_dict(obj: object) -> StateDict:
    sd = unwrap_state_dict(obj)
    if any(k.startswith("decoder.decoder_") for k in sd):
        sd = {k[len("decoder.") :]: v for k, v in sd.items() if k.startswith("decoder.")}
    return sd


def load_pixel_decoder_weights(model, path: str | Path) -> None:
    """Initialise D from RAE's released ViT-XL decoder (a raw decoder state dict)."""
    obj, _ = read_file(path)
    load_strict(model.decoder, pixel_decoder_state_dict(obj), f"pixel decoder weights {path}")


def describe(path: str | Path) -> dict:
    """What a checkpoint file is, for `rpiae info`."""
    obj, meta = read_file(path)
    info: dict = {"path": str(path)}
    if meta.get("format") == FORMAT_TAG:
        info["format"] = "rpiae safetensors"
        info["config"] = json.loads(meta["config"])
    else:
        info["format"] = "torch checkpoint"
        if isinstance(obj, Mapping):
            info["top_level_keys"] = [str(k) for k in obj]
    sd = model_state_dict(obj)
    info["tensors"] = len(sd)
    info["parameters"] = int(sum(v.numel() for v in sd.values()))
    info["dtypes"] = sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})
    return info
