"""Query an rpiae model repository served by Triton Inference Server.

    rpiae triton --model BUNDLE --precision fp16 --out model_repository
    tritonserver --model-repository $PWD/model_repository          # gRPC on :8001
    python examples/triton_client.py --model rpiae photo1.jpg photo2.png -o out/

With the ensemble (`--model rpiae`) each image goes images -> latent -> image in one
request; `--model rpiae_encode` returns latents only. Latents are written to
OUT/latents.npy, reconstructions (if any) to OUT/000000.png, ... Tensor names and the batch
limit are read from the server, so the script works with any repository `rpiae triton`
writes. Needs `pip install "tritonclient[grpc]"` (and rpiae for the image policy).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def infer(client, model: str, images: np.ndarray) -> dict[str, np.ndarray]:
    """Send float32 (N, 3, 256, 256) images in [0, 1] to `model`, in batches the model accepts.
    Returns every output of the model, concatenated over the batches."""
    import tritonclient.grpc as grpcclient

    meta = client.get_model_metadata(model, as_json=True)
    config = client.get_model_config(model, as_json=True)["config"]
    input_name = meta["inputs"][0]["name"]
    output_names = [o["name"] for o in meta["outputs"]]
    step = int(config.get("max_batch_size", 0)) or len(images)
    results: dict[str, list[np.ndarray]] = {name: [] for name in output_names}
    for i in range(0, len(images), step):
        batch = np.ascontiguousarray(images[i : i + step], dtype=np.float32)
        request = grpcclient.InferInput(input_name, list(batch.shape), "FP32")
        request.set_data_from_numpy(batch)
        response = client.infer(model, [request], outputs=[grpcclient.InferRequestedOutput(n) for n in output_names])
        for name in output_names:
            results[name].append(response.as_numpy(name))
    return {name: np.concatenate(parts) for name, parts in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path, help="image files (any size: short side to 256, centre crop)")
    parser.add_argument("--url", default="localhost:8001", help="Triton gRPC address")
    parser.add_argument("--model", default="rpiae", help="the ensemble (PREFIX) or PREFIX_encode")
    parser.add_argument("--out", "-o", type=Path, default=Path("triton_out"), help="output folder")
    args = parser.parse_args(argv)

    import tritonclient.grpc as grpcclient

    from rpiae.imageio import load_images, save_image

    client = grpcclient.InferenceServerClient(url=args.url)
    if not client.is_server_live() or not client.is_model_ready(args.model):
        print(f"model {args.model!r} is not ready on {args.url}", file=sys.stderr)
        return 1
    images = load_images(args.images)
    outputs = infer(client, args.model, images)
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
