"""`rpiae export`, `rpiae verify`, `rpiae info`, `rpiae samples`."""

from __future__ import annotations

from pathlib import Path

import click

from rpiae.cli.common import (
    CheckFailed,
    allow_fallback_option,
    backend_options_option,
    device_option,
    echo_json,
    fallback_allowed,
    friendly_errors,
    latent_stats_option,
    parse_backend_options,
    names_callback,
    parse_int_list,
)
from rpiae.export.backends import BACKENDS, REFERENCE, REGISTRY
from rpiae.export.precision import (
    INT8_CALIBRATION_DEFAULT, INT8_CALIBRATIONS, INT8_KEEP_DEFAULT, INT8_KEEP_PARTS, parse_int8_keep,
)
from rpiae.export.profile import BatchProfile
from rpiae.export.spec import parse_precisions
from rpiae.export.targets import ONNX_TARGET, TARGETS
from rpiae.precisions import (
    INT8_HIGH_PRECISION,
    INT8_HIGH_PRECISIONS,
    INT8_WEIGHT_BITS,
    INT8_WEIGHT_BITS_DEFAULT,
    ONNX_PRECISIONS,
    PRECISIONS,
)


@click.command()
@click.option("--checkpoint", "-c", type=click.Path(path_type=Path), default=None,
              help="Checkpoint to export (.safetensors of ours or the authors' .pt). Default: the shipped small checkpoint.")
@click.option("--target", "-t", type=click.Choice(list(TARGETS)), default=ONNX_TARGET, show_default=True,
              help="; ".join(f"{t.name}: {t.summary} (parity on the {t.checked_by} backend)" for t in TARGETS.values())
              + ". Every target records its parity against PyTorch in the manifest.")
@click.option("--precision", "-p", default="fp32", show_default=True, callback=names_callback(ONNX_PRECISIONS, parse=parse_precisions),
              help=f"Comma-separated precisions: {', '.join(ONNX_PRECISIONS)}. FP32 is always included (the others derive from it).")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Folder of real images for INT8 calibration (required with int8).")
@click.option("--calib-count", type=click.IntRange(1), default=64, show_default=True,
              help="How many calibration images to use (the first N, sorted by path).")
@click.option("--int8-high-precision", type=click.Choice(INT8_HIGH_PRECISIONS), default=INT8_HIGH_PRECISION, show_default=True,
              help="Precision of the layers the INT8 graph does not quantise (fp16 for TensorRT, fp32 for CPU speed).")
@click.option("--int8-weight-bits", type=click.Choice([str(b) for b in INT8_WEIGHT_BITS]), default=str(INT8_WEIGHT_BITS_DEFAULT),
              show_default=True,
              help="Bits of the INT8 graph's weights. 7 for x86 CPUs without VNNI (AVX2-only): their int8 kernels (ONNX Runtime, "
              "OpenVINO) add pairs of products in 16 bits with saturation, which 8-bit weights overflow; costs one bit of "
              "weight precision.")
@click.option("--int8-calibration", type=click.Choice(INT8_CALIBRATIONS), default=INT8_CALIBRATION_DEFAULT,
              show_default=True,
              help="How INT8 activation ranges come from the calibration images: max = the largest |x| seen; entropy = the "
              "range whose histogram loses the least information (KL divergence; closer to FP32).")
@click.option("--int8-keep", default=",".join(INT8_KEEP_DEFAULT), show_default=True,
              callback=names_callback(INT8_KEEP_PARTS, parse=parse_int8_keep),
              help=f"Comma-separated model parts the INT8 graphs leave unquantised ({', '.join(INT8_KEEP_PARTS)}), or "
              "none. They run in --int8-high-precision (or OpenVINO's hint with -O int8_rest=bf16). io-projections: the "
              "patch embedding, to_moments, in_proj, the pixel decoder's embed and last projection, under 1 % of the "
              "matmul work; with entropy calibration INT8 loses half the PSNR it does with none kept and max "
              "calibration, at the same speed (README: INT8 within 0.1 dB).")
@click.option("--batch", default=str(BatchProfile()), show_default=True,
              callback=names_callback((), parse=BatchProfile.parse),
              help="Batch profile MIN:OPT:MAX for TensorRT engines / AOTInductor packages (ONNX graphs are dynamic).")
@click.option("--device", default="auto", show_default=True,
              help="Where the target's files are built and checked: trt: cuda or cuda:N (auto = cuda); aoti: cpu, cuda "
              "(or cuda:N), or auto = cuda when a GPU and the CUDA toolkit are here, else cpu. Unused by onnx.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="aoti: directory for compiler caches and temporary files (default $RPIAE_CACHE_DIR or ~/.cache/rpiae).")
@click.option("--workspace-gb", type=click.FloatRange(0.1), default=8.0, show_default=True,
              help="TensorRT builder workspace limit in GiB.")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="TensorRT timing cache file (read if present, updated after the build).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimisation level.")
@click.option("--version-compatible", is_flag=True,
              help="TensorRT: build engines that later TensorRT runtimes also run (e.g. a Triton server with another "
              "TensorRT 10.x, or 11); they embed TensorRT's lean runtime and may be slower.")
@latent_stats_option
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Bundle directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out.")
@friendly_errors
def export(checkpoint, target, precision, calib, calib_count, int8_high_precision, int8_weight_bits, int8_calibration,
           int8_keep, batch, device, cache_dir,
           workspace_gb, timing_cache, opt_level, version_compatible, latent_stats, out, overwrite):
    """Export the encode/decode graphs into a self-describing bundle, checked against PyTorch.

    Writes OUT/manifest.json, OUT/model.safetensors and OUT/{encode,decode}.<precision>.onnx;
    with --target trt/aoti also the engines/packages. Each target is built, then run on real
    photos against eager PyTorch FP32, and the result is recorded in the manifest (exit code 3
    when a check fails). The bundle is built in a hidden temporary directory and renamed when
    complete. With --target trt/aoti and an existing bundle at --out, its ONNX graphs are reused
    if it was exported from --checkpoint (the manifest's source sha256); otherwise the command
    refuses (--overwrite re-exports).
    """
    from rpiae.verify import export_target

    spec = TARGETS[target]
    given = {"workspace_gb": workspace_gb, "timing_cache": timing_cache, "opt_level": opt_level,
             "version_compatible": version_compatible, "cache_dir": cache_dir}
    # --precision, --batch and --int8-keep arrive parsed (their callbacks: usage errors, exit 2)
    precisions, profile, keep = precision, batch, int8_keep
    bundle = export_target(checkpoint, out, target, precisions=precisions, profile=profile, device=device,
                           overwrite=overwrite, latent_stats=latent_stats,
                           target_options={k: given[k] for k in spec.options},
                           say=lambda note: click.echo(f"note: {note}", err=True), calib=calib,
                           calib_count=calib_count, int8_high_precision=int8_high_precision,
                           int8_weight_bits=int(int8_weight_bits), int8_calibration=int8_calibration, int8_keep=keep)
    failed = [r for r in bundle.manifest.parity if not r["ok"]]
    engines = bundle.manifest.engines
    click.echo(f"bundle {out}: precisions {', '.join(bundle.precisions())}"
               + (f"; engines: {', '.join(engines)}" if engines else ""))
    _print_results(bundle.manifest.parity)
    if failed:
        raise CheckFailed(f"parity failed for {', '.join(r['precision'] for r in failed)} (see the table above)")


def _print_results(rows) -> None:
    if not rows:
        return
    click.echo(f"{'backend':14} {'prec':5} {'batch':>5}  {'check':22} {'value':>12} {'bound':>10}  ok")
    for r in rows:
        if r.get("status") == "skipped":
            click.echo(f"{r.get('backend', ''):14} {r['precision']:5} {'':>5}  skipped: {r['reason']}")
        for name, c in r["checks"].items():
            click.echo(f"{r.get('backend', ''):14} {r['precision']:5} {r['metrics']['batch']:>5}  {name:22} "
                       f"{c['value']:>12.6g} {c['bound']:>10.6g}  {'yes' if c['ok'] else 'NO'}")


@click.command()
@click.option("--model", "-m", type=click.Path(path_type=Path), required=True, help="Export bundle directory.")
@click.option("--backend", "-b", type=click.Choice([b for b in BACKENDS if b != REFERENCE]),
              default=TARGETS[ONNX_TARGET].checked_by,
              show_default=True,
              help="Which runtime's graphs to check against PyTorch (the reference, eager fp32): "
              + "; ".join(f"{b.name}: {b.summary}" for b in REGISTRY.values() if b.name != REFERENCE) + ".")
@backend_options_option
@device_option
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Folder of real images to test with (default: the photos bundled with scikit-image/-learn).")
@click.option("--batch", default="1,3,8", show_default=True, help="Comma-separated batch sizes to run.")
@click.option("--precision", "-p", default=None, callback=names_callback(PRECISIONS, parse=lambda v: parse_precisions(v, PRECISIONS)),
              help="Comma-separated precisions to check (default: all in the bundle).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the report as JSON here.")
@click.option("--compare", type=click.Choice(["pytorch", "polygraphy"]), default="pytorch", show_default=True,
              help="pytorch: parity against eager PyTorch FP32; polygraphy: polygraphy's Comparator runs each graph "
              "(ort or trt) against the FP32 ONNX graph on ONNX Runtime's CPU provider.")
@allow_fallback_option
@friendly_errors
def verify(model, backend, backend_option, device, images, batch, precision, json_out, compare, allow_fallback):
    """Parity report of every graph in a bundle against eager PyTorch FP32.

    Tolerances: FP32 latents max|diff| <= 1e-4*max|z|, cosine >= 0.99999, decoded PSNR >= 60 dB;
    FP16 decoded PSNR >= 40 dB; BF16 (OpenVINO) >= 30 dB; INT8 reconstruction PSNR within 1 dB of
    FP32's. A precision this machine cannot run is reported as skipped unless named in --precision.
    With --compare polygraphy (first batch size only): |diff|/max|reference| of the max (fp32,
    <= 1e-4) or mean (fp16/bf16 <= 1e-3, int8 <= 2e-2). Exit code 3 when a check fails.
    """
    import json

    from rpiae.fileio import atomic_file
    from rpiae.verify import verify_bundle
    from rpiae.imageio import find_images, load_images

    x = None
    if images is not None:
        files = find_images(images)
        if not files:
            raise click.ClickException(f"{images}: no images found")
        x = load_images(files[:16])
    batches = parse_int_list(batch, "--batch")
    options = parse_backend_options(backend, backend_option)
    with fallback_allowed(allow_fallback):
        if compare == "polygraphy":
            if options:
                raise click.UsageError("--backend-option is for --compare pytorch")
            from rpiae.verify.polygraphy import compare_bundle, polygraphy_backends

            if backend not in polygraphy_backends():
                raise click.UsageError(f"--compare polygraphy runs --backend {' or '.join(polygraphy_backends())}, "
                                       f"not {backend}")
            if precision and set(precision) - set(ONNX_PRECISIONS):
                raise click.BadParameter(f"--compare polygraphy checks ONNX graphs: {', '.join(ONNX_PRECISIONS)}",
                                         param_hint="'--precision' / '-p'")
            report = compare_bundle(model, backend=backend, images=x, batch=batches[0], device=device,
                                    precisions=precision or None)
        else:
            report = verify_bundle(model, backend=backend, images=x, batches=batches,
                                   precisions=precision or None, device=device,
                                   progress=True, options=options)
    _print_results(report["results"])
    if json_out:
        with atomic_file(json_out) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
    if not report["ok"]:
        raise CheckFailed("parity check failed")
    click.echo("all checks passed")


@click.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--verify-hashes", is_flag=True, help="Also recompute the sha256 of every file in a bundle.")
@friendly_errors
def info(target, verify_hashes):
    """Describe a bundle or checkpoint: model config, graphs, shapes, precisions, hashes."""
    from rpiae.checkpoints import describe
    from rpiae.export.bundle import Bundle

    if Bundle.is_bundle(target):
        bundle = Bundle.open(target)
        if verify_hashes:
            bundle.verify_all()
        echo_json({**bundle.summary(), "config": bundle.config.to_dict(), "io": bundle.manifest.io,
                   "tools": bundle.manifest.tools, "hashes_verified": bool(verify_hashes)})
    elif target.is_file():
        echo_json(describe(target))
    else:
        raise click.ClickException(f"{target}: not a bundle directory or checkpoint file")


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@friendly_errors
def samples(out):
    """Write the real photos shipped with scikit-image/-learn to OUT as 256x256 PNGs."""
    from rpiae.samples import write_sample_photos

    paths = write_sample_photos(out)
    click.echo(f"wrote {len(paths)} photos to {out}/")
