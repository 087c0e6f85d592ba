"""`run_benchmark`: every backend x precision x graph x batch, side by side, in one run.

Methodology (recorded in the results' `methodology`):

- One row = (backend, precision, graph, batch). By default each row runs in a fresh
  child process (multiprocessing `spawn`): the RSS high-water mark of a process only
  rises, so measuring several rows in one process would charge every row with the largest
  one before it. The child's own high-water mark is the row's peak host RSS
  (`rpiae.host.peak_rss`: Linux's VmHWM, not `ru_maxrss`, which a spawned child inherits from
  its parent's peak); its RSS right before the backend is opened (interpreter + torch +
  runtime libraries) is recorded as the baseline, and `peak - baseline` is what the row
  itself costs. Before the baseline the row's process hands freed heap memory back and resets
  its peak to the current RSS (`rpiae.host.start_rss_measure`): the matmul peak measured in the
  row's process just before does not count, neither as baseline nor as peak.
- Threads are fixed: `OMP_NUM_THREADS`/`MKL_NUM_THREADS` in the child's environment,
  `torch.set_num_threads`, ONNX Runtime `intra_op_num_threads`; all recorded.
- Warm-up: at least `warmup` calls and `warmup_time` seconds (compilation, allocator and
  thread-pool start-up happen there). Then timed calls until at least `min_iters` calls and
  `min_time` seconds, or `max_iters` calls / `max_time` seconds, whichever comes first.
  p50/p90/p99 over the timed calls; throughput = batch / p50.
- End-to-end time = host numpy array in -> host numpy array out (`time.perf_counter`),
  i.e. including host<->device copies on a GPU. On CUDA, compute time is measured apart:
  inputs already on the device (torch tensors; ONNX Runtime binds them, no host copy), CUDA
  events recorded on the backend's execution stream (its `stream` attribute where it has
  one, else torch's current stream of the run's GPU). Every CUDA call names the run's GPU
  (`cuda:N` measures GPU N). The parent process never initialises CUDA on a GPU run: machine
  facts and matmul peaks are taken in child processes (a GPU in exclusive-process mode then
  still gives every row its context).
- Reference: PyTorch eager FP32 (and BF16 on CUDA) rows are always measured, so every row
  has its speed-up over eager at the same batch in the same run.
- Hardware limit: matmul peaks measured before and after the rows (and briefly inside
  each child before it opens the backend, for the row's own dtype only: `local_peak`).
  Fraction of peak =
  `RPiAEConfig.flops()[graph] * batch / p50` over the best of the run's peaks.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from pathlib import Path
from typing import Any, Callable

from rpiae.bench.machine import load_average
from rpiae.bench.peak import on_cuda
from rpiae.bench.results import FORMAT, FORMAT_VERSION, load_results, write_results
from rpiae.bench.row import child_env, children_quiet_on_interrupt, measure_row, profile_graph, run_in_child
from rpiae.bench.settings import BENCH_BACKENDS, BenchSettings
from rpiae.bench.targets import evaluate_targets
from rpiae.bench.timing import stats, time_loop
from rpiae.export.backends import REFERENCE, backend_info, runnable, variant
from rpiae.export.manifest import KIND_ONNX
from rpiae.export.spec import TORCH_PRECISIONS
from rpiae.host import cpu_flags
from rpiae.precisions import cpu_native, precision_info

__all__ = ["BENCH_BACKENDS", "BenchSettings", "load_results", "measure_row", "profile_graph", "run_benchmark",
           "stats", "time_loop", "write_results"]


def _static_skip(spec: dict[str, Any], is_bundle: bool, bundle_precisions: list[str],
                 cpu_flags: set[str] | None = None) -> str | None:
    """Why a row cannot run, known before running it; `cpu_flags`: those of a CPU run's CPU."""
    b, p = spec["backend"], spec["precision"]
    name, _, variant_precisions = variant(b)
    info = backend_info(name)
    if variant_precisions is not None and p not in variant_precisions:
        return f"{b} runs {', '.join(variant_precisions)}, not {p}"
    if info.from_weights and p not in info.precisions:
        return f"{b} runs {', '.join(info.precisions)} (autocast), not {p}; {p} is an exported-graph precision"
    if p not in info.precisions:
        return f"{b} runs {', '.join(info.precisions)}, not {p}"
    if not info.from_weights and not is_bundle:
        return f"backend {b!r} runs an export bundle; --model is a checkpoint (run `rpiae export` first)"
    if info.from_weights and cpu_flags is not None and not cpu_native(p, cpu_flags):
        # PyTorch's CPU autocast then runs matmuls at ~1 % of fp32's speed (the run's peaks show it)
        return (f"{p} has no native kernels on this CPU (it has none of {', '.join(precision_info(p).cpu_flags)}): "
                f"PyTorch would emulate it, far slower than fp32")
    if info.runs == KIND_ONNX and p not in runnable(info.name, bundle_precisions):
        have = ", ".join(bundle_precisions) or "none"
        return f"the bundle has no {p} graphs (has: {have}); export them with `rpiae export --precision {p}`"
    return None


def _derive(result: dict[str, Any]) -> None:
    """Fill speed-ups over PyTorch eager and fractions of the measured peak into each row."""
    from rpiae.bench.peak import peak_key

    flops = result["model"]["flops_per_image"]
    peaks = result["peaks"]["used"]
    device = result["settings"]["device"]
    rows = result["rows"]
    ok = [r for r in rows if r.get("status") == "ok"]
    refs = {(r["graph"], r["batch"], r["precision"]): r for r in ok if r["backend"] == REFERENCE}

    def t(r: dict[str, Any]) -> float:
        return r["timing"]["p50_ms"]

    for r in ok:
        r["speedup_vs_torch"] = {p: refs[(r["graph"], r["batch"], p)]["timing"]["p50_ms"] / t(r)
                                 for p in TORCH_PRECISIONS if (r["graph"], r["batch"], p) in refs}
        measured_ms = r["compute"]["p50_ms"] if "compute" in r else t(r)
        achieved = flops[r["graph"]] * r["batch"] / (measured_ms / 1e3) / 1e9
        r["gflops"] = achieved
        key = peak_key(device, r["precision"], {k: {"gflops": v} for k, v in peaks.items()})
        r["peak_dtype"] = key
        r["fraction_of_peak"] = achieved / peaks[key] if key else None
        lp = r.get("local_peak")
        r["fraction_of_local_peak"] = achieved / lp["gflops"] if lp and lp.get("gflops") else None
        if r.get("weight_bytes"):
            if r.get("rss_peak_bytes"):
                r["rss_over_weights"] = r["rss_peak_bytes"] / r["weight_bytes"]
            if r.get("rss_delta_bytes") is not None:
                r["rss_delta_over_weights"] = r["rss_delta_bytes"] / r["weight_bytes"]


def run_benchmark(settings: BenchSettings, out: str | Path | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every row, derive ratios and fractions, write `out` atomically (JSON), return it."""
    import torch

    from rpiae.engines import resolve_model
    from rpiae.export.bundle import Bundle

    say = progress or (lambda msg: None)
    model_path = resolve_model(settings.model)
    settings.model = str(model_path)
    is_bundle = Bundle.is_bundle(model_path)
    if is_bundle:
        bundle = Bundle.open(model_path)
        config = bundle.config
        bundle_precisions = bundle.precisions()
    else:
        from rpiae.checkpoints import read_config

        config = read_config(model_path)
        if config is None:  # the authors' .pt: the config is matched from the tensor shapes
            from rpiae.model import RPiAE

            config = RPiAE.from_checkpoint(model_path).config
        bundle, bundle_precisions = None, []
    sdict = dataclasses.asdict(settings)
    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(settings.threads)
        result = _run(settings, sdict, model_path, is_bundle, bundle, config, bundle_precisions, say)
    finally:
        torch.set_num_threads(threads_before)
    if out is not None:
        write_results(result, out)
    return result


def _measure_rows(settings: BenchSettings, sdict: dict[str, Any], is_bundle: bool, bundle_precisions: list[str],
                  say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every row, in its own process when isolated; a (backend, precision) found unavailable once
    is skipped for its later rows with the same reason."""
    rows: list[dict[str, Any]] = []
    unavailable: dict[tuple[str, str], str] = {}
    specs = settings.row_specs()
    flags = None if on_cuda(settings.device) else (cpu_flags() or None)  # None: unknown, nothing skipped
    for i, spec in enumerate(specs, 1):
        label = f"[{i}/{len(specs)}] {spec['graph']} {spec['backend']} {spec['precision']} batch {spec['batch']}"
        reason = (_static_skip(spec, is_bundle, bundle_precisions, flags)
                  or unavailable.get((spec["backend"], spec["precision"])))
        if reason:
            row = {**spec, "device": settings.device, "status": "skipped", "reason": reason}
        else:
            say(label)
            row = (run_in_child(measure_row, spec, sdict, threads=settings.threads) if settings.isolate
                   else measure_row(spec, sdict))
            row = {**spec, "device": settings.device, **row}
            if row.get("status") == "skipped":
                unavailable[(spec["backend"], spec["precision"])] = row["reason"]
        row["load_average"] = load_average()
        if row.get("status") == "ok":
            say(f"{label}: p50 {row['timing']['p50_ms']:.1f} ms ({row['timing']['iterations']} calls)")
        else:
            say(f"{label}: {row.get('status')} - {row.get('reason')}")
        rows.append(row)
    return rows


def _profiles(settings: BenchSettings, sdict: dict[str, Any], rows: list[dict[str, Any]],
              say: Callable[[str], None]) -> list[dict[str, Any]]:
    """An op-type profile of each measured (graph, backend, precision) at the smallest batch."""
    profiles, seen = [], set()
    smallest = min(settings.batches)
    for r in rows:
        key = (r["graph"], r["backend"], r["precision"])
        if r.get("status") == "ok" and key not in seen:
            seen.add(key)
            spec = {"graph": r["graph"], "backend": r["backend"], "precision": r["precision"], "batch": smallest}
            say(f"profiling {r['graph']} {r['backend']} {r['precision']} batch {smallest}")
            profiles.append(run_in_child(profile_graph, spec, sdict, threads=settings.threads) if settings.isolate
                            else profile_graph(spec, sdict))
    return profiles


def _best_peaks(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, float]:
    used = {}
    for key in set(before) | set(after):
        vals = [p[key]["gflops"] for p in (before, after) if "gflops" in p.get(key, {})]
        if vals:
            used[key] = max(vals)
    return used


def _model_facts(model_path: Path, is_bundle: bool, config: Any) -> dict[str, Any]:
    return {
        "path": str(model_path), "kind": "bundle" if is_bundle else "checkpoint", "name": config.name,
        "config": config.to_dict(), "flops_per_image": config.flops(),
        "flops_source": "RPiAEConfig.flops() (matmuls, multiply-add = 2 FLOPs)",
    }


def _run(settings: BenchSettings, sdict: dict[str, Any], model_path: Path, is_bundle: bool, bundle: Any, config: Any,
         bundle_precisions: list[str], say: Callable[[str], None]) -> dict[str, Any]:
    started = _dt.datetime.now(_dt.timezone.utc)
    say(f"measuring the {settings.device} matmul peak")
    facts, peaks_before = _facts_and_peaks(settings, with_facts=True)
    rows = _measure_rows(settings, sdict, is_bundle, bundle_precisions, say)
    profiles = _profiles(settings, sdict, rows, say) if settings.profile else []
    say(f"measuring the {settings.device} matmul peak again")
    _, peaks_after = _facts_and_peaks(settings, with_facts=False)
    result: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "started": started.isoformat(timespec="seconds"),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": facts,
        "settings": sdict,
        "model": _model_facts(model_path, is_bundle, config),
        "peaks": {"before": peaks_before, "after": peaks_after, "used": _best_peaks(peaks_before, peaks_after),
                  "note": "fraction_of_peak uses the best of the before/after medians per dtype"},
        "load_average": {"start": facts.get("load_average"), "end": load_average()},
        "methodology": (__doc__ or "").split("Methodology (recorded in the results' `methodology`):")[-1].strip(),
        "rows": rows,
        "profiles": profiles,
    }
    if bundle is not None:
        result["accuracy"] = bundle.manifest.parity
    _derive(result)
    result["targets"] = evaluate_targets(result)
    return result


def machine_and_peaks(device: str, threads: int, peak_time: float, peak_size: int | None,
                      with_facts: bool) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """(machine facts or None, matmul peaks) of the run's device, measured in this process."""
    from rpiae.bench.machine import machine_facts
    from rpiae.bench.peak import measure_peaks

    facts = machine_facts(device, threads) if with_facts else None
    return facts, measure_peaks(device, threads, min_time=peak_time, size=peak_size)


def _facts_and_peaks(settings: BenchSettings, with_facts: bool):
    """Machine facts and peaks, with the run's threads. On a GPU run with isolated rows they are
    taken in a child process: the parent never initialises CUDA, so it holds no context and no
    cached peak matrices while the rows run (a GPU in exclusive-process mode gives one
    process a context at a time)."""
    from rpiae.bench.peak import on_cuda

    args = (settings.device, settings.threads, settings.peak_time, settings.peak_size, with_facts)
    if on_cuda(settings.device) and settings.isolate:
        from rpiae.isolation import run_in_child as _run

        with child_env(settings.threads), children_quiet_on_interrupt():
            return tuple(_run(machine_and_peaks, *args, what="the machine facts and peak measurement"))
    with child_env(settings.threads):
        return machine_and_peaks(*args)
