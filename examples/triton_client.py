"""Query an rpiae model repository served by Triton Inference Server.

    rpiae triton --model BUNDLE --platform python --out model_repository   # any machine
    rpiae serve model_repository                                           # gRPC :8001, HTTP :8000
    python examples/triton_client.py --model rpiae photo1.jpg photo2.png -o out/

With the ensemble (`--model rpiae`) each image goes images -> latent -> image in one
request; `--model rpiae_encode` returns latents only. Latents are written to
OUT/latent.npy, reconstructions (if any) to OUT/000000.png, ... Tensor names and the batch
limit are read from the server, so the script works with any repository `rpiae triton`
writes, over gRPC (default) or HTTP (`--protocol http --url localhost:8000`).

A request that fails (a restarting model instance, a dropped connection) is reported in one
line and retried `--retries` times with a growing pause; one the server refuses as invalid
(wrong shape, NaN, pixels outside [0, 1]) is not retried; the exit status is 1 when a batch
still fails, 0 when every image was answered. Needs `pip install "tritonclient[grpc,http]"`
(and rpiae for the image policy).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def client_module(protocol: str):
    """tritonclient.grpc or tritonclient.http (the same InferInput / InferenceServerClient API)."""
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ValueError(f"protocol {protocol!r}: expected grpc or http")
    return module


def connect(url: str, protocol: str = "grpc"):
    return client_module(protocol).InferenceServerClient(url=url)


def protocol_of(client) -> str:
    return "http" if type(client).__module__.startswith("tritonclient.http") else "grpc"


def model_io(client, model: str) -> tuple[str, list[str], int]:
    """(input name, output names, max_batch_size) of a served model, read from the server."""
    grpc = protocol_of(client) == "grpc"
    meta = client.get_model_metadata(model, as_json=True) if grpc else client.get_model_metadata(model)
    config = client.get_model_config(model, as_json=True)["config"] if grpc else client.get_model_config(model)
    return meta["inputs"][0]["name"], [o["name"] for o in meta["outputs"]], int(config.get("max_batch_size", 0))


def one_line(error: BaseException) -> str:
    text = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    return " ".join(str(text).split()) or type(error).__name__


def deterministic(error: BaseException) -> bool:
    """A request the server refused as invalid (gRPC INVALID_ARGUMENT, HTTP 400: wrong shape or
    dtype, NaN, pixels outside [0, 1]): sending it again gets the same answer."""
    status = error.status() if hasattr(error, "status") and callable(error.status) else None
    return str(status or "") in ("StatusCode.INVALID_ARGUMENT", "400")


def infer(client, model: str, images: np.ndarray, retries: int = 0, backoff: float = 0.5,
          report=None) -> dict[str, np.ndarray]:
    """Send float32 (N, C, H, W) arrays to `model` in batches the model accepts (images in
    [0, 1] for the encoder and the ensemble, latents for the decoder). Returns every output,
    concatenated over the batches. A failed request is reported through `report(line)` and
    retried up to `retries` times, unless the server refused it as invalid; the last error is
    raised."""
    from tritonclient.utils import InferenceServerException

    module = client_module(protocol_of(client))
    input_name, output_names, max_batch = model_io(client, model)
    step = max_batch or len(images)
    results: dict[str, list[np.ndarray]] = {name: [] for name in output_names}
    for i in range(0, len(images), step):
        batch = np.ascontiguousarray(images[i : i + step], dtype=np.float32)
        request = module.InferInput(input_name, list(batch.shape), "FP32")
        request.set_data_from_numpy(batch)
        outputs = [module.InferRequestedOutput(n) for n in output_names]
        for attempt in range(retries + 1):
            try:
                response = client.infer(model, [request], outputs=outputs)
                break
            except (InferenceServerException, ConnectionError, OSError) as e:
                if attempt == retries or deterministic(e):
                    raise
                if report is not None:
                    report(f"{model}: images {i}..{i + len(batch) - 1} failed ({one_line(e)}); "
                           f"retry {attempt + 1}/{retries}")
                time.sleep(backoff * 2**attempt)
        for name in output_names:
            results[name].append(response.as_numpy(name))
    return {name: np.concatenate(parts) for name, parts in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path, help="image files (any size: short side to 256, centre crop)")
    parser.add_argument("--url", default=None, help="server address (default: localhost:8001 for grpc, :8000 for http)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="Triton's gRPC or HTTP API")
    parser.add_argument("--model", default="rpiae", help="the ensemble (PREFIX) or PREFIX_encode")
    parser.add_argument("--retries", type=int, default=3, help="retries of a failed request (default 3)")
    parser.add_argument("--out", "-o", type=Path, default=Path("triton_out"), help="output folder")
    args = parser.parse_args(argv)
    url = args.url or ("localhost:8001" if args.protocol == "grpc" else "localhost:8000")

    from tritonclient.utils import InferenceServerException

    from rpiae.imageio import load_images, save_image

    def report(line: str) -> None:
        print(line, file=sys.stderr)

    try:
        client = connect(url, args.protocol)
        if not client.is_server_live() or not client.is_model_ready(args.model):
            print(f"model {args.model!r} is not ready on {url}", file=sys.stderr)
            return 1
        images = load_images(args.images)
        outputs = infer(client, args.model, images, retries=args.retries, report=report)
    except (InferenceServerException, ConnectionError, OSError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for name, array in outputs.items():
        if array.ndim == 4 and array.shape[1] == 3:  # decoded images
            for i, img in enumerate(array):
                save_image(img, args.out / f"{i:06d}.png")
            print(f"{name}: {array.shape} -> {args.out}/000000.png ...")
        else:
            np.save(args.out / f"{name}.npy", array)
            print(f"{name}: {array.shape} -> {args.out / (name + '.npy')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
