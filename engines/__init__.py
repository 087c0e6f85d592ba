"""Runtimes behind one interface (`rpiae.engines.base.Backend`).

`load_backend(model, backend, precision, device)` opens a checkpoint or an export bundle
with the named backend: `torch` (eager PyTorch), `ort` (ONNX Runtime), `trt` (TensorRT),
`aoti` (AOTInductor packages), `torch-trt` (the PyTorch graphs compiled by Torch-TensorRT;
from a checkpoint or a bundle's weights).
"""

from __future__ import annotations

from pathlib import Path

from rpiae.engines.base import Backend, BackendUnavailable, InputError

BACKENDS = ("torch", "ort", "trt", "aoti", "torch-trt")
FROM_WEIGHTS = ("torch", "torch-trt")  # backends that also open a checkpoint


def _factories():
    # imported lazily: each runtime is optional
    def weights(source):
        from rpiae.model import RPiAE

        return RPiAE.from_checkpoint(source.weights_path() if not isinstance(source, Path) else source)

    def torch_backend(source, precision, device, **kw):
        from rpiae.engines.torch_backend import TorchBackend

        return TorchBackend(weights(source), precision=precision, device=device, **kw)

    def torch_trt_backend(source, precision, device, **kw):
        from rpiae.engines.torch_trt_backend import TorchTRTBackend, import_torch_tensorrt

        import_torch_tensorrt()  # before the weights are read: a missing runtime fails first
        return TorchTRTBackend(weights(source), precision=precision, device=device, **kw)

    def ort_backend(bundle, precision, device, **kw):
        from rpiae.engines.ort_backend import ORTBackend

        return ORTBackend(bundle, precision=precision, device=device, **kw)

    def trt_backend(bundle, precision, device, **kw):
        from rpiae.engines.trt_backend import TRTBackend

        return TRTBackend(bundle, precision=precision, device=device, **kw)

    def aoti_backend(bundle, precision, device, **kw):
        from rpiae.engines.aoti_backend import AOTIBackend

        return AOTIBackend(bundle, precision=precision, device=device, **kw)

    return {"torch": torch_backend, "ort": ort_backend, "trt": trt_backend, "aoti": aoti_backend,
            "torch-trt": torch_trt_backend}


def resolve_model(model: str | Path | None) -> Path:
    """A checkpoint file or bundle directory; None means the project's shipped checkpoint."""
    if model is None:
        from rpiae.assets import default_checkpoint

        return default_checkpoint()
    p = Path(model)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such checkpoint or bundle")
    return p


def load_backend(
    model: str | Path | None = None, backend: str = "torch", precision: str = "fp32", device: str = "cpu", **kwargs
) -> Backend:
    """Open `model` (checkpoint or bundle) with `backend`. Errors are one-line exceptions."""
    from rpiae.export.bundle import Bundle

    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    path = resolve_model(model)
    if Bundle.is_bundle(path):
        source = Bundle.open(path)
    elif path.is_dir():
        raise BackendUnavailable(f"{path}: a directory without manifest.json is not an export bundle")
    elif backend not in FROM_WEIGHTS:
        raise BackendUnavailable(
            f"backend {backend!r} runs an export bundle, and {path} is a checkpoint: "
            f"run `rpiae export --checkpoint {path} --out BUNDLE` first"
        )
    else:
        source = path
    return open_backend(source, backend, precision, device, **kwargs)


def open_backend(source, backend: str, precision: str = "fp32", device: str = "cpu", **kwargs) -> Backend:
    """Open an already-resolved source (a `Bundle`, or a checkpoint `Path` for torch) with `backend`."""
    return _factories()[backend](source, precision, device, **kwargs)


__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "InputError", "load_backend", "open_backend", "resolve_model"]
