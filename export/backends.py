"""The runtimes, declared once: what each backend runs, in which precisions, on which devices.

Every layer that names backends reads this registry: `rpiae.engines` opens them (importing
`runner` only then), the CLI offers them, the benchmark skips what a backend cannot run, the
Triton python platform and parity checks find the bundle files each one needs. It lives in
`export` because that is the lowest layer that knows the bundle's file kinds; nothing here
imports a runtime.

Adding a runtime: its module under `engines/` (a `Backend` subclass) and one entry below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rpiae.export.manifest import KIND_AOTI_PACKAGE, KIND_ONNX, KIND_TRT_ENGINE, KIND_WEIGHTS
from rpiae.export.spec import ONNX_PRECISIONS, TORCH_PRECISIONS


@dataclass(frozen=True)
class BackendInfo:
    name: str
    runner: str  # "module:Class" of its `rpiae.engines.base.Backend`, imported when it is opened
    runs: str  # the bundle file kind it runs (KIND_WEIGHTS: the model's weights, also from a checkpoint)
    precisions: tuple[str, ...]  # what it can be asked to run
    devices: tuple[str, ...]  # device kinds of `rpiae.devices` it takes (cpu, cuda, trt)
    install: str  # what provides it
    summary: str
    options: tuple[str, ...] = ()  # keyword options of its constructor beyond precision, device, max_batch, graphs
    # precisions it runs from another precision's files (OpenVINO's bf16: the FP32 graph with a bf16 hint)
    files_of: dict[str, str] = field(default_factory=dict, hash=False)
    # what it needs on this machine, per device kind and per precision that needs more (names of
    # `REQUIREMENTS`; `rpiae doctor` says, for each, whether this machine has it)
    requires: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    precision_requires: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    # named variants, another way to run it that is compared under a name of its own (benchmark and
    # eval rows): name -> (the precisions it runs, None for all of its own; the options it is opened with)
    variants: dict[str, tuple[tuple[str, ...] | None, dict]] = field(default_factory=dict, hash=False)

    def check_options(self, keys) -> None:
        """ValueError (one line, naming what it takes) unless every key is one of its `options`."""
        unknown = [k for k in keys if k not in self.options]
        if unknown:
            takes = f"it takes {', '.join(self.options)}" if self.options else "it takes none"
            raise ValueError(f"{self.name} backend has no option {', '.join(unknown)} ({takes})")

    def file_precision(self, precision: str) -> str:
        """The precision of the bundle files it runs `precision` from (its own, or `files_of`'s)."""
        return self.files_of.get(precision, precision)

    @property
    def from_weights(self) -> bool:
        """Runs a checkpoint (or a bundle's weights) rather than files exported for it."""
        return self.runs == KIND_WEIGHTS


REFERENCE = "torch"  # the backend every other one is compared with (eager PyTorch, fp32)
# what runs a bundle's ONNX graphs unless told: the onnx export target's check, `rpiae verify`,
# Triton python models, a plain `rpiae bench`'s second row
BUNDLE_DEFAULT = "ort"

# what a backend can need on a machine (`BackendInfo.requires`): `rpiae doctor` probes each one
REQUIREMENTS = {
    "gpu": "a CUDA GPU visible to torch",
    "ort-cpu": "ONNX Runtime's CPU provider", "ort-cuda": "ONNX Runtime's CUDA provider, proven to start",
    "ort-trt": "ONNX Runtime's TensorRT provider, proven to start",
    "tensorrt": "the TensorRT Python package", "polygraphy": "polygraphy", "torch-tensorrt": "Torch-TensorRT",
    "openvino": "OpenVINO", "openvino-bf16": "a CPU OpenVINO computes bf16 on (AMX or AVX512-BF16)",
    "compiler": "a C++ compiler on PATH", "cpu-level": "the CPU level AOTInductor packages are compiled for",
    "cuda-toolkit": "the CUDA toolkit (nvcc and headers)",
}

REGISTRY: dict[str, BackendInfo] = {b.name: b for b in (
    BackendInfo("torch", "rpiae.engines.torch_backend:TorchBackend", KIND_WEIGHTS, TORCH_PRECISIONS, ("cpu", "cuda"),
                "torch", "eager PyTorch (autocast for fp16/bf16)", ("compile",), requires={"cuda": ("gpu",)},
                variants={"torch-compile": (None, {"compile": True})}),
    BackendInfo("ort", "rpiae.engines.ort_backend:ORTBackend", KIND_ONNX, ONNX_PRECISIONS, ("cpu", "cuda", "trt"),
                "pip install -e '.[cpu]' (CPU) or the gpu-cu13 / gpu-cu12 extra", "ONNX Runtime on the bundle's ONNX graphs",
                ("threads", "spinning", "io_binding", "allow_fallback", "exact_int8", "mem_pattern", "op_profiling", "profile"),
                requires={"cpu": ("ort-cpu",), "cuda": ("ort-cuda", "gpu"), "trt": ("ort-trt", "gpu", "tensorrt")}),
    BackendInfo("trt", "rpiae.engines.trt_backend:TRTBackend", KIND_TRT_ENGINE, ONNX_PRECISIONS,
                ("cuda",), "pip install -c constraints/gpu-cu13.txt -e '.[gpu-cu13]'", "TensorRT engines of the bundle",
                requires={"cuda": ("tensorrt", "polygraphy", "gpu")}),
    BackendInfo("aoti", "rpiae.engines.aoti_backend:AOTIBackend", KIND_AOTI_PACKAGE, ("fp32",), ("cpu", "cuda"),
                "torch (and a C++ compiler to build the packages)", "AOTInductor packages of the bundle", ("cache_dir",),
                requires={"cpu": ("compiler", "cpu-level"), "cuda": ("gpu", "compiler", "cuda-toolkit")}),
    BackendInfo("openvino", "rpiae.engines.openvino_backend:OpenVINOBackend", KIND_ONNX, ("fp32", "bf16", "int8"), ("cpu",),
                "pip install -e '.[openvino]'", "OpenVINO on the bundle's ONNX graphs (bf16: its inference hint, on CPUs with bf16)",
                ("threads", "hint", "op_profiling", "int8_rest"), files_of={"bf16": "fp32"}, requires={"cpu": ("openvino",)},
                precision_requires={"bf16": ("openvino-bf16",)},
                variants={"openvino-int8-bf16": (("int8",), {"int8_rest": "bf16"})}),
    BackendInfo("torch-trt", "rpiae.engines.torch_trt_backend:TorchTRTBackend", KIND_WEIGHTS, TORCH_PRECISIONS, ("cuda",),
                "pip install -c constraints/gpu-cu13.txt -e '.[gpu-cu13]'", "the PyTorch graphs compiled by Torch-TensorRT", ("profile",),
                requires={"cuda": ("torch-tensorrt", "gpu")}),
)}
BACKENDS = tuple(REGISTRY)
# every named variant: name -> (the backend it runs, its options, the precisions it runs or None for all)
VARIANTS: dict[str, tuple[str, dict, tuple[str, ...] | None]] = {
    name: (info.name, options, precisions) for info in REGISTRY.values() for name, (precisions, options) in info.variants.items()
}
# what a comparison (rpiae bench, rpiae eval) can list: the backends, each followed by its variants
RUNTIMES = tuple(n for b in BACKENDS for n in (b, *REGISTRY[b].variants))


def backend_info(name: str) -> BackendInfo:
    """The registry entry of a backend; ValueError naming the choices for anything else."""
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return REGISTRY[name]


def variant(name: str) -> tuple[str, dict, tuple[str, ...] | None]:
    """(the registered backend, its options, the precisions it runs or None for all of the
    backend's) of a runtime name: a variant's, or a plain backend's (no options)."""
    return VARIANTS.get(name, (name, {}, None))


def runnable(name: str, have: list[str] | tuple[str, ...]) -> list[str]:
    """The precisions backend `name` can run from a bundle whose files of its kind come in the
    precisions `have` (a backend that runs weights: all of its own)."""
    info = backend_info(name)
    if info.from_weights:
        return list(info.precisions)
    return [p for p in info.precisions if info.file_precision(p) in have]


__all__ = ["BACKENDS", "BUNDLE_DEFAULT", "REFERENCE", "REGISTRY", "REQUIREMENTS", "RUNTIMES", "VARIANTS", "BackendInfo",
           "backend_info", "runnable", "variant"]
