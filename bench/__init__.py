"""rpiae.bench: latency/throughput of every backend against PyTorch eager and the machine's limit.

    from rpiae.bench import BenchSettings, run_benchmark, render_report
    result = run_benchmark(BenchSettings(model="BUNDLE", backends=["torch", "ort"], precisions=["fp32", "int8"],
                                         batches=[1, 8]), out="bench/results/<machine>.json")
    render_report(["bench/results/<machine>.json"])    # README.md + PNG next to it

CLI: `rpiae bench` (measure) and `rpiae bench --report FILES...` (render). Recorded results
live in `bench/results/`.
"""

from rpiae.bench.report import evaluate_targets, render_markdown, render_report
from rpiae.bench.runner import BenchSettings, load_results, run_benchmark

__all__ = ["BenchSettings", "evaluate_targets", "load_results", "render_markdown", "render_report", "run_benchmark"]
