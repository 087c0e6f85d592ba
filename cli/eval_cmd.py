"""`rpiae eval`: reconstruction quality of each runtime and precision (thin command over
`rpiae.jobs.evaluate`)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from rpiae.cli.common import (
    PRECISIONS, backend_options_option, batch_option, check_writable, crop_option, device_option, friendly_errors,
    model_option, parse_backend_options, parse_names, workers_option,
)
from rpiae.data import EVAL_BATCH
from rpiae.export.backends import RUNTIMES, VARIANTS


@click.command("eval")
@model_option
@click.option("--backend", "-b", default="torch", show_default=True,
              help=f"Comma-separated runtimes: {', '.join(RUNTIMES)} (all but those that run weights need a bundle). "
              + "; ".join(f"{name} = {b} with {', '.join(f'{k}={v}' for k, v in o.items())}"
                          + (f" ({', '.join(p)} only)" if p else "") for name, (b, o, p) in VARIANTS.items())
              + ": the names `rpiae bench` gives those rows.")
@backend_options_option
@click.option("--precision", "-p", default="fp32", show_default=True,
              help=f"Comma-separated precisions: {', '.join(PRECISIONS)}. One row per backend x precision.")
@device_option
@batch_option(EVAL_BATCH)
@crop_option
@workers_option
@click.argument("data", type=str)
@click.option("--limit", type=click.IntRange(1), default=None, help="Evaluate the first N images of DATA only.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Write the report as JSON: one row per variant with its deltas against PyTorch FP32.")
@click.option("--grid", type=click.Path(path_type=Path), default=None,
              help="Write a PNG: originals, each variant's reconstructions, and the amplified difference of the "
              "lowest-precision variant.")
@click.option("--grid-images", type=click.IntRange(1), default=6, show_default=True, help="Images (columns) in --grid.")
@click.option("--save-reference", type=click.Path(path_type=Path), default=None,
              help="Also write the cropped originals as FILE.npz for the ADM evaluation suite (uint8 arr_0, (N, 256, 256, 3)).")
@click.option("--inception-weights", type=click.Path(path_type=Path), default=None,
              help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth for rFID "
              "(default: looked for in torch hub's checkpoints folder).")
@click.option("--lpips-weights", multiple=True, type=click.Path(path_type=Path),
              help="LPIPS weights, one file or two: torchvision's VGG16 (features.N.*) and the LPIPS heads "
              "(lin{0..4}.model.1.weight) (default: looked for in torch hub's checkpoints folder).")
@click.option("--require", default="", help="Comma-separated metrics that must not be skipped: rfid, lpips.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (listed in the JSON) instead of stopping at the first.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def eval_cmd(model, backend, backend_option, precision, device, batch_size, crop, workers, data, limit, json_out, grid, grid_images,
             save_reference, inception_weights, lpips_weights, require, skip_bad, quiet):
    """Reconstruction quality (PSNR, SSIM, LPIPS, rFID) of each runtime and precision.

    Every image of DATA (a folder, ImageFolder tree, .txt list or WebDataset .tar shards, read
    and cropped as `rpiae extract` reads them) is encoded and decoded by every backend x
    precision, and by PyTorch FP32, the reference each row is compared with. Metrics are
    streamed: memory does not grow with the number of images. LPIPS and rFID need local
    weights; without them their column says `skipped: <what to supply>`, unless --require
    names them. Outputs are written only when the whole run has succeeded.
    """
    from rpiae.data.sources import open_source
    from rpiae.jobs import job_model
    from rpiae.jobs.evaluate import OPTIONAL_METRICS, EvalOptions, evaluate, format_table, load_metric_nets, open_variants

    backends = parse_names(backend, RUNTIMES, "runtime", "--backend")
    options = parse_backend_options(backends, backend_option)
    precisions = parse_names(precision, PRECISIONS, "precision", "--precision")
    required = parse_names(require, OPTIONAL_METRICS, "metric", "--require") if require.strip() else []
    check_writable(json_out, grid, save_reference)  # before the run, not after it
    opts = EvalOptions(batch_size=batch_size or EVAL_BATCH, workers=workers, crop=crop, limit=limit,
                       skip_bad=skip_bad, grid_images=grid_images)
    source = open_source(data)
    metric_device = "cuda" if device == "trt" else device  # `trt` is ONNX Runtime's provider, torch runs on CUDA
    nets = load_metric_nets(inception_weights, lpips_weights, required, metric_device)
    requested = [(b, p) for b in backends for p in precisions]
    with contextlib.ExitStack() as stack:
        variants, skipped = open_variants(stack, model, requested, device, metric_device, batch_size, options)
        for s in skipped:
            click.echo(f"skipped {s['backend']}/{s['precision']}: {s['reason']}", err=True)
        report = evaluate(source, variants, nets, opts, model=job_model(variants[0][1], model), json_out=json_out, grid=grid,
                          save_reference=save_reference, requested=[v for v in requested if v not in
                                                                    {(s["backend"], s["precision"]) for s in skipped}],
                          progress=not quiet, skipped_variants=skipped)
    click.echo(format_table(report))
    written = [str(p) for p in (json_out, grid, save_reference) if p is not None]
    click.echo(f"{report['rows'][0]['n']} image(s), {len(report['rows'])} variant(s) in {report['seconds']:.1f} s"
               + (f" -> {', '.join(written)}" if written else ""))
