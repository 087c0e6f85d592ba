"""`rpiae bench`: latency/throughput of every backend and precision, and the report."""

from __future__ import annotations

from pathlib import Path

import click

from rpiae.bench.settings import BENCH_BACKENDS
from rpiae.cli.common import (
    allow_fallback_option, device_option, fallback_allowed, friendly_errors, model_option, names_callback, parse_int_list,
)
from rpiae.export.spec import GRAPHS, PRECISIONS


@click.command()
@model_option
@click.option("--backends", default="torch,ort", show_default=True, callback=names_callback(BENCH_BACKENDS, "backend"),
              help=f"Comma-separated: {', '.join(BENCH_BACKENDS)}. Unavailable ones are reported as "
              "skipped with the reason. PyTorch eager rows are always added as the reference.")
@click.option("--precision", "-p", "precisions", default="fp32", show_default=True,
              callback=names_callback(PRECISIONS, "precision"),
              help="Comma-separated: fp32, fp16, bf16, int8 (combinations a backend cannot run are skipped).")
@click.option("--batch", "batches", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--graphs", default="encode,decode", show_default=True, callback=names_callback(GRAPHS, "graph"),
              help="Which graphs: encode, decode.")
@device_option
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads, fixed for every runtime (default: the cores this process may use).")
@click.option("--warmup", type=click.IntRange(0), default=2, show_default=True, help="Warm-up calls per row (at least).")
@click.option("--warmup-time", type=click.FloatRange(0), default=1.0, show_default=True,
              help="Warm-up seconds per row (at least).")
@click.option("--min-iters", type=click.IntRange(1), default=5, show_default=True, help="Timed calls per row (at least).")
@click.option("--min-time", type=click.FloatRange(0), default=3.0, show_default=True,
              help="Timed seconds per row (at least).")
@click.option("--max-iters", type=click.IntRange(1), default=1000, show_default=True, help="Cap on timed calls per row.")
@click.option("--max-time", type=click.FloatRange(0), default=60.0, show_default=True,
              help="Hard cap on timed seconds per row (may end a slow row before --min-iters; the row records it).")
@click.option("--peak-time", type=click.FloatRange(0.05), default=1.0, show_default=True,
              help="Seconds per dtype for the matmul peak measured before and after the rows.")
@click.option("--row-peak-time", type=click.FloatRange(0), default=0.5, show_default=True,
              help="Seconds to re-measure the matmul peak inside each row's process before it (0: off).")
@click.option("--no-isolate", is_flag=True,
              help="Run every row in this process (faster start; peak RSS is then not measured per row).")
@click.option("--no-reference", is_flag=True, help="Do not add the PyTorch eager reference rows.")
@click.option("--profile", is_flag=True,
              help="Also record an op-type profile per backend/precision/graph at the smallest batch (torch, ort).")
@click.option("--notes", default="", help="Free text stored with the results (e.g. what else ran on the machine).")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Results JSON to write (atomically); a directory gets <machine>.json inside.")
@click.option("--report", "report", is_flag=True,
              help="Render FILES (result JSONs) instead of measuring: markdown table, targets and PNG plots.")
@click.option("--accuracy", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="An `rpiae eval --json` report whose PSNR changes against PyTorch FP32 (per runtime and precision, "
              "matched by name) decide which rows the accuracy-bound targets count: the fastest backend within 0.1 dB, "
              "INT8 within its 1 dB bound. Stored in the results (`real_photos`); with --report, added to FILES.")
@click.option("--report-dir", type=click.Path(path_type=Path), default=None,
              help="With --report: where README.md and the PNGs go (default: the first file's folder).")
@allow_fallback_option
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
@friendly_errors
def bench(model, backends, precisions, batches, graphs, device, threads, warmup, warmup_time, min_iters, min_time,
          max_iters, max_time, peak_time, row_peak_time, no_isolate, no_reference, profile, notes, out, report, accuracy, report_dir,
          allow_fallback, files):
    """Measure encode/decode latency and throughput of every backend, or render results.

    \b
    rpiae bench --model BUNDLE --backends torch,torch-compile,ort,trt --precision fp32,fp16,int8 \\
                --batch 1,8,32 --out bench/results/<machine>.json
    rpiae bench --report bench/results/*.json     # markdown table + PNG plots

    Each row runs in a fresh process (true peak RSS per row) with fixed threads, after a
    warm-up, for at least --min-iters calls and --min-time seconds; p50/p90/p99, images/s,
    the speed-up over PyTorch eager at the same batch, and the fraction of the matmul peak
    measured in the same run.
    """
    if report:
        from rpiae.bench.report import render_report

        if not files:
            raise click.UsageError("--report needs result files: rpiae bench --report bench/results/*.json")
        missing = [str(f) for f in files if not Path(f).is_file()]
        if missing:
            raise click.ClickException(f"no such result file: {', '.join(missing)}")
        from rpiae.bench.results import load_results

        for f in files:  # every file checked before anything is written (one line naming a bad one)
            load_results(f)
        if accuracy is not None:
            from rpiae.bench.results import write_results
            from rpiae.bench.targets import load_real_photo_accuracy, with_real_photo_accuracy

            section = load_real_photo_accuracy(accuracy)
            for f in files:
                write_results(with_real_photo_accuracy(load_results(f), section), f)
                click.echo(f"{f}: targets evaluated again with the real-photo accuracy of {accuracy}", err=True)
        click.echo(render_report(list(files), out_dir=report_dir))
        target = report_dir or Path(files[0]).parent
        click.echo(f"\nwrote {target / 'README.md'} and {len(files)} plot(s)", err=True)
        return
    if files:
        raise click.UsageError(f"unexpected arguments {' '.join(map(str, files))} (did you mean --report?)")

    from rpiae.bench.report import render_markdown
    from rpiae.bench.runner import BenchSettings, run_benchmark

    settings = BenchSettings(
        model=str(model) if model is not None else None, backends=backends, precisions=precisions,
        batches=parse_int_list(batches, "--batch"), graphs=graphs, device=device, threads=threads,
        warmup=warmup, warmup_time=warmup_time, min_iters=min_iters, min_time=min_time, max_iters=max_iters,
        max_time=max_time, isolate=not no_isolate, reference=not no_reference, peak_time=peak_time,
        row_peak_time=row_peak_time,
        profile=profile, notes=notes,
    )
    directory = out is not None and (out.is_dir() or str(out).endswith("/"))
    section = None
    if accuracy is not None:  # read before measuring: a bad file must not cost the run
        from rpiae.bench.targets import load_real_photo_accuracy, with_real_photo_accuracy

        section = load_real_photo_accuracy(accuracy)
    with fallback_allowed(allow_fallback):
        result = run_benchmark(settings, progress=lambda msg: click.echo(msg, err=True))
    if section is not None:
        with_real_photo_accuracy(result, section)
    if directory:  # named after the machine the run measured (its facts come from the run)
        from rpiae.bench.machine import machine_slug

        out = out / f"{machine_slug(result['machine'])}.json"
    if out is not None:
        from rpiae.bench.runner import write_results

        write_results(result, out)
    click.echo(render_markdown(result, title=f"{result['model']['name']} on {device}"))
    if out is not None:
        click.echo(f"wrote {out}", err=True)
