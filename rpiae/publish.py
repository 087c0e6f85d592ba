"""Publishing a model to the Hugging Face Hub: the repository's files (diffusers layout,
written by `AutoencoderRPiAE.save_pretrained`) with a model card, and the upload (`rpiae push`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rpiae.fileio import read_json
from rpiae.hub import HubError
from rpiae.metrics import EVAL_REPORT_FORMAT


def read_eval_report(path: str | Path) -> dict:
    """An `rpiae eval --json` report for the model card; anything else (not JSON, a list, a bench
    result) is refused with one line (ValueError) naming the file."""
    path = Path(path)
    data = read_json(path, "an `rpiae eval --json` report")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not an `rpiae eval --json` report (a JSON {type(data).__name__}, not an object)")
    if data.get("format") != EVAL_REPORT_FORMAT:
        raise ValueError(f"{path}: not an `rpiae eval --json` report (format {data.get('format')!r}, "
                         f"expected {EVAL_REPORT_FORMAT!r})")
    rows = data.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: damaged `rpiae eval --json` report (\"rows\" is not a list of objects)")
    return data


def _as_dict(obj: Any) -> dict | None:
    """A manifest given as a `Manifest` or as its JSON dict."""
    if obj is None or isinstance(obj, dict):
        return obj
    return obj.to_dict()


def _data_line(data: Any) -> str:
    """What an eval report says it measured on (`rpiae eval` writes the source's description)."""
    if isinstance(data, dict):
        n = data.get("evaluated", data.get("samples"))
        return f"{data.get('root') or data.get('kind') or 'see the report'}" + (f" ({n} images)" if n is not None else "")
    return str(data) if data else "see the report"


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
    bundle_manifest = _as_dict(bundle_manifest)
    rows = (eval_report or {}).get("rows") or []
    if rows:
        lines += ["## Reconstruction quality (`rpiae eval`)", "",
                  f"Data: {_data_line(eval_report.get('data'))}; command: `{eval_report.get('command', 'rpiae eval')}`.", "",
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
        if vae.config.latents_stats != "none":
            stats = f"latents_mean/latents_std per {per}" + (f" from {Path(latent_stats).name}" if latent_stats else "")
        (tmp / "README.md").write_text(model_card(repo_id, model.config.to_dict(), eval_report, bundle_manifest, stats))
    return out


_NETWORK_ERRORS = {"ConnectionError", "ConnectError", "ConnectTimeout", "ConnectTimeoutError", "NewConnectionError",
                   "TransportError", "NetworkError", "Timeout", "TimeoutException", "ReadTimeout", "ProxyError",
                   "OfflineModeIsEnabled", "MaxRetryError", "NameResolutionError"}


def _unreachable(e: BaseException) -> bool:
    """Whether `e` (or what caused it) says the Hub could not be reached at all: no network, DNS,
    proxy, timeout (httpx, requests and urllib3 name these differently)."""
    seen = 0
    while e is not None and seen < 8:
        if getattr(getattr(e, "response", None), "status_code", None):
            return False  # the Hub answered
        if any(c.__name__ in _NETWORK_ERRORS for c in type(e).__mro__):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def push(repo_id: str, folder: str | Path, private: bool = False, revision: str | None = None,
         commit_message: str = "Upload RPiAE") -> str:
    """Create the repository if needed and upload `folder` (see `write_hub_folder`); returns its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=commit_message)
    except Exception as e:  # noqa: BLE001 - sorted below; anything else passes through as it is
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if _unreachable(e):
            raise HubError(f"cannot reach the Hugging Face Hub: {first[:160]} (nothing was uploaded)") from None
        if not isinstance(e, (HfHubHTTPError, OSError)):
            raise
        raise HubError(f"{repo_id}: upload failed ({first[:160]}); log in with `huggingface-cli login`") from None
    return str(getattr(info, "commit_url", info))
