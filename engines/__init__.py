"""Runtimes behind one interface (`rpiae.engines.base.Backend`).

`load_backend(model, backend, precision, device)` opens a checkpoint or an export bundle
with a backend of the registry (`rpiae.export.backends`: what each one runs, in which
precisions, on which devices, and the class that implements it).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from rpiae.engines.base import Backend, BackendUnavailable, InputError, PrecisionUnsupported
from rpiae.export.backends import BACKENDS, REGISTRY, backend_info
from rpiae.export.bundle import model_info
from rpiae.hub import resolve_model

FROM_WEIGHTS = tuple(n for n, b in REGISTRY.items() if b.from_weights)  # also open a checkpoint


def backend_class(name: str) -> type[Backend]:
    """The Backend class of a registered backend (its module imported now: runtimes are optional)."""
    module, _, cls = backend_info(name).runner.partition(":")
    return getattr(importlib.import_module(module), cls)


def _weights(source, latent_stats=None):
    from rpiae.model import RPiAE

    model = RPiAE.from_checkpoint(source.weights_path() if not isinstance(source, Path) else source)
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
        source = _weights(source, kwargs.pop("latent_stats", None))
    be = cls(source, precision=precision, device=device, **kwargs)
    be.opened_from = opened_from  # what `model_info` describes without opening it again
    return be


__all__ = [
    "BACKENDS", "FROM_WEIGHTS", "Backend", "BackendUnavailable", "InputError", "PrecisionUnsupported", "backend_class",
    "load_backend", "model_info", "open_backend", "resolve_model",
]
