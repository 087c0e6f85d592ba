"""Runtimes behind one interface (`rpiae.engines.base.Backend`).

`load_backend(model, backend, precision, device)` opens a checkpoint or an export bundle
with a backend of the registry (`rpiae.export.backends`: what each one runs, in which
precisions, on which devices, and the class that implements it).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rpiae.engines.base import Backend, BackendUnavailable, InputError, PrecisionUnsupported, check_graphs
from rpiae.export.backends import BACKENDS, REGISTRY, backend_info
from rpiae.export.bundle import model_info
from rpiae.export.spec import GRAPHS
from rpiae.hub import resolve_model

FROM_WEIGHTS = tuple(n for n, b in REGISTRY.items() if b.from_weights)  # also open a checkpoint


def backend_class(name: str) -> type[Backend]:
    """The Backend class of a registered backend (its module imported now: runtimes are optional)."""
    module, _, cls = backend_info(name).runner.partition(":")
    return getattr(importlib.import_module(module), cls)


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
POSITIVE_OPTIONS = ("threads",)  # options that count something: at least 1 (as --threads)


def _option_value(backend: str, key: str, text: str, parameter: inspect.Parameter) -> Any:
    """`text` as the type of `parameter` (its annotation, else its default's type): bool, int,
    float or str; ValueError naming the option otherwise."""
    note = str(parameter.annotation) if parameter.annotation is not inspect.Parameter.empty else ""
    kinds = [k for k in ("bool", "int", "float", "str") if k in note.replace("|", " ").split()]
    if not kinds and parameter.default is not None and parameter.default is not inspect.Parameter.empty:
        kinds = [type(parameter.default).__name__]
    if "bool" in kinds:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"{backend} option {key}: expected true or false, got {text!r}")
    for kind, convert in (("int", int), ("float", float)):
        if kind in kinds:
            try:
                return convert(text)
            except ValueError:
                raise ValueError(f"{backend} option {key}: expected {'an integer' if kind == 'int' else 'a number'}, "
                                 f"got {text!r}") from None
    if "str" in kinds:
        return text
    raise ValueError(f"{backend} option {key} cannot be given as text")


def split_options(pairs: Iterable[str]) -> dict[str, str]:
    """KEY=VALUE strings (`--backend-option`) as {KEY: VALUE}; ValueError for one without '='."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"backend option {pair!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def backend_options(backend: str, options: dict[str, str], accepted_only: bool = False) -> dict[str, Any]:
    """Text options (`split_options`) as the keyword options of `backend`'s class, each converted
    to its constructor parameter's type. Every key must be one of the backend's registry
    `options` (with `accepted_only`, the others are left out: one option list for several
    backends). ValueError, one line, for anything else."""
    info = backend_info(backend)
    if not accepted_only:
        info.check_options(options)
    cls = backend_class(backend)
    parameters = inspect.signature(cls.__init__).parameters
    out = {k: _option_value(backend, k, v, parameters[k]) for k, v in options.items() if k in info.options}
    choices = getattr(cls, "option_choices", {})  # text options with a fixed vocabulary (OpenVINO's hint, ...)
    for key, value in out.items():
        if key in choices and value not in choices[key]:
            raise ValueError(f"{backend} option {key}: expected {' or '.join(choices[key])}, got {value!r}")
        if key in POSITIVE_OPTIONS and value is not None and value < 1:
            raise ValueError(f"{backend} option {key}: expected an integer >= 1, got {value!r}")
    return out


def _weights(source, latent_stats=None, graphs=GRAPHS):
    """The model of a checkpoint or bundle, holding only the modules of `graphs`."""
    from rpiae.model import RPiAE

    model = RPiAE.from_checkpoint(source.weights_path() if not isinstance(source, Path) else source)
    model.keep_graphs(check_graphs(graphs))
    if latent_stats is not None and isinstance(source, Path):
        from rpiae.checkpoints import read_latent_stats

        model.set_latent_stats(*read_latent_stats(latent_stats))
    return model


def check_bundle_latent_stats(bundle, latent_stats: str | Path | None) -> None:
    """A bundle's graphs carry the latent statistics they were exported with: `latent_stats`
    may only name those (same sha256), never add or replace them."""
    from rpiae.fileio import sha256_file

    if latent_stats is None:
        return
    baked = bundle.manifest.latent_stats
    digest = sha256_file(latent_stats)
    if baked is None:
        raise BackendUnavailable(
            f"bundle {bundle.root} was exported without latent statistics; export it with --latent-stats {latent_stats}"
        )
    if baked["sha256"] != digest:
        raise BackendUnavailable(
            f"bundle {bundle.root} was exported with other latent statistics ({baked['file']}); "
            f"export it again with --latent-stats {latent_stats}"
        )


def load_backend(
    model: str | Path | None = None, backend: str = "torch", precision: str = "fp32", device: str = "cpu",
    latent_stats: str | Path | None = None, **kwargs
) -> Backend:
    """Open `model` (checkpoint or bundle) with `backend`. Errors are one-line exceptions.

    `latent_stats` (a statistics file of `rpiae extract`, or the RPiAE authors' `.pt`) makes a
    checkpoint's latent normalised; a bundle already carries its statistics in its graphs."""
    from rpiae.export.bundle import Bundle
    from rpiae.hub import is_hub_layout

    if latent_stats is not None and not Path(latent_stats).is_file():
        raise FileNotFoundError(f"{latent_stats}: no such latent statistics file")
    if backend not in REGISTRY:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    path = resolve_model(model)
    if Bundle.is_bundle(path):
        source = Bundle.open(path)
        check_bundle_latent_stats(source, latent_stats)
        latent_stats = None
    elif path.is_dir() and not is_hub_layout(path):
        raise BackendUnavailable(f"{path}: a directory without manifest.json is not an export bundle")
    elif backend not in FROM_WEIGHTS:
        raise BackendUnavailable(
            f"backend {backend!r} runs an export bundle, and {path} is a checkpoint: "
            f"run `rpiae export --checkpoint {path} --out BUNDLE` first"
        )
    else:
        source = path
    if latent_stats is not None:
        kwargs["latent_stats"] = latent_stats
    return open_backend(source, backend, precision, device, **kwargs)


def open_backend(source, backend: str, precision: str = "fp32", device: str = "cpu", **kwargs) -> Backend:
    """Open an already-resolved source (a `Bundle`, or a checkpoint `Path` for a backend that
    runs weights) with `backend`."""
    cls = backend_class(backend)
    cls.check_precision(precision)  # before anything is read: eval and bench skip the pair on this
    cls.require()  # a missing runtime fails before the weights are read
    opened_from = source
    if backend_info(backend).from_weights:
        source = _weights(source, kwargs.pop("latent_stats", None), kwargs.get("graphs", GRAPHS))
    be = cls(source, precision=precision, device=device, **kwargs)
    be.opened_from = opened_from  # what `model_info` describes without opening it again
    be.options = {k: v for k, v in kwargs.items() if k in backend_info(backend).options}
    return be


__all__ = [
    "BACKENDS", "FROM_WEIGHTS", "Backend", "BackendUnavailable", "InputError", "PrecisionUnsupported", "backend_class",
    "backend_options", "load_backend", "model_info", "open_backend", "resolve_model", "split_options",
]
