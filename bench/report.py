"""Render benchmark results: a markdown table per machine, the targets, PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rpiae.bench.results import load_results
from rpiae.bench.targets import MiB, evaluate_targets


# ---------------------------------------------------------------------------------------------
# markdown


def _f(v: Any, fmt: str = "{:.1f}", none: str = "–") -> str:
    if v is None:
        return none
    try:
        return fmt.format(v)
    except (TypeError, ValueError):
        return str(v)


def _machine_line(result: dict[str, Any]) -> str:
    m = result.get("machine", {})
    cpu = m.get("cpu", {})
    libs = m.get("libraries", {})
    parts = [f"CPU {cpu.get('model')} ({cpu.get('usable_cores')} usable cores; {', '.join(cpu.get('flags', [])) or 'no SIMD flags read'})"]
    if "gpu" in m:
        g = m["gpu"]
        parts.append(f"GPU {g.get('name')} (cc {g.get('compute_capability')}, driver {g.get('driver', '?')}, "
                     f"CUDA {g.get('cuda_runtime')})")
    parts.append(f"{result.get('settings', {}).get('threads')} threads")
    parts.append(", ".join(f"{k} {v}" for k, v in libs.items() if k in ("torch", "onnxruntime", "onnxruntime-gpu",
                                                                           "tensorrt", "nvidia-modelopt", "python")))
    return "; ".join(parts)


def _peaks_line(result: dict[str, Any]) -> str:
    peaks = result.get("peaks", {})
    out = []
    for key, val in sorted(peaks.get("used", {}).items()):
        b = peaks.get("before", {}).get(key, {}).get("gflops")
        a = peaks.get("after", {}).get(key, {}).get("gflops")
        kern = (peaks.get("before", {}).get(key) or {}).get("kernel", "")
        out.append(f"{key} {val:.0f} GFLOP/s (before {_f(b, '{:.0f}')}, after {_f(a, '{:.0f}')}; {kern})")
    return "; ".join(out) or "not measured"


def _header(result: dict[str, Any], title: str | None) -> list[str]:
    s, model, load = result.get("settings", {}), result.get("model", {}), result.get("load_average", {})
    flops = model.get("flops_per_image", {})
    lines = [f"## {title or 'Benchmark'}", ""]
    lines.append(f"- model: `{model.get('name')}` ({model.get('kind')}); per image: encode "
                 f"{flops.get('encode', 0) / 1e9:.1f} GFLOP, decode {flops.get('decode', 0) / 1e9:.1f} GFLOP "
                 "(`RPiAEConfig.flops()`)")
    lines.append(f"- machine: {_machine_line(result)}")
    lines.append(f"- device `{s.get('device')}`; measured matmul peak: {_peaks_line(result)}")
    lines.append(f"- run: {result.get('started')} → {result.get('finished')}; load average (1/5/15 min) at start "
                 f"{load.get('start')}, at end {load.get('end')}; warm-up ≥ {s.get('warmup')} calls / "
                 f"{s.get('warmup_time')} s, then ≥ {s.get('min_iters')} calls and ≥ {s.get('min_time')} s "
                 f"(cap {s.get('max_iters')} calls / {s.get('max_time')} s); "
                 f"{'one fresh process per row' if s.get('isolate') else 'all rows in one process (RSS not per row)'}")
    if s.get("notes"):
        lines.append(f"- notes: {s['notes']}")
    return lines + [""]


def _row_cells(r: dict[str, Any], refs: list[str], cuda: bool) -> list[str]:
    t = r["timing"]
    name = r["backend"] + (" (ref)" if r.get("reference") and r["backend"] == "torch" else "")
    cells = [r["graph"], name, r["precision"], str(r["batch"]), _f(t.get("p50_ms")), _f(t.get("p90_ms")),
             _f(t.get("p99_ms")), _f(t.get("throughput_ips"), "{:.2f}")]
    cells += [_f(r.get("speedup_vs_torch", {}).get(p), "{:.2f}×") for p in refs]
    frac, lfrac = r.get("fraction_of_peak"), r.get("fraction_of_local_peak")
    cells += [_f(r.get("gflops"), "{:.0f}"), (f"{frac * 100:.0f} % ({r.get('peak_dtype')})" if frac is not None else "–"),
              f"{lfrac * 100:.0f} % of {r['local_peak']['gflops']:.0f}" if lfrac is not None else "–"]
    if cuda:
        gpu_mem = max(r.get("cuda_peak_allocated_bytes") or 0, r.get("cuda_device_used_delta_bytes") or 0)
        cells += [_f(r.get("compute", {}).get("p50_ms"), "{:.2f}"), f"{gpu_mem / MiB:.0f}" if gpu_mem else "–"]
    rss = r.get("rss_peak_bytes")
    cells += [f"{rss / MiB:.0f} ({r['rss_delta_bytes'] / MiB:+.0f})" if rss and r.get("rss_delta_bytes") is not None else "–",
              _f(r.get("rss_delta_over_weights"), "{:.2f}×")]
    return cells


def _rows_table(result: dict[str, Any], cuda: bool) -> list[str]:
    """The rows that ran, the legend, then the skipped rows grouped by reason."""
    rows = result.get("rows", [])
    refs = [p for p in ("fp32", "bf16", "fp16") if any(p in r.get("speedup_vs_torch", {}) for r in rows)]
    head = ["graph", "backend", "precision", "batch", "p50 ms", "p90 ms", "p99 ms", "img/s"]
    head += [f"× torch {p}" for p in refs] + ["GFLOP/s", "% of peak", "% of row peak"]
    if cuda:
        head += ["GPU p50 ms", "GPU mem MiB"]
    head += ["peak RSS MiB (Δ)", "RSS Δ / weights"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    skipped: dict[str, list[str]] = {}
    for r in rows:
        if r.get("status") != "ok":
            skipped.setdefault(f"{r.get('status')}: {r.get('reason')}", []).append(
                f"{r['graph']} {r['backend']} {r['precision']} b{r['batch']}")
            continue
        lines.append("| " + " | ".join(_row_cells(r, refs, cuda)) + " |")
    lines.append("")
    lines.append("× torch P = PyTorch eager P p50 / this row's p50 at the same batch in the same run. "
                 "% of peak = model FLOPs × batch / p50"
                 + (" (GPU compute time on CUDA)" if cuda else "")
                 + " over the run's measured matmul peak of the dtype in brackets (best of before/after); "
                 "% of row peak = the same over that matmul re-measured in the row's own process just before it "
                 "(the share of a shared machine the row actually had). "
                 "Peak RSS = the row's own process high-water mark; Δ = above the process baseline before the "
                 "backend was opened; weights = the graph's weight bytes in that precision."
                 + (" GPU mem = max(torch allocator peak, device memory in use after the timed calls minus before "
                    "the backend was opened)." if cuda else ""))
    lines.append("")
    if skipped:
        lines += ["Skipped rows:", ""] + [f"- {', '.join(which)} — {reason}" for reason, which in skipped.items()] + [""]
    return lines


def _targets_section(result: dict[str, Any]) -> list[str]:
    targets = result.get("targets") or evaluate_targets(result)
    if not targets:
        return []
    lines = ["### Targets", "", "| target | measured | status | note |", "|---|---|---|---|"]
    profiles = {(p["graph"], p["backend"], p["precision"]): p for p in result.get("profiles", []) if p.get("status") == "ok"}
    for tg in targets:
        v = tg.get("value")
        val = "–" if v is None else (f"{v * 100:.0f} %" if tg["unit"] == "fraction" else f"{v:.2f}×")
        note = tg.get("note", "")
        if tg.get("holds") is False and tg.get("row") and not tg.get("at_most"):  # a speed target
            g, b, p, _ = tg["row"]
            prof = profiles.get((g, b, p))
            if prof:
                top = ", ".join(f"{o['op']} {o['share'] * 100:.0f} %" for o in prof["ops"][:4])
                note = (note + "; " if note else "") + f"profile (batch {prof['batch']}): {top}"
        lines.append(f"| {tg['target']} | {val} | {tg['status']} | {note} |")
    return lines + [""]


def _profiles_section(result: dict[str, Any]) -> list[str]:
    if not result.get("profiles"):
        return []
    lines = ["### Profiles (share of kernel time by op type)", ""]
    for p in result["profiles"]:
        if p.get("status") != "ok":
            lines.append(f"- {p['graph']} {p['backend']} {p['precision']}: {p.get('status')} ({p.get('reason')})")
            continue
        top = ", ".join(f"{o['op']} {o['share'] * 100:.1f} %" for o in p["ops"][:6])
        lines.append(f"- {p['graph']} {p['backend']} {p['precision']} batch {p['batch']}: {top}")
    return lines + [""]


def _real_photos_section(result: dict[str, Any]) -> list[str]:
    acc = result.get("real_photos")
    if not acc:
        return []
    lines = [f"### Accuracy on real photos (`rpiae eval` {acc['file']}: model {acc['model']}, {acc['images']} images; "
             "the accuracy-bound targets read it)", "", "| runtime / precision | Δ PSNR vs PyTorch FP32 |", "|---|---|"]
    lines += [f"| {name} | {d:+.3f} dB |" for name, d in acc["psnr_delta_db"].items()]
    return lines + [""]


def _accuracy_section(result: dict[str, Any]) -> list[str]:
    acc = result.get("accuracy")
    if not acc:
        return []
    lines = ["### Accuracy of the bundle's graphs (from its manifest: ONNX Runtime vs PyTorch eager FP32)", "",
             "| precision | latent cosine (min) | decoded PSNR vs FP32 dB | recon PSNR drop dB | ok |",
             "|---|---|---|---|---|"]
    for a in acc:
        m = a.get("metrics", {})
        lines.append(f"| {a.get('precision')} | {_f(m.get('latent_cosine_min'), '{:.5f}')} | "
                     f"{_f(m.get('decoded_psnr_db'), '{:.1f}')} | {_f(m.get('recon_psnr_drop_db'), '{:.2f}')} | "
                     f"{a.get('ok')} |")
    return lines + [""]


def render_markdown(result: dict[str, Any], title: str | None = None, plot: str | None = None) -> str:
    cuda = result.get("settings", {}).get("device", "cpu").startswith("cuda")
    lines = (_header(result, title) + _rows_table(result, cuda) + _targets_section(result) + _profiles_section(result)
             + _real_photos_section(result) + _accuracy_section(result))
    if plot:
        lines += [f"![latency and throughput vs batch]({plot})", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# plots


def plot_result(result: dict[str, Any], out: str | Path, title: str | None = None) -> Path:
    """Latency (p50) and throughput vs batch per backend/precision, one column per graph."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from rpiae.fileio import atomic_file

    rows = [r for r in result.get("rows", []) if r.get("status") == "ok"]
    graphs = [g for g in ("encode", "decode") if any(r["graph"] == g for r in rows)] or ["encode"]
    fig, axes = plt.subplots(2, len(graphs), figsize=(6 * len(graphs), 8), squeeze=False)
    for col, graph in enumerate(graphs):
        series: dict[str, list[tuple[int, float, float]]] = {}
        for r in rows:
            if r["graph"] == graph:
                series.setdefault(f"{r['backend']} {r['precision']}", []).append(
                    (r["batch"], r["timing"]["p50_ms"], r["timing"]["throughput_ips"]))
        for label, pts in sorted(series.items()):
            pts.sort()
            xs = [p[0] for p in pts]
            axes[0][col].plot(xs, [p[1] for p in pts], marker="o", label=label)
            axes[1][col].plot(xs, [p[2] for p in pts], marker="o", label=label)
        axes[0][col].set_title(f"{graph}: latency p50")
        axes[0][col].set_ylabel("ms per call")
        axes[1][col].set_title(f"{graph}: throughput")
        axes[1][col].set_ylabel("images / s")
        for row in (0, 1):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            batches = sorted({r["batch"] for r in rows if r["graph"] == graph})
            if batches:
                ax.set_xticks(batches, [str(b) for b in batches])
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlabel("batch")
            ax.grid(True, which="both", alpha=0.3)
            if series:
                ax.legend(fontsize=8)
    fig.suptitle(title or f"{result.get('model', {}).get('name')} on {result.get('settings', {}).get('device')}")
    fig.tight_layout()
    out = Path(out)
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
        tmp.chmod(0o644)
    plt.close(fig)
    return out


def render_report(paths: list[str | Path], out_dir: str | Path | None = None, write: bool = True) -> str:
    """Markdown for all result files; with `write`, OUT_DIR/README.md and one PNG per file.

    OUT_DIR/NOTES.md, where present (hand-written analysis of the recorded runs), is appended.
    """
    from rpiae.fileio import atomic_file

    if not paths:
        raise ValueError("no result files given")
    paths = [Path(p) for p in paths]
    out_dir = Path(out_dir) if out_dir is not None else paths[0].parent
    parts = ["# Benchmark results", "",
             "Rendered by `rpiae bench --report " + " ".join(p.name for p in paths) + "`; the JSON files hold every "
             "number (machine facts, settings, peaks, per-row timings, RSS, profiles).", ""]
    for p in sorted(paths):
        result = load_results(p)
        png = f"{p.stem}.png" if write else None
        try:  # a value of the wrong kind deeper in the file than `load_results` checks: one line naming it
            parts.append(render_markdown(result, title=f"{p.stem} ({p.name})", plot=png))
            if write:
                plot_result(result, out_dir / png, title=f"{p.stem}: {result['model'].get('name')}")
        except (KeyError, TypeError, AttributeError, IndexError) as e:
            raise ValueError(f"{p}: not an rpiae bench result: cannot render it ({type(e).__name__}: {e})") from None
    notes = out_dir / "NOTES.md"  # hand-written analysis kept next to the results, appended verbatim
    if notes.is_file():
        parts += ["", notes.read_text().strip(), ""]
    text = "\n".join(parts)
    if write:
        with atomic_file(out_dir / "README.md") as tmp:
            tmp.write_text(text + "\n")
            tmp.chmod(0o644)
    return text
