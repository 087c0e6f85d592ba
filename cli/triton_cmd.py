"""`rpiae triton`: a Triton Inference Server model repository from an export bundle."""

from __future__ import annotations

from pathlib import Path

import click

from rpiae.cli.common import PRECISIONS, friendly_errors


@click.command()
@click.option("--model", "-m", type=click.Path(path_type=Path), required=True, help="Export bundle directory.")
@click.option("--precision", "-p", type=click.Choice(PRECISIONS), default=None,
              help="Which precision to serve (default, among what the bundle has: fp16 first on GPUs, "
              "fp32 first for ONNX Runtime on CPUs).")
@click.option("--platform", type=click.Choice(["auto", "tensorrt", "onnxruntime"]), default="auto", show_default=True,
              help="tensorrt: the bundle's TensorRT engines (tensorrt_plan, GPU); onnxruntime: its ONNX graphs "
              "(onnxruntime_onnx, CPU or GPU, no TensorRT needed); auto: engines when the bundle has them.")
@click.option("--instance-kind", type=click.Choice(["auto", "gpu", "cpu"]), default="auto", show_default=True,
              help="Triton instance group kind (auto: gpu for tensorrt, cpu for onnxruntime).")
@click.option("--instances", type=click.IntRange(1), default=1, show_default=True, help="Instances per model.")
@click.option("--max-batch", type=click.IntRange(1), default=None,
              help="max_batch_size (default: the engine profile's maximum; 32 for onnxruntime).")
@click.option("--max-queue-delay-us", type=click.IntRange(0), default=100, show_default=True,
              help="Dynamic batcher: how long a request may wait for others to batch with.")
@click.option("--prefix", default="rpiae", show_default=True,
              help="Model names: PREFIX_encode, PREFIX_decode and the ensemble PREFIX.")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Model repository directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing directory at --out.")
@friendly_errors
def triton(model, precision, platform, instance_kind, instances, max_batch, max_queue_delay_us, prefix, out, overwrite):
    """Write a Triton model repository: encoder, decoder and an image -> latent -> image ensemble.

    Every config.pbtxt is parsed with Triton's model-config protobuf before anything is
    written; the repository is built in a hidden directory and renamed when complete.
    """
    from rpiae.export.triton import write_model_repository

    summary = write_model_repository(model, out, precision=precision, platform=platform, instance_kind=instance_kind,
                                     instances=instances, max_batch=max_batch, prefix=prefix,
                                     max_queue_delay_us=max_queue_delay_us, overwrite=overwrite)
    click.echo(f"model repository {out}: {summary['platform']} {summary['precision']}, "
               f"{summary['instance_kind']} instances; configs checked with Triton's ModelConfig protobuf")
    for name, kind in summary["models"].items():
        click.echo(f"  {name:24} {kind:18} max_batch_size {summary['max_batch_size'][name]}")
    click.echo(f"serve:  tritonserver --model-repository {out.resolve()}"
               + "".join(f" {arg}" for arg in summary.get("server_args", [])))
    click.echo(f"query:  python examples/triton_client.py --model {prefix} IMAGE...")
