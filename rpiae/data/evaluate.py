"""`rpiae eval`: what each runtime and precision costs in reconstruction quality.

Every image of a source (read and cropped as `rpiae extract` reads them) is reconstructed,
encode then decode, by every variant (backend, precision); PyTorch FP32 is always one of them,
the reference the others are compared with. Per variant, over the same images:

- PSNR and SSIM (`rpiae.metrics`, the RPiAE authors' definitions), per image, averaged;
- LPIPS (VGG16, `rpiae.training.lpips`) on [-1, 1], per image, averaged;
- rFID: the Fréchet distance between the Inception-v3 pool features (`rpiae.inception`,
  torch-fidelity's network) of the reconstructions and of the cropped originals.

All metrics see 8-bit images: reconstructions clamped to [0, 1] and rounded to 1/255, as a
saved PNG holds them, and the cropped originals in 8 bits (what the ADM `.npz` holds).
Metrics stream: per-image values are summed and features enter float64 running moments
(`rpiae.metrics.FeatureMoments`), so memory does not grow with the number of images.

LPIPS and rFID need weights that cannot be downloaded here; `find_metric_weights` looks in
torch hub's cache (where torch-fidelity and torchvision keep them) unless files are given.
A metric without weights is reported as `skipped: <what to supply>` unless it is required.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from rpiae.data.sources import Source, image_loader
from rpiae.fileio import atomic_file, sha256_file
from rpiae.imageio import CROPS, DEFAULT_CROP, to_8bit
from rpiae.metrics import FeatureMoments, fid, psnr, ssim

FORMAT = "rpiae-eval"
REFERENCE = ("torch", "fp32")
METRICS = ("psnr", "ssim", "lpips", "rfid")
OPTIONAL_METRICS = ("lpips", "rfid")  # the ones that need downloaded weights
PRECISION_RANK = {"int8": 0, "fp16": 1, "bf16": 1, "fp32": 2}  # lower = fewer bits
LPIPS_VGG16_FILE = "vgg16-397923af.pth"  # torchvision's VGG16 (features.N.*)
LPIPS_HEADS_FILES = ("weights-vgg16-lpips.pth",)  # torch-fidelity's copy of the LPIPS v0.1 heads
DEFINITIONS = {
    "psnr": "dB, per image, 20 log10(1 / sqrt(mse)) on [0, 1], mse clamped at 1e-10, averaged (RPiAE authors)",
    "ssim": "per image, torchmetrics structural_similarity_index_measure, data_range 1, in float32, averaged (RPiAE authors)",
    "lpips": "per image, LPIPS VGG16 v0.1 on [-1, 1], averaged",
    "rfid": "Frechet distance of Inception-v3 2048-d pool features (torch-fidelity's network and resize), "
            "reconstructions vs cropped originals, scipy.linalg.sqrtm (real part), unbiased covariances",
}
CHUNK = 8  # images per LPIPS / Inception call: bounds their activation memory


class EvalError(RuntimeError):
    """An input or setting that stops the evaluation (one line; nothing is written)."""


@dataclass(frozen=True)
class EvalOptions:
    batch_size: int = 32
    workers: int = 4
    crop: str = DEFAULT_CROP
    size: int = 256
    limit: int | None = None
    skip_bad: bool = False
    grid_images: int = 6

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.workers < 0 or self.grid_images < 1:
            raise ValueError("batch size and grid images must be >= 1, workers >= 0")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.crop not in CROPS:
            raise ValueError(f"unknown crop policy {self.crop!r} ({', '.join(CROPS)})")


# -- metric networks and their weights ---------------------------------------------------------


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


# -- the evaluation ------------------------------------------------------------------------------


def _chunked(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    n = len(tensors[0])
    return torch.cat([fn(*(t[i : i + CHUNK] for t in tensors)).detach().float().cpu() for i in range(0, n, CHUNK)])


@dataclass
class _Row:
    backend: str
    precision: str
    requested: bool
    n: int = 0
    psnr: float = 0.0  # sums until `finish`
    ssim: float = 0.0
    lpips: float = 0.0
    seconds: float = 0.0
    moments: FeatureMoments | None = None
    tiles: list[np.ndarray] = field(default_factory=list)  # uint8 (H, W, 3), the first grid images

    @property
    def name(self) -> tuple[str, str]:
        return self.backend, self.precision

    def add(self, y8: torch.Tensor, target: torch.Tensor, nets: MetricNets, tiles: int) -> None:
        """Measure a batch of 8-bit reconstructions (N, 3, H, W) against `target` (float64 in [0, 1])."""
        recon = y8.double() / 255
        self.n += len(y8)
        self.psnr += float(psnr(recon, target).sum())
        self.ssim += float(ssim(recon, target, dtype="float32").sum())
        if nets.lpips is not None:
            device = next(nets.lpips.buffers()).device
            lp = _chunked(lambda a, b: nets.lpips(a.to(device) * 2 - 1, b.to(device) * 2 - 1), recon.float(), target.float())
            self.lpips += float(lp.double().sum())
        if self.moments is not None:
            self.moments.update(_chunked(nets.inception, y8))
        self.tiles.extend(y8[:tiles].permute(0, 2, 3, 1).numpy())


def _check_outputs(json_out, grid, save_reference) -> None:
    if grid is not None and Path(grid).suffix.lower() != ".png":
        raise ValueError(f"{grid}: the grid is written as PNG; give a .png file")
    if save_reference is not None and Path(save_reference).suffix != ".npz":
        raise ValueError(f"{save_reference}: the ADM reference batch must end in .npz")
    for p in (json_out, grid, save_reference):
        if p is not None and Path(p).is_dir():
            raise ValueError(f"{p} is a directory; give a file name")


def evaluate(
    source: Source,
    variants: Sequence[tuple[tuple[str, str], object]],
    nets: MetricNets | None = None,
    opts: EvalOptions = EvalOptions(),
    model: dict | None = None,
    json_out: str | Path | None = None,
    grid: str | Path | None = None,
    save_reference: str | Path | None = None,
    requested: Sequence[tuple[str, str]] | None = None,
    progress: bool = True,
) -> dict:
    """Reconstruct the first `opts.limit` images of `source` with every variant and measure them.

    `variants`: ((backend, precision), opened backend) pairs, each anything with
    `encode`/`decode` (an `rpiae.engines` backend); one must be ("torch", "fp32"), the
    reference. `requested`: the variants the user asked for (default: all); the reference is
    always reported. Returns the report (see `report_rows`); `json_out`, `grid` and
    `save_reference` are written atomically when the whole run has succeeded."""
    nets = nets or MetricNets(skipped={m: "skipped: not computed" for m in OPTIONAL_METRICS})
    names = [name for name, _ in variants]
    if REFERENCE not in names:
        raise ValueError("the variants must include the reference, PyTorch FP32 (torch, fp32)")
    if len(set(names)) != len(names):
        raise ValueError("a variant is listed twice")
    _check_outputs(json_out, grid, save_reference)
    wanted = set(requested) if requested is not None else set(names)
    rows = [_Row(b, p, (b, p) in wanted) for b, p in names]
    backends = [be for _, be in variants]
    n_total = min(len(source), opts.limit or len(source))
    if nets.inception is not None:
        for r in rows:
            r.moments = FeatureMoments()
    originals = FeatureMoments() if nets.inception is not None else None
    grid_originals: list[np.ndarray] = []
    skipped_images: list[dict] = []
    ref_pngs: list[Path] = []
    t_start = time.time()
    with contextlib.ExitStack() as stack:
        ref_dir = None
        if save_reference is not None:  # cropped originals as PNGs (lossless), packed into the .npz at the end
            parent = Path(save_reference).resolve().parent
            parent.mkdir(parents=True, exist_ok=True)
            ref_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix=f".{Path(save_reference).name}.", suffix=".partial", dir=parent)))
        batches = [list(range(i, min(i + opts.batch_size, n_total))) for i in range(0, n_total, opts.batch_size)]
        loader = image_loader(source, batches, opts.crop, opts.size, min(opts.workers, len(batches)))
        bar = stack.enter_context(tqdm(total=n_total, unit="img", desc="eval", disable=not progress, dynamic_ncols=True))
        for ids, images, errors in loader:
            good = []
            for j, e in enumerate(errors):
                if not e:
                    good.append(j)
                elif opts.skip_bad:
                    skipped_images.append({"sample": ids[j], "ref": source.refs[ids[j]], "error": e})
                else:
                    raise EvalError(f"{e}; nothing was written (fix or remove the file, or use --skip-bad)")
            if not good:
                bar.update(len(ids))
                continue
            x = images[good]
            x8 = to_8bit(x)
            target = x8.double() / 255
            if originals is not None:
                originals.update(_chunked(nets.inception, x8))
            need_tiles = max(0, opts.grid_images - len(grid_originals))
            grid_originals.extend(x8[:need_tiles].permute(0, 2, 3, 1).numpy())
            if ref_dir is not None:
                for i, img in zip((ids[j] for j in good), x8.permute(0, 2, 3, 1).numpy()):
                    ref_pngs.append(ref_dir / f"{i:09d}.png")
                    Image.fromarray(img).save(ref_pngs[-1], format="PNG", compress_level=1)
            for row, be in zip(rows, backends):
                t0 = time.perf_counter()
                y = be.decode(be.encode(x))
                row.seconds += time.perf_counter() - t0
                row.add(to_8bit(y if isinstance(y, torch.Tensor) else torch.from_numpy(np.asarray(y))), target, nets,
                        need_tiles)
            bar.update(len(ids))
        bar.close()
        if rows[0].n == 0:
            raise EvalError("every image was skipped: nothing to evaluate")
        report = {
            "format": FORMAT,
            "version": 1,
            "model": model,
            "data": {**source.describe(), "evaluated": rows[0].n, "limit": opts.limit},
            "preprocessing": {"crop": opts.crop, "size": opts.size},
            "reference": {"backend": REFERENCE[0], "precision": REFERENCE[1]},
            "definitions": DEFINITIONS,
            "rows": report_rows(rows, originals, nets),
            "skipped_metrics": dict(nets.skipped),
            "metric_weights": nets.weights,
            "skipped_images": skipped_images,
            "seconds": round(time.time() - t_start, 2),
        }
        if ref_dir is not None:
            from rpiae.data.decode import pack_npz

            pack_npz(ref_pngs, save_reference, progress=progress)
            report["reference_npz"] = str(save_reference)
        if grid is not None:
            write_grid(grid, grid_originals, rows)
            report["grid"] = str(grid)
    if json_out is not None:
        with atomic_file(json_out) as tmp:
            tmp.write_text(json.dumps(report, indent=1) + "\n")
    return report


def report_rows(rows: list[_Row], originals: FeatureMoments | None, nets: MetricNets) -> list[dict]:
    """One dict per variant, the reference first: {backend, precision, n, psnr, ssim, lpips,
    rfid, seconds, reference, requested, delta}; a skipped metric's value is its skip text,
    and `delta` is the row minus the reference (None where a value is not a number)."""
    out = []
    for r in rows:
        rfid = nets.skipped.get("rfid")
        if rfid is None:
            rfid = fid(r.moments, originals) if r.n >= 2 else "skipped: rFID needs at least 2 images"
        out.append({
            "backend": r.backend, "precision": r.precision, "n": r.n,
            "psnr": r.psnr / r.n, "ssim": r.ssim / r.n,
            "lpips": nets.skipped.get("lpips", r.lpips / r.n), "rfid": rfid,
            "seconds": round(r.seconds, 3), "reference": r.name == REFERENCE, "requested": r.requested,
        })
    out.sort(key=lambda row: not row["reference"])
    ref = out[0]
    for row in out:
        row["delta"] = {m: (row[m] - ref[m]) if isinstance(row[m], float) and isinstance(ref[m], float) else None
                        for m in METRICS}
    return out


# -- report: table and grid ----------------------------------------------------------------------


def _cell(value, digits: int) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return " ".join(str(value).split()[:2])  # "skipped: --option"; the line under the table says more


def _delta(value, digits: int) -> str:
    return f"{value:+.{digits + 1}f}" if isinstance(value, float) else ""  # one digit more: deltas are small


def format_table(report: dict) -> str:
    """The report as a plain-text table, then one line per skipped metric."""
    digits = {"psnr": 2, "ssim": 4, "lpips": 4, "rfid": 3}
    head = ["backend", "precision", "n"] + [c for m in METRICS for c in (m.upper(), "Δ")] + ["seconds"]
    lines = []
    for row in report["rows"]:
        name = row["backend"] + (" (ref)" if row["reference"] else "")
        cells = [name, row["precision"], str(row["n"])]
        for m in METRICS:
            cells += [_cell(row[m], digits[m]), "" if row["reference"] else _delta(row["delta"][m], digits[m])]
        lines.append(cells + [f"{row['seconds']:.1f}"])
    widths = [max(len(c) for c in col) for col in zip(head, *lines)]

    def fmt(cells: list[str]) -> str:  # names left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(head)] + [fmt(c) for c in lines]
    for m, why in report.get("skipped_metrics", {}).items():
        out.append(f"{m}: {why}")
    if report.get("skipped_images"):
        out.append(f"{len(report['skipped_images'])} unreadable image(s) skipped (listed in the JSON report)")
    return "\n".join(out)


def lowest_precision(rows: list[_Row]) -> _Row:
    """The variant with the fewest bits (the reference only when it is the only row)."""
    others = [r for r in rows if r.name != REFERENCE] or rows
    return min(others, key=lambda r: PRECISION_RANK.get(r.precision, 2))


def write_grid(path: str | Path, originals: list[np.ndarray], rows: list[_Row], label_width: int = 170) -> Path:
    """PNG: a row of originals, one row per variant (reference first), and an amplified
    difference map of the lowest-precision variant against PyTorch FP32 (against the
    originals when PyTorch FP32 is the only variant). The amplification is stated in the
    row's label: the largest whole factor (at most 32) that keeps the 99.9th percentile of
    the difference below white."""
    from PIL import ImageDraw, ImageFont

    ordered = sorted(rows, key=lambda r: r.name != REFERENCE)
    low, ref = lowest_precision(rows), ordered[0]
    base = originals if low is ref else ref.tiles
    diff = [np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=2) for a, b in zip(low.tiles, base)]
    p = float(np.percentile(np.stack(diff), 99.9)) if diff else 0.0
    gain = int(min(32, max(1, math.floor(255 / max(p, 1.0)))))
    diff_tiles = [np.repeat(np.clip(d * gain, 0, 255).round().astype(np.uint8)[..., None], 3, axis=2) for d in diff]
    against = "original" if low is ref else "torch fp32"
    labelled = [("original", originals)] + [(f"{r.backend} {r.precision}" + (" (ref)" if r is ref else ""), r.tiles)
                                          for r in ordered]
    labelled.append((f"|{low.backend} {low.precision} - {against}|\nx{gain}", diff_tiles))
    h, w = originals[0].shape[:2]
    canvas = Image.new("RGB", (label_width + w * len(originals), h * len(labelled)), "white")
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=16)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the small bitmap font
        font = ImageFont.load_default()
    for k, (label, tiles) in enumerate(labelled):
        draw.multiline_text((8, k * h + h // 2 - 20), label, fill="black", font=font)
        for j, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(tile), (label_width + j * w, k * h))
    with atomic_file(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)
