"""Models on the Hugging Face Hub (and in its local cache), for `RPiAE.from_pretrained` and
every command's `--model hf://owner/name`.

A model reference is `hf://owner/name`, optionally `hf://owner/name@revision`, or a bare
`owner/name` that is not a local path. What is fetched:

- a repository in this project's Hub layout (what `rpiae push` writes, which is also
  diffusers' layout for `AutoencoderRPiAE`): `config.json` with `"_class_name":
  "AutoencoderRPiAE"` and `diffusion_pytorch_model.safetensors`;
- otherwise the authors' release file (`qihoo360/RPiAE`: `rpiae_stage3_1_c64_ema.pt`), or
  the file named by `filename=`.

`huggingface_hub` does the downloading and caching; `HF_HUB_OFFLINE=1` (or
`local_files_only=True`) reads the cache only. A Hub that cannot be reached is one line
saying so, never a traceback.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

RELEASE_REPO = "qihoo360/RPiAE"
RELEASE_FILE = "rpiae_stage3_1_c64_ema.pt"
HUB_CONFIG = "config.json"
HUB_WEIGHTS = "diffusion_pytorch_model.safetensors"
HUB_CLASS = "AutoencoderRPiAE"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(ValueError):
    """A Hub model that cannot be resolved (one line: what and why)."""


def is_hub_reference(ref: str | Path) -> bool:
    s = str(ref)
    return s.startswith("hf://") or (_REPO_ID.match(s) is not None and not Path(s).exists())


def parse_reference(ref: str) -> tuple[str, str | None]:
    """`hf://owner/name@rev` -> ("owner/name", "rev")."""
    body = ref[len("hf://") :] if ref.startswith("hf://") else ref
    repo, _, revision = body.partition("@")
    if not _REPO_ID.match(repo):
        raise HubError(f"{ref}: not a Hub model reference (expected hf://owner/name[@revision])")
    return repo, revision or None


def is_hub_layout(folder: str | Path) -> bool:
    """A folder in this project's Hub layout (`rpiae push` / `AutoencoderRPiAE.save_pretrained`)."""
    cfg = Path(folder) / HUB_CONFIG
    if not cfg.is_file() or not (Path(folder) / HUB_WEIGHTS).is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("_class_name") == HUB_CLASS
    except (OSError, json.JSONDecodeError):
        return False


def _offline(local_files_only: bool | None) -> bool:
    if local_files_only is not None:
        return local_files_only
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def download(
    repo_id: str, revision: str | None = None, filename: str | None = None, local_files_only: bool | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """A local path for a Hub model: the snapshot folder (Hub layout) or the weights file."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
            RepositoryNotFoundError, RevisionNotFoundError,
        )
    except ImportError:
        raise HubError("loading from the Hugging Face Hub needs huggingface_hub: pip install huggingface_hub") from None
    offline = _offline(local_files_only)
    where = f"{repo_id}" + (f"@{revision}" if revision else "")

    def fetch(name: str) -> Path:
        return Path(hf_hub_download(repo_id, name, revision=revision, local_files_only=offline, cache_dir=cache_dir))

    try:
        if filename is not None:
            return fetch(filename)
        try:
            cfg = fetch(HUB_CONFIG)
        except EntryNotFoundError:
            cfg = None
        if cfg is not None and json.loads(cfg.read_text()).get("_class_name") == HUB_CLASS:
            fetch(HUB_WEIGHTS)
            return cfg.parent
        return fetch(RELEASE_FILE)
    except LocalEntryNotFoundError:
        hint = "the Hub cannot be reached" if not offline else "offline mode is on (HF_HUB_OFFLINE / local_files_only)"
        raise HubError(f"{where}: not in the local Hugging Face cache and {hint}; download it on a connected machine "
                       "(huggingface-cli download) or pass a local path") from None
    except OfflineModeIsEnabled:
        raise HubError(f"{where}: offline mode is on and the file is not cached") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise HubError(f"{where}: {type(e).__name__} (no such repository or revision, or no access)") from None
    except EntryNotFoundError:
        raise HubError(f"{where}: no {filename or RELEASE_FILE} and no {HUB_CLASS} config in the repository") from None
    except (HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"{where}: cannot reach the Hugging Face Hub ({first[:120]}); "
                       "set HF_HUB_OFFLINE=1 to use the local cache") from None


def resolve(ref: str | Path, revision: str | None = None, filename: str | None = None,
            local_files_only: bool | None = None) -> Path:
    """A local model path for `ref`: local paths as they are, Hub references downloaded/cached."""
    if not is_hub_reference(ref):
        return Path(ref)
    repo, rev = parse_reference(str(ref))
    return download(repo, revision or rev, filename, local_files_only)


# -- publishing ---------------------------------------------------------------------------------


def model_card(repo_id: str, config: dict, eval_report: dict | None = None, bundle_manifest: dict | None = None,
               latents: dict | None = None) -> str:
    """README.md for a Hub repository: what the model is, how to load it, and what was measured
    (`rpiae eval` rows, the export bundle's parity results), each with where it came from."""
    what = ("PS-VAE image tokenizer (arXiv 2512.17909), served by rpiae" if config.get("family") == "ps-vae"
            else "RPiAE image tokenizer (Representation-Pivoted Autoencoder, arXiv 2603.19206)")
    lines = [
        "---", "library_name: rpiae", "tags:", "- image-tokenizer", "- autoencoder", "- rpiae", "- diffusers", "---", "",
        f"# {repo_id.split('/')[-1]}", "",
        f"{what}, preset `{config.get('name')}`: "
        f"{config.get('image_size')}x{config.get('image_size')} RGB images <-> latents of shape "
        f"({config.get('latent_channels')}, {config['image_size'] // config['decoder_patch_size']}, "
        f"{config['image_size'] // config['decoder_patch_size']}).", "",
        "## Use", "", "```python", "from rpiae import RPiAE",
        f'model = RPiAE.from_pretrained("{repo_id}")        # images in [0, 1] -> model.encode / model.decode', "",
        "from rpiae.integrations.diffusers import AutoencoderRPiAE",
        f'vae = AutoencoderRPiAE.from_pretrained("{repo_id}")  # diffusers API, images in [-1, 1]', "```", "",
        f"Command line: `rpiae encode --model hf://{repo_id} photo.jpg -o latents.npy`.", "",
    ]
    if latents:
        lines += [f"Latent statistics in the config: {latents}.", ""]
    rows = (eval_report or {}).get("rows") or []
    if rows:
        lines += ["## Reconstruction quality (`rpiae eval`)", "",
                  f"Data: {eval_report.get('data', 'see the report')}; command: `{eval_report.get('command', 'rpiae eval')}`.", "",
                  "| backend | precision | images | PSNR (dB) | SSIM | LPIPS | rFID |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            cells = [r.get("backend"), r.get("precision"), r.get("n")] + [
                f"{r[k]:.4g}" if isinstance(r.get(k), (int, float)) else (r.get(k) or "-") for k in ("psnr", "ssim", "lpips", "rfid")
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    parity = (bundle_manifest or {}).get("parity") or []
    if parity:
        lines += ["## Exported graphs: parity with PyTorch (`rpiae export`)", "",
                  "| backend | precision | batch | check | value | bound | ok |", "|---|---|---|---|---|---|---|"]
        for r in parity:
            for name, c in r.get("checks", {}).items():
                lines.append(f"| {r.get('backend', '')} | {r['precision']} | {r['metrics']['batch']} | {name} | "
                             f"{c['value']:.6g} | {c['bound']:.6g} | {'yes' if c['ok'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def write_hub_folder(model, out: str | Path, repo_id: str, eval_report: dict | None = None,
                     bundle_manifest: dict | None = None, latent_stats: str | Path | None = None,
                     per: str = "channel") -> Path:
    """The repository's files (`AutoencoderRPiAE.save_pretrained` + README.md) in `out`, atomically."""
    from rpiae.fileio import atomic_dir
    from rpiae.integrations.diffusers import AutoencoderRPiAE

    vae = AutoencoderRPiAE.from_rpiae(model.float(), latent_stats=latent_stats, per=per)
    out = Path(out)
    with atomic_dir(out, overwrite=True) as tmp:
        vae.save_pretrained(tmp)
        stats = None
        if vae.config.latents_mean is not None:
            stats = f"latents_mean/latents_std per {per}" + (f" from {Path(latent_stats).name}" if latent_stats else "")
        (tmp / "README.md").write_text(model_card(repo_id, model.config.to_dict(), eval_report, bundle_manifest, stats))
    return out


def push(repo_id: str, folder: str | Path, private: bool = False, revision: str | None = None,
         commit_message: str = "Upload RPiAE") -> str:
    """Create the repository if needed and upload `folder` (see `write_hub_folder`); returns its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=commit_message)
    except (HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"{repo_id}: upload failed ({first[:160]}); log in with `huggingface-cli login`") from None
    return str(getattr(info, "commit_url", info))
