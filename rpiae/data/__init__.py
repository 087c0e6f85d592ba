"""Dataset-scale jobs: streaming sources, latent shards with exact statistics, decoding.

- `sources.open_source`: a folder, ImageFolder tree, `.txt` list or WebDataset shards.
- `extract.extract`: images -> latent shards + statistics + manifest, resumable, by rank.
- `decode.decode_latents`: latents -> PNGs (+ the ADM `.npz`), streaming, resumable.
- `latents.LatentFile`: `.npy`/`.npz`/`.safetensors`/extract directories, batch by batch.
- `evaluate.evaluate`: reconstruction quality (PSNR/SSIM/LPIPS/rFID) of several runtimes and precisions.
"""

STREAM_BATCH = 32  # images or latents per backend call in the dataset jobs, unless --batch-size says otherwise
# `rpiae eval` holds every variant's backend at once and its peak memory follows the batch's
# activations (tiny model, torch + ort fp32, 200 images: 1.8 GB at 32, 0.86 GB at 8, same time)
EVAL_BATCH = 8


def image_size(model: dict | None, backend: object = None) -> int:
    """The side images are cropped to: the model config's (`model` as `rpiae.engines.model_info`
    gives it), else the opened backend's, else the default config's."""
    from rpiae.config import RPiAEConfig

    config = (model or {}).get("config")
    if config:
        return int(config["image_size"])
    opened = getattr(backend, "config", None)
    return int(opened.image_size) if opened is not None else RPiAEConfig().image_size
