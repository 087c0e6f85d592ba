"""`rpiae triton`: a Triton Inference Server model repository from an export bundle;
`rpiae serve`: run Triton on one."""

from __future__ import annotations

from pathlib import Path

import click

from rpiae.cli.common import PRECISIONS, backend_options_option, friendly_errors, parse_backend_options
from rpiae.export.backends import BACKENDS, REGISTRY
from rpiae.export.triton import DEFAULT_PYTHON_BACKEND


def _check_prefix(ctx, param, value: str) -> str:
    """--prefix names three model folders of the repository (PREFIX, PREFIX_encode, PREFIX_decode):
    a plain folder name, no path, no whitespace."""
    if not value:
        raise click.BadParameter("must not be empty (it names the models: PREFIX, PREFIX_encode, PREFIX_decode)")
    bad = next((c for c in value if c in "/\\" or c.isspace() or not c.isprintable()), None)
    if bad is not None:
        raise click.BadParameter(f"{value!r} is not a plain model name (it holds {bad!r}); use letters, digits, "
                                 "'_', '-' and '.'")
    if value.startswith("."):
        raise click.BadParameter(f"{value!r} is not a plain model name (it starts with '.')")
    return value


def _check_python_env(ctx, param, value: Path | None) -> Path | None:
    """--python-env: a Python environment folder (with bin/python) or a conda-pack .tar.gz archive."""
    if value is None:
        return None
    if not value.exists():
        raise click.BadParameter(f"{value} does not exist")
    if value.is_dir():
        if not any((value / "bin" / exe).exists() for exe in ("python", "python3")):
            raise click.BadParameter(f"{value} is a folder without bin/python: not a Python environment")
        return value
    if not value.name.endswith(".tar.gz"):
        raise click.BadParameter(f"{value} is neither a Python environment folder nor a conda-pack .tar.gz archive")
    try:
        with open(value, "rb") as f:
            magic = f.read(2)
    except OSError as e:
        raise click.BadParameter(f"cannot read {value}: {e.strerror or e}") from None
    if magic != b"\x1f\x8b":
        raise click.BadParameter(f"{value} is not a gzip archive (conda-pack writes .tar.gz)")
    return value


@click.command()
@click.option("--model", "-m", type=click.Path(path_type=Path), required=True, help="Export bundle directory.")
@click.option("--precision", "-p", type=click.Choice(PRECISIONS), default=None,
              help="Which precision to serve (default, among what the bundle has: fp16 first on GPUs, "
              "fp32 first for ONNX Runtime on CPUs).")
@click.option("--platform", type=click.Choice(["auto", "tensorrt", "onnxruntime", "python"]), default="auto",
              show_default=True,
              help="tensorrt: the bundle's TensorRT engines (tensorrt_plan, GPU); onnxruntime: its ONNX graphs "
              "(onnxruntime_onnx, CPU or GPU, no TensorRT needed); python: Python-backend models that run the "
              "graphs with --backend (any Triton with its Python backend, e.g. on a CPU machine); auto: engines "
              "when the bundle has them, else onnxruntime.")
@click.option("--backend", type=click.Choice(BACKENDS), default=DEFAULT_PYTHON_BACKEND, show_default=True,
              help="--platform python: what runs each graph: "
              + "; ".join(f"{b.name}: {b.summary} ({', '.join(b.devices)})" for b in REGISTRY.values()) + ".")
@click.option("--python-env", type=click.Path(path_type=Path), default=None, callback=_check_python_env,
              help="--platform python: the Python environment (a directory, or a conda-pack .tar.gz) in which the "
              "server runs the models; it must have rpiae installed (default: this command's virtual environment; "
              "none when it runs outside one: the server's own Python).")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="--platform python: intra-op threads per model instance (default: the runtime's).")
@backend_options_option
@click.option("--instance-kind", type=click.Choice(["auto", "gpu", "cpu"]), default="auto", show_default=True,
              help="Triton instance group kind (auto: gpu for tensorrt, cpu for onnxruntime).")
@click.option("--instances", type=click.IntRange(1), default=1, show_default=True, help="Instances per model.")
@click.option("--max-batch", type=click.IntRange(1), default=None,
              help="max_batch_size (default: the engine profile's maximum; 32 for onnxruntime).")
@click.option("--max-queue-delay-us", type=click.IntRange(0), default=100, show_default=True,
              help="Dynamic batcher: how long a request may wait for others to batch with.")
@click.option("--prefix", default="rpiae", show_default=True, callback=_check_prefix,
              help="Model names: PREFIX_encode, PREFIX_decode and the ensemble PREFIX.")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Model repository directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing directory at --out.")
@friendly_errors
def triton(model, precision, platform, backend, python_env, threads, backend_option, instance_kind, instances, max_batch,
           max_queue_delay_us, prefix, out, overwrite):
    """Write a Triton model repository: encoder, decoder and an image -> latent -> image ensemble.

    Every config.pbtxt is parsed with Triton's model-config protobuf before anything is
    written; the repository is built in a hidden directory and renamed when complete.
    """
    from rpiae.export.triton import write_model_repository

    if platform != "python" and (backend != DEFAULT_PYTHON_BACKEND or python_env or threads or backend_option):
        raise click.UsageError("--backend, --backend-option, --python-env and --threads apply to --platform python")
    options = parse_backend_options(backend, backend_option)
    summary = write_model_repository(model, out, precision=precision, platform=platform, instance_kind=instance_kind,
                                     instances=instances, max_batch=max_batch, prefix=prefix,
                                     max_queue_delay_us=max_queue_delay_us, overwrite=overwrite, backend=backend,
                                     python_env=str(python_env.resolve()) if python_env else "auto", threads=threads,
                                     options=options)
    runs = f" ({summary['backend']} backend)" if summary["backend"] else ""
    click.echo(f"model repository {out}: {summary['platform']}{runs} {summary['precision']}, "
               f"{summary['instance_kind']} instances; configs checked with Triton's ModelConfig protobuf")
    for name, kind in summary["models"].items():
        click.echo(f"  {name:24} {kind:18} max_batch_size {summary['max_batch_size'][name]}")
    if summary["platform"] == "python":
        click.echo(f"python: {summary['python_env'] or 'the server’s own Python'} (must have rpiae installed)")
        click.echo(f"serve:  rpiae serve {out}          (or: tritonserver --model-repository {out.resolve()})")
    else:
        click.echo(f"serve:  tritonserver --model-repository {out.resolve()}"
                   + "".join(f" {arg}" for arg in summary.get("server_args", [])))
    click.echo(f"query:  python examples/triton_client.py --model {prefix} IMAGE...")


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("repository", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="HTTP/REST port.")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True, help="gRPC port.")
@click.option("--log", "log_path", type=click.Path(path_type=Path), default=None,
              help="Write the server's log to this file (default: the terminal).")
@click.option("--watchdog/--no-watchdog", default=True, show_default=True,
              help="Reload a Python-backend model whose stub process died (Triton itself keeps failing its "
              "requests with 'Stub process ... is not healthy'); runs the server with "
              "--model-control-mode=explicit --load-model=*.")
@click.option("--ready-timeout", type=click.FloatRange(1), default=600, show_default=True,
              help="Seconds to wait for the server to load every model.")
@click.argument("server_args", nargs=-1, type=click.UNPROCESSED)
@friendly_errors
def serve(repository, http_port, grpc_port, log_path, watchdog, ready_timeout, server_args):
    """Run Triton Inference Server on REPOSITORY until interrupted (Ctrl-C stops it).

    The server is the binary named by RPIAE_TRITONSERVER (its backends: RPIAE_TRITON_BACKENDS,
    or the backends folder beside its bin folder), else the one in the nvidia-pytriton wheel
    (Python backend only: it serves repositories written with --platform python, on a CPU
    too). Arguments after `--` go to tritonserver unchanged. Exit status: the server's, 1 when
    it cannot start, 130 on Ctrl-C.
    """
    import signal

    from rpiae.engines.triton_server import TritonServer

    def terminate(signum, frame):  # `kill` / `docker stop`: stop the server (its own process group) too
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)

    def report(line: str) -> None:
        click.echo(f"rpiae serve: {line}", err=True)

    server = TritonServer(repository, http_port=http_port, grpc_port=grpc_port, log_path=log_path,
                          extra_args=list(server_args), ready_timeout=ready_timeout, watchdog=watchdog,
                          inherit_output=True, report=report)
    try:
        server.start()
        click.echo(" ".join(server.command), err=True)
        click.echo(f"rpiae serve: ready, HTTP {server.http_url}, gRPC {server.grpc_url} ({server.install.describe()})",
                   err=True)
        code = server.process.wait()
    finally:  # Ctrl-C, SIGTERM or the server's exit: the whole process group goes
        server.close()
    raise SystemExit(code)
