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
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from rpiae.data import EVAL_BATCH, image_size
from rpiae.data.metric_nets import OPTIONAL_METRICS, EvalError, MetricNets, find_metric_weights, load_metric_nets
from rpiae.data.sources import Source, image_loader
from rpiae.engines import PrecisionUnsupported, load_backend
from rpiae.export.backends import backend_info, variant
from rpiae.fileio import atomic_file
from rpiae.imageio import CROPS, DEFAULT_CROP, to_8bit
from rpiae.jobs.eval_report import METRICS, REFERENCE, format_table, write_grid
from rpiae.metrics import EVAL_REPORT_FORMAT, FeatureMoments, fid, psnr, ssim

FORMAT = EVAL_REPORT_FORMAT
DEFINITIONS = {
    "psnr": "dB, per image, 20 log10(1 / sqrt(mse)) on [0, 1], mse clamped at 1e-10, averaged (RPiAE authors)",
    "ssim": "per image, torchmetrics structural_similarity_index_measure, data_range 1, in float32, averaged (RPiAE authors)",
    "lpips": "per image, LPIPS VGG16 v0.1 on [-1, 1], averaged",
    "rfid": "Frechet distance of Inception-v3 2048-d pool features (torch-fidelity's network and resize), "
            "reconstructions vs cropped originals, scipy.linalg.sqrtm (real part), unbiased covariances",
}
CHUNK = 8  # images per LPIPS / Inception call: bounds their activation memory


@dataclass(frozen=True)
class EvalOptions:
    batch_size: int = EVAL_BATCH
    workers: int = 4
    crop: str = DEFAULT_CROP
    size: int | None = None  # None: the model config's image_size (else the reference backend's)
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
    options: dict = field(default_factory=dict)  # the keyword options its backend was opened with
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


def _usable(ids: list[int], errors: list[str], source: Source, opts: EvalOptions, skipped: list[dict]) -> list[int]:
    """Positions in the batch of the images that were read; a bad one stops the run unless
    `opts.skip_bad` (then it is listed in `skipped`)."""
    good = []
    for j, e in enumerate(errors):
        if not e:
            good.append(j)
        elif opts.skip_bad:
            skipped.append({"sample": ids[j], "ref": source.refs[ids[j]], "error": e})
        else:
            raise EvalError(f"{e}; nothing was written (fix or remove the file, or use --skip-bad)")
    return good


@dataclass
class _Originals:
    """What the run keeps of the cropped originals: their features, the grid's first tiles,
    and the PNGs that `--save-reference` packs at the end."""

    moments: FeatureMoments | None
    tiles: list[np.ndarray] = field(default_factory=list)
    pngs: list[Path] = field(default_factory=list)

    def add(self, x8: torch.Tensor, ids: list[int], nets: MetricNets, tiles: int, png_dir: Path | None) -> None:
        if self.moments is not None:
            self.moments.update(_chunked(nets.inception, x8))
        self.tiles.extend(x8[:tiles].permute(0, 2, 3, 1).numpy())  # (n, H, W, 3) uint8
        if png_dir is not None:  # lossless, packed into the .npz at the end
            for i, img in zip(ids, x8.permute(0, 2, 3, 1).numpy()):
                self.pngs.append(png_dir / f"{i:09d}.png")
                Image.fromarray(img).save(self.pngs[-1], format="PNG", compress_level=1)


def _reconstruct_all(x: torch.Tensor, target: torch.Tensor, rows: list[_Row], backends: list, nets: MetricNets,
                     tiles: int) -> None:
    """Every variant encodes and decodes the batch `x` (N, 3, H, W); each row scores its 8-bit result."""
    for row, be in zip(rows, backends):
        t0 = time.perf_counter()
        y = be.decode(be.encode(x))
        row.seconds += time.perf_counter() - t0
        row.add(to_8bit(y if isinstance(y, torch.Tensor) else torch.from_numpy(np.asarray(y))), target, nets, tiles)


def _partial_png_dir(stack: contextlib.ExitStack, save_reference: str | Path) -> Path:
    """A temporary folder beside `save_reference` for the originals' PNGs (removed with `stack`)."""
    parent = Path(save_reference).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return Path(stack.enter_context(tempfile.TemporaryDirectory(
        prefix=f".{Path(save_reference).name}.", suffix=".partial", dir=parent)))


def _measure(source: Source, opts: EvalOptions, rows: list[_Row], backends: list, nets: MetricNets,
             originals: _Originals, png_dir: Path | None, progress: bool) -> list[dict]:
    """Stream the first `opts.limit` images of `source` through every variant; returns the
    images that were skipped (with `opts.skip_bad`)."""
    n_total = min(len(source), opts.limit or len(source))
    skipped_images: list[dict] = []
    batches = [list(range(i, min(i + opts.batch_size, n_total))) for i in range(0, n_total, opts.batch_size)]
    loader = image_loader(source, batches, opts.crop, opts.size, min(opts.workers, len(batches)))
    with tqdm(total=n_total, unit="img", desc="eval", disable=not progress, dynamic_ncols=True) as bar:
        for ids, images, errors in loader:
            good = _usable(ids, errors, source, opts, skipped_images)
            if good:
                x8 = to_8bit(images[good])  # (n, 3, H, W) uint8: the cropped originals
                tiles = max(0, opts.grid_images - len(originals.tiles))
                originals.add(x8, [ids[j] for j in good], nets, tiles, png_dir)
                _reconstruct_all(images[good], x8.double() / 255, rows, backends, nets, tiles)
            bar.update(len(ids))
    if rows[0].n == 0:
        raise EvalError("every image was skipped: nothing to evaluate")
    return skipped_images


def open_variants(stack: contextlib.ExitStack, model, requested: Sequence[tuple[str, str]], device: str,
                  metric_device: str, max_batch: int | None = None,
                  options: dict[str, dict] | None = None) -> tuple[list, list[dict]]:
    """(variants, skipped): the reference and every requested (runtime, precision) opened on
    `stack` before any image is read (a missing graph fails at once), each on `device`, or on
    `metric_device` for a backend that does not run there (torch beside ONNX Runtime's `trt`);
    a pair the backend never runs is skipped with why. A runtime is a backend or one of its
    named variants (`rpiae.export.backends.variant`: `openvino-int8-bf16`); `options` maps a
    runtime to keyword options added to its own (never to the reference, eager PyTorch FP32).
    ValueError when none of `requested` runs."""
    variants, skipped = [], []
    for b, p in [REFERENCE] + [v for v in requested if v != REFERENCE]:
        backend, own, only = variant(b)
        dev = device if str(device).split(":")[0] in backend_info(backend).devices else metric_device
        if only is not None and p not in only:
            skipped.append({"backend": b, "precision": p, "reason": f"{b} runs {', '.join(only)}, not {p}"})
            continue
        extra = {} if (b, p) == REFERENCE else (options or {}).get(b, {})
        try:
            variants.append(((b, p), stack.enter_context(
                load_backend(model, backend, p, dev, max_batch=max_batch, **{**own, **extra}))))
        except PrecisionUnsupported as e:
            if (b, p) == REFERENCE:
                raise
            skipped.append({"backend": b, "precision": p, "reason": str(e)})
    if not [v for v in variants if v[0] != REFERENCE] and list(requested) != [REFERENCE]:
        raise ValueError("no backend x precision asked for can run: " + "; ".join(
            f"{s['backend']}/{s['precision']}: {s['reason']}" for s in skipped))
    return variants, skipped


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
    skipped_variants: Sequence[dict] = (),
) -> dict:
    """Reconstruct the first `opts.limit` images of `source` with every variant and measure them.

    `variants`: ((backend, precision), opened backend) pairs, each anything with
    `encode`/`decode` (an `rpiae.engines` backend); one must be ("torch", "fp32"), the
    reference. `requested`: the variants the user asked for (default: all); the reference is
    always reported. `skipped_variants`: {backend, precision, reason} of those asked for that the
    backend never runs, recorded in the report. Returns the report (see `report_rows`); `json_out`, `grid` and
    `save_reference` are written atomically when the whole run has succeeded."""
    nets = nets or MetricNets(skipped={m: "skipped: not computed" for m in OPTIONAL_METRICS})
    names = [name for name, _ in variants]
    if REFERENCE not in names:
        raise ValueError("the variants must include the reference, PyTorch FP32 (torch, fp32)")
    if len(set(names)) != len(names):
        raise ValueError("a variant is listed twice")
    _check_outputs(json_out, grid, save_reference)
    if opts.size is None:
        opts = replace(opts, size=image_size(model, variants[names.index(REFERENCE)][1]))
    wanted = set(requested) if requested is not None else set(names)
    rows = [_Row(b, p, (b, p) in wanted, options=dict(getattr(be, "options", None) or {})) for (b, p), be in variants]
    for r in rows:
        r.moments = FeatureMoments() if nets.inception is not None else None
    originals = _Originals(FeatureMoments() if nets.inception is not None else None)
    t_start = time.time()
    with contextlib.ExitStack() as stack:
        png_dir = _partial_png_dir(stack, save_reference) if save_reference is not None else None
        skipped_images = _measure(source, opts, rows, [be for _, be in variants], nets, originals, png_dir, progress)
        report = {
            "format": FORMAT,
            "version": 1,
            "model": model,
            "data": {**source.describe(), "evaluated": rows[0].n, "limit": opts.limit},
            "preprocessing": {"crop": opts.crop, "size": opts.size},
            "reference": {"backend": REFERENCE[0], "precision": REFERENCE[1]},
            "definitions": DEFINITIONS,
            "rows": report_rows(rows, originals.moments, nets),
            "skipped_metrics": dict(nets.skipped),
            "metric_weights": nets.weights,
            "skipped_images": skipped_images,
            "skipped_variants": list(skipped_variants),
            "seconds": round(time.time() - t_start, 2),
        }
        if png_dir is not None:
            from rpiae.jobs.pngs import pack_npz

            pack_npz(originals.pngs, save_reference, progress=progress)
            report["reference_npz"] = str(save_reference)
        if grid is not None:
            write_grid(grid, originals.tiles, rows)
            report["grid"] = str(grid)
    if json_out is not None:
        with atomic_file(json_out) as tmp:
            tmp.write_text(json.dumps(report, indent=1) + "\n")
    return report


def report_rows(rows: list[_Row], originals: FeatureMoments | None, nets: MetricNets) -> list[dict]:
    """One dict per variant, the reference first: {backend, precision, options, n, psnr, ssim, lpips,
    rfid, seconds, reference, requested, delta}; a skipped metric's value is its skip text,
    and `delta` is the row minus the reference (None where a value is not a number)."""
    out = []
    for r in rows:
        rfid = nets.skipped.get("rfid")
        if rfid is None:
            rfid = fid(r.moments, originals) if r.n >= 2 else "skipped: rFID needs at least 2 images"
        out.append({
            "backend": r.backend, "precision": r.precision, "options": r.options, "n": r.n,
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


__all__ = ["METRICS", "OPTIONAL_METRICS", "REFERENCE", "EvalError", "EvalOptions", "MetricNets", "evaluate",
           "find_metric_weights", "format_table", "load_metric_nets", "report_rows"]
