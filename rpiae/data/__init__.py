"""Dataset-scale jobs: streaming sources, latent shards with exact statistics, decoding.

- `sources.open_source`: a folder, ImageFolder tree, `.txt` list or WebDataset shards.
- `extract.extract`: images -> latent shards + statistics + manifest, resumable, by rank.
- `decode.decode_latents`: latents -> PNGs (+ the ADM `.npz`), streaming, resumable.
- `latents.LatentFile`: `.npy`/`.npz`/`.safetensors`/extract directories, batch by batch.
- `evaluate.evaluate`: reconstruction quality (PSNR/SSIM/LPIPS/rFID) of several runtimes and precisions.
"""

STREAM_BATCH = 32  # images or latents per backend call in the dataset jobs, unless --batch-size says otherwise
