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


def resolve_model(model: str | Path | None) -> Path:
    """A checkpoint file, bundle directory or Hub model (`hf://owner/name[@rev]`, downloaded
    or read from the cache); None means the project's shipped checkpoint."""
    if model is None:
        from rpiae.assets import default_checkpoint

        return default_checkpoint()
    p = resolve(model)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such checkpoint or bundle")
    return p

