"""The networks `rpiae eval`'s optional metrics need (LPIPS's VGG16 and heads, rFID's
Inception-v3) and where their weights are found: files given by the user, else torch hub's
cache, where torch-fidelity and torchvision keep them. Nothing is downloaded; a metric
without weights is skipped with what to supply."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rpiae.fileio import sha256_file

OPTIONAL_METRICS = ("lpips", "rfid")  # the ones that need downloaded weights
LPIPS_VGG16_FILE = "vgg16-397923af.pth"  # torchvision's VGG16 (features.N.*)
LPIPS_HEADS_FILES = ("weights-vgg16-lpips.pth",)  # torch-fidelity's copy of the LPIPS v0.1 heads


class EvalError(RuntimeError):
    """An input or setting that stops the evaluation (one line; nothing is written)."""


@dataclass
class MetricNets:
    """The networks the optional metrics need (None: skipped, with the reason in `skipped`)."""

    inception: Callable[[torch.Tensor], torch.Tensor] | None = None
    lpips: torch.nn.Module | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> "skipped: <what to supply> (...)"
    weights: dict[str, list[dict]] = field(default_factory=dict)  # metric -> [{"path", "sha256"}]


def hub_checkpoints() -> Path:
    """Where `torch.hub.load_state_dict_from_url` keeps files (torch-fidelity's and torchvision's weights)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _lpips_package_heads() -> list[Path]:
    """The heads shipped inside the `lpips` package, if it is installed (found without importing it)."""
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(d) / "weights" / "v0.1" / "vgg.pth" for d in spec.submodule_search_locations]


def find_metric_weights(inception_weights: str | Path | None = None,
                        lpips_weights: Sequence[str | Path] = ()) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """({metric: files}, {metric: skip reason}). Files given are used as they are (and must
    exist); otherwise torch hub's `checkpoints/` (and the `lpips` package) are searched."""
    from rpiae.inception import WEIGHTS_FILE

    found: dict[str, list[Path]] = {}
    skipped: dict[str, str] = {}
    hub = hub_checkpoints()
    given = [Path(p) for p in ([inception_weights] if inception_weights else [])] + [Path(p) for p in lpips_weights]
    for p in given:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such weights file")
    if inception_weights:
        found["rfid"] = [Path(inception_weights)]
    elif (hub / WEIGHTS_FILE).is_file():
        found["rfid"] = [hub / WEIGHTS_FILE]
    else:
        skipped["rfid"] = (f"skipped: --inception-weights FILE (torch-fidelity's {WEIGHTS_FILE}; "
                           f"not found in {hub})")
    if lpips_weights:
        found["lpips"] = [Path(p) for p in lpips_weights]
    else:
        heads = next((p for p in [hub / f for f in LPIPS_HEADS_FILES] + _lpips_package_heads() if p.is_file()), None)
        if (hub / LPIPS_VGG16_FILE).is_file() and heads is not None:
            found["lpips"] = [hub / LPIPS_VGG16_FILE, heads]
        else:
            skipped["lpips"] = (f"skipped: --lpips-weights VGG16 [HEADS] (torchvision's {LPIPS_VGG16_FILE} and the "
                                f"LPIPS v0.1 vgg heads; not both found in {hub})")
    return found, skipped


def load_metric_nets(inception_weights: str | Path | None = None, lpips_weights: Sequence[str | Path] = (),
                     require: Sequence[str] = (), device: str = "cpu") -> MetricNets:
    """The LPIPS and Inception networks from local files; a metric in `require` that has no
    weights raises `EvalError`, any other is skipped."""
    from rpiae.inception import load_inception
    from rpiae.training.lpips import load_lpips

    unknown = [m for m in require if m not in OPTIONAL_METRICS]
    if unknown:
        raise ValueError(f"--require: unknown metric {', '.join(unknown)} (choose from {', '.join(OPTIONAL_METRICS)})")
    found, skipped = find_metric_weights(inception_weights, lpips_weights)
    missing = [m for m in require if m in skipped]
    if missing:
        raise EvalError("; ".join(f"{m} is required but {skipped[m].removeprefix('skipped: ')}" for m in missing))
    nets = MetricNets(skipped=skipped)
    if "rfid" in found:
        nets.inception = load_inception(found["rfid"][0]).to(device)
    if "lpips" in found:
        nets.lpips = load_lpips(found["lpips"]).to(device)
    nets.weights = {m: [{"path": str(p), "sha256": sha256_file(p)} for p in files] for m, files in found.items()}
    return nets
