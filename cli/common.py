"""Shared CLI plumbing: one-line errors and documented exit codes.

Exit codes: 0 success; 1 error (bad input, missing file, unavailable backend);
2 usage error (click); 3 a parity/accuracy check failed; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Iterator
from typing import Any, Callable

import click

from rpiae.data import STREAM_BATCH  # images per backend call when --batch-size is not given
from rpiae.export.backends import BACKENDS, REFERENCE, REGISTRY
from rpiae.export.spec import PRECISIONS
from rpiae.imageio import CROPS, DEFAULT_CROP

EXIT_ERROR, EXIT_USAGE, EXIT_CHECK_FAILED = 1, 2, 3


class CheckFailed(click.ClickException):
    exit_code = EXIT_CHECK_FAILED


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


def friendly_errors(fn: Callable) -> Callable:
    """Turn expected failures into `Error: <one line>` and exit 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.Abort, click.exceptions.Exit):
            raise
        except KeyboardInterrupt:
            click.echo("Interrupted: nothing half-written was left behind.", err=True)
            sys.exit(130)
        except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError, ImportError) as e:
            raise click.ClickException(_one_line(e)) from None

    return wrapper


def parse_int_list(value: str, what: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{what}: expected comma-separated integers, got {value!r}") from None
    if not items or any(i < 1 for i in items):
        raise click.BadParameter(f"{what}: expected positive integers, got {value!r}")
    return items


def check_writable(*paths: Any) -> None:
    """Refuse, before any work, an output file that cannot be written: its folder (or the
    nearest existing folder above, where the write would create the rest) must be a writable
    directory, and the file no directory. One line `cannot write FILE: why` (exit 1)."""
    from pathlib import Path

    for p in paths:
        if p is None:
            continue
        p = Path(p)
        if p.is_dir():
            raise click.ClickException(f"cannot write {p}: it is a directory")
        folder = p.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise click.ClickException(f"cannot write {p}: {folder} is not a directory")
        import tempfile

        try:  # a real file (removed at once): permissions alone say nothing for root, /proc, read-only mounts
            fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=folder)
        except OSError as e:
            raise click.ClickException(f"cannot write {p}: {_one_line(e)}") from None
        os.close(fd)
        os.unlink(probe)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


model_option = click.option(
    "--model", "-m", "model", type=click.Path(path_type=str), default=None,
    help="Export bundle directory, checkpoint file (.safetensors of ours, or the authors' .pt), or a Hugging Face "
    "Hub model (hf://owner/name[@revision], e.g. hf://qihoo360/RPiAE; cached, HF_HUB_OFFLINE=1 for the cache only). "
    "Default: the project's shipped small checkpoint.",
)
backend_option = click.option(
    "--backend", "-b", type=click.Choice(BACKENDS), default=REFERENCE, show_default=True,
    help="Runtime: " + "; ".join(f"{b.name}: {b.summary}" for b in REGISTRY.values()) + " (those that run a bundle's "
    "files need a bundle).",
)
precision_option = click.option(
    "--precision", "-p", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
    help="Which precision variant of the graphs to run (torch: fp32/fp16/bf16 autocast).",
)
def check_device(ctx, param, value: str | None) -> str | None:
    """Click callback: a device string (`rpiae.devices.cuda_index`'s forms), else a usage error."""
    if value is None:
        return value
    from rpiae.devices import cuda_index

    try:
        cuda_index(value)
    except RuntimeError as e:
        raise click.BadParameter(_one_line(e)) from None
    return value


def names_callback(allowed: tuple[str, ...], what: str = "name", parse: Callable | None = None) -> Callable:
    """Click callback: comma-separated names from `allowed` (lower-cased, in the order given,
    without repeats), or None for None; a usage error naming the option otherwise. `parse(value)`
    (raising ValueError) replaces the check where the vocabulary has its own parser."""

    def callback(ctx, param, value):
        if value is None:
            return None
        if parse is not None:
            try:
                return parse(value)
            except ValueError as e:
                raise click.BadParameter(_one_line(e)) from None
        return parse_names(value, allowed, what, lower=True)

    return callback


def parse_names(value: str, allowed: tuple[str, ...], what: str = "name", option: str | None = None,
                lower: bool = False) -> list[str]:
    """Comma-separated names from `allowed` (in the order given, without repeats; lower-cased
    first with `lower`); a usage error (naming `option` where no click callback does) otherwise."""
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    if lower:
        items = [v.lower() for v in items]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise click.BadParameter(f"unknown {what} {', '.join(bad) or '(none)'}; choose from: {', '.join(allowed)}",
                                 param_hint=option)
    return list(dict.fromkeys(items))


device_option = click.option(
    "--device", "-d", default="cpu", show_default=True, callback=check_device,
    help="cpu, cuda (or cuda:N); for --backend ort also trt or trt:N (ONNX Runtime's TensorRT provider on GPU N).",
)


def _split_options(ctx, param, pairs: tuple[str, ...]) -> dict[str, str]:
    from rpiae.engines import split_options

    try:
        return split_options(pairs)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


backend_options_option = click.option(
    "--backend-option", "-O", "backend_option", multiple=True, metavar="KEY=VALUE", callback=_split_options,
    help="An option of the backend, repeatable (true/false for switches): "
    + "; ".join(f"{b.name}: {', '.join(o for o in b.options if o != 'profile')}" for b in REGISTRY.values()
                if [o for o in b.options if o != "profile"])
    + ". For example -O threads=4 (CPU threads), -O int8_rest=bf16 (OpenVINO int8: its element-wise work in bf16), "
    "-O hint=throughput (OpenVINO), -O compile=true (torch.compile).",
)


def parse_backend_options(backend: str | list[str], raw: dict[str, str]) -> dict[str, Any] | dict[str, dict[str, Any]]:
    """--backend-option values as `backend`'s keyword options (a list of backends: {backend:
    options}, each KEY going to the backends that take it, and to at least one); usage errors."""
    from rpiae.engines import backend_options
    from rpiae.export.backends import variant

    try:
        if isinstance(backend, str):
            return backend_options(variant(backend)[0], raw)
        out = {b: backend_options(variant(b)[0], raw, accepted_only=True) for b in backend}
        unused = [k for k in raw if not any(k in o for o in out.values())]
        if unused:
            raise ValueError(f"none of {', '.join(backend)} takes option {', '.join(unused)}")
        return out
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--backend-option") from None


allow_fallback_option = click.option(
    "--allow-fallback", is_flag=True,
    help="ONNX Runtime: run even when the asked provider fails to initialise and ONNX Runtime falls back to another "
    "(default: refuse, naming the provider and why). Same as RPIAE_ALLOW_FALLBACK=1, which encode/decode read.",
)


@contextlib.contextmanager
def fallback_allowed(flag: bool) -> Iterator[None]:
    """Let ONNX Runtime sessions opened inside the block (in this process and in the
    benchmark's row processes, which inherit the environment) run after a provider fallback."""
    from rpiae.engines.ort_backend import ALLOW_FALLBACK_ENV
    from rpiae.host import environ

    with environ(**({ALLOW_FALLBACK_ENV: "1"} if flag else {})):
        yield
def batch_option(default: int):
    return click.option(
        "--batch-size", type=click.IntRange(1), default=None,
        help=f"Images (or latents) per backend call (default {default}); the backend splits a batch above its own "
             "limit (a TensorRT engine's or AOTInductor package's largest batch).",
    )


batch_size_option = batch_option(STREAM_BATCH)


latent_stats_option = click.option(
    "--latent-stats", type=click.Path(path_type=str), default=None,
    help="Normalise latents per element with these statistics (stats/latents_stats.safetensors of `rpiae extract`, "
    "or its normalization_stats.pt in the RPiAE authors' {'mean','var'} format): encode gives (z - mean) / sqrt(var + 1e-5), decode undoes it. "
    "With a bundle, only the statistics it was exported with.",
)
crop_option = click.option(
    "--crop", type=click.Choice(CROPS), default=DEFAULT_CROP, show_default=True,
    help="Image preprocessing: adm = the RPiAE authors' (PIL RGB, ADM center_crop_arr to 256); "
    "torch-aa = EXIF rotation, alpha over white, 16-bit aware, torch antialiased bicubic, centre crop.",
)
workers_option = click.option(
    "--workers", type=click.IntRange(0), default=min(4, os.cpu_count() or 1), show_default=True,
    help="DataLoader processes that read, decode and crop images (0: in the main process; default: 4, "
    "or the number of CPUs if fewer).",
)


def runtime_options(fn: Callable) -> Callable:
    """--model/--backend/--backend-option/--precision/--device/--batch-size/--latent-stats,
    shared by encode, decode and extract."""
    options = (model_option, backend_option, backend_options_option, precision_option, device_option, batch_size_option,
               latent_stats_option)
    for option in reversed(options):
        fn = option(fn)
    return fn
