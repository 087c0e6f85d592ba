"""Time one int8 graph of two bundles alternately in one process: what a different INT8 export
(another --int8-keep, say) costs, without the drift between two separate benchmark runs.

    python scripts/int8_alternate.py --a B_old --b B_new --backend openvino --graph decode --batch 8 --calls 4
    python scripts/int8_alternate.py --a B_old --b B_new --backend openvino -O int8_rest=bf16 --graph encode

Each call of A is followed by one of B (after one warm-up call each); prints the medians and B / A.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    from rpiae.engines import backend_options, load_backend, split_options

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="first bundle")
    ap.add_argument("--b", required=True, help="second bundle")
    ap.add_argument("--backend", default="openvino")
    ap.add_argument("-O", "--backend-option", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--graph", choices=["encode", "decode"], default="encode")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    options = backend_options(args.backend, split_options(args.backend_option))
    x = np.random.default_rng(0).random((args.batch, 3, 256, 256), dtype=np.float32)
    backends = {name: load_backend(path, args.backend, "int8", threads=args.threads, **options)
                for name, path in (("A", args.a), ("B", args.b))}
    inputs = {name: x if args.graph == "encode" else be.encode(x) for name, be in backends.items()}
    times: dict[str, list[float]] = {name: [] for name in backends}
    for name, be in backends.items():
        getattr(be, args.graph)(inputs[name])
    for _ in range(args.calls):
        for name, be in backends.items():
            t0 = time.perf_counter()
            getattr(be, args.graph)(inputs[name])
            times[name].append(time.perf_counter() - t0)
    med = {name: float(np.median(t)) * 1000 for name, t in times.items()}
    print(f"{args.backend} {' '.join(args.backend_option)} {args.graph} batch {args.batch}: A {med['A']:.1f} ms, "
          f"B {med['B']:.1f} ms, B / A {med['B'] / med['A']:.3f}")


if __name__ == "__main__":
    main()
