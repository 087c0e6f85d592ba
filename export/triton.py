"""A Triton Inference Server model repository from an export bundle.

    OUT/
      <prefix>_encode/config.pbtxt  1/model.plan (tensorrt_plan), 1/model.onnx (onnxruntime_onnx)
                                  or 1/model.py + bundle/ (python)
      <prefix>_decode/config.pbtxt  1/...
      <prefix>/config.pbtxt         1/   ensemble: images -> encode -> latent -> decode -> image

`tensorrt_plan` serves the bundle's TensorRT engines (GPU instances; the server's TensorRT
must be the version the engines were built with, on the same compute capability; engines
built with `--version-compatible` also run on a later TensorRT, with the server started with
`--backend-config=tensorrt,version-compatible=true`, Triton's TensorRT-backend option for
them, which the summary lists under `server_args`);
`onnxruntime_onnx` serves the bundle's ONNX graph of the same precision, on CPU or GPU
instances, for users without TensorRT; `python` serves each graph as a Triton Python-backend
model (`model.py`, `rpiae.engines.triton_python`) that runs it through one of this project's
backends (ONNX Runtime by default), from a copy of the bundle's files for that backend and
precision inside the model's directory (`<model>/bundle/`, which Triton ignores: only
numbered subdirectories are versions); the Python environment that has rpiae installed is
recorded as the config's EXECUTION_ENV_PATH. A `python` repository is served by any Triton
with its Python backend, including the server in the `nvidia-pytriton` wheel, on a CPU.
Dynamic batching stays within the engine profile (max_batch_size = the profile's maximum).
Every config is built as Triton's own `ModelConfig` protobuf message (tritonclient), checked,
and written with protobuf's `text_format` before the repository is renamed into place.
"""

from __future__ import annotations

import importlib.resources
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from rpiae.export.bundle import Bundle, BundleError
from rpiae.export.backends import BACKENDS, BUNDLE_DEFAULT, backend_info, runnable
from rpiae.export.manifest import KIND_AOTI_PACKAGE, KIND_ONNX, KIND_TRT_ENGINE, WEIGHTS
from rpiae.export.targets import FILE_KIND_TARGET
from rpiae.export.spec import GRAPHS, graph_specs
from rpiae.fileio import atomic_dir
from rpiae.precisions import DEFAULT_ORDER, ONNX_PRECISIONS

PLATFORMS = {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx", "python": "python"}
MODEL_FILES = {"tensorrt_plan": "model.plan", "onnxruntime_onnx": "model.onnx", "python": "model.py"}
DEFAULT_PYTHON_BACKEND = BUNDLE_DEFAULT  # what python models run unless told (any registered backend can)
# the config parameters a python model needs (rpiae.engines.triton_python reads them)
PYTHON_PARAMETERS = ("rpiae_graph", "rpiae_backend", "rpiae_precision", "rpiae_bundle")
BUNDLE_DIR = "bundle"  # inside a python model's directory
PYTHON_MODEL = ("rpiae.engines", "triton_model.py")  # the package file copied as a python model's 1/model.py
# Triton's TensorRT backend loads version-compatible plans only with this server option
VERSION_COMPATIBLE_ARG = "--backend-config=tensorrt,version-compatible=true"
_ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 3: "TYPE_INT8", 6: "TYPE_INT32", 7: "TYPE_INT64"}


class TritonConfigError(ValueError):
    """A generated config.pbtxt that Triton's model-config protobuf rejects or that is inconsistent."""


def _pb():
    """(tritonclient's model_config_pb2, protobuf's text_format), or ImportError saying what to install."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise ImportError('Triton model configs need tritonclient: pip install "tritonclient[grpc]>=2.40,<3"') from None
    return model_config_pb2, text_format


Tensor = tuple[str, str, list[int]]  # (name, Triton data type such as TYPE_FP32, dims without the batch axis)


def _io(config, inputs: list[Tensor], outputs: list[Tensor]) -> None:
    pb, _ = _pb()
    for field, items in ((config.input, inputs), (config.output, outputs)):
        for name, data_type, dims in items:
            field.add(name=name, data_type=pb.DataType.Value(data_type), dims=[int(d) for d in dims])


def model_config(name: str, platform: str, max_batch_size: int, inputs: list[Tensor], outputs: list[Tensor],
                 instance_kind: str = "KIND_GPU", instance_count: int = 1, preferred_batch_sizes: list[int] | None = None,
                 max_queue_delay_us: int = 100, parameters: dict[str, str] | None = None):
    """Triton's `ModelConfig` message for one model. Dims exclude the batch axis (max_batch_size > 0).
    `python` models name the backend (`backend: "python"`) instead of a platform; `parameters`
    become the config's string parameters."""
    if platform not in MODEL_FILES:
        raise ValueError(f"unknown Triton platform {platform!r}; expected one of {', '.join(MODEL_FILES)}")
    if instance_kind not in ("KIND_GPU", "KIND_CPU"):
        raise ValueError(f"instance kind {instance_kind!r}: expected KIND_GPU or KIND_CPU")
    if platform == "tensorrt_plan" and instance_kind != "KIND_GPU":
        raise ValueError("a tensorrt_plan model runs on GPU instances only; use --platform onnxruntime for CPU")
    pb, _ = _pb()
    config = pb.ModelConfig(name=name, max_batch_size=int(max_batch_size))
    if platform == "python":
        config.backend = "python"
    else:
        config.platform = platform
    _io(config, inputs, outputs)
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = str(value)
    config.instance_group.add(count=int(instance_count), kind=pb.ModelInstanceGroup.Kind.Value(instance_kind))
    preferred = sorted({int(b) for b in (preferred_batch_sizes or []) if 1 <= int(b) <= max_batch_size})
    config.dynamic_batching.preferred_batch_size.extend(preferred)
    config.dynamic_batching.max_queue_delay_microseconds = int(max_queue_delay_us)
    return config


def ensemble_config(name: str, max_batch_size: int, steps: list[dict[str, Any]], inputs: list[Tensor],
                    outputs: list[Tensor]):
    """`ModelConfig` of an ensemble; each step is {"model": name, "input_map": {model_tensor: ensemble_tensor},
    "output_map": {model_tensor: ensemble_tensor}}."""
    pb, _ = _pb()
    config = pb.ModelConfig(name=name, platform="ensemble", max_batch_size=int(max_batch_size))
    _io(config, inputs, outputs)
    for s in steps:
        config.ensemble_scheduling.step.add(model_name=s["model"], model_version=-1, input_map=s["input_map"],
                                            output_map=s["output_map"])
    return config


def config_text(config, comment: list[str] | None = None) -> str:
    """config.pbtxt: `comment` lines, then the message in protobuf's text format."""
    _, text_format = _pb()
    return "".join(f"# {line}\n" for line in (comment or [])) + text_format.MessageToString(config)


def parse_config(text: str):
    """Parse config.pbtxt text into tritonclient's `ModelConfig` message (raises TritonConfigError)."""
    pb, text_format = _pb()
    config = pb.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise TritonConfigError(f"config.pbtxt does not parse as Triton's ModelConfig: {e}") from None
    return config


def check_repository(parsed: dict[str, Any]) -> dict[str, Any]:
    """Check what Triton would check of a repository's configs (model name -> `ModelConfig`):
    names, platforms, batch dims, and that every ensemble step and tensor is wired."""
    for name, c in parsed.items():
        if c.name != name:
            raise TritonConfigError(f"{name}/config.pbtxt names the model {c.name!r}")
        if c.platform not in (*MODEL_FILES, "ensemble") and not (c.backend == "python" and not c.platform):
            raise TritonConfigError(f"{name}: unexpected platform {c.platform or c.backend!r}")
        if c.backend == "python":
            missing = [k for k in PYTHON_PARAMETERS if not c.parameters[k].string_value]
            if missing:
                raise TritonConfigError(f"{name}: python model without the parameters {', '.join(missing)}")
        if c.max_batch_size < 1:
            raise TritonConfigError(f"{name}: max_batch_size must be >= 1 (batching models)")
        for t in (*c.input, *c.output):
            if not t.dims or any(d < 1 for d in t.dims):
                raise TritonConfigError(f"{name}: tensor {t.name} has dims {list(t.dims)} (no batch axis, all fixed)")
        if c.platform == "ensemble":
            available = {t.name for t in c.input}
            for step in c.ensemble_scheduling.step:
                if step.model_name not in parsed:
                    raise TritonConfigError(f"{name}: step model {step.model_name!r} is not in the repository")
                member = parsed[step.model_name]
                if member.max_batch_size < c.max_batch_size:
                    raise TritonConfigError(f"{name}: max_batch_size {c.max_batch_size} exceeds {step.model_name}'s")
                if set(step.input_map) != {t.name for t in member.input}:
                    raise TritonConfigError(f"{name}: step {step.model_name} maps inputs {sorted(step.input_map)}, "
                                            f"the model has {[t.name for t in member.input]}")
                missing = [v for v in step.input_map.values() if v not in available]
                if missing:
                    raise TritonConfigError(f"{name}: step {step.model_name} reads {missing} before anything writes them")
                unknown = [k for k in step.output_map if k not in {t.name for t in member.output}]
                if unknown:
                    raise TritonConfigError(f"{name}: step {step.model_name} has no outputs {unknown}")
                available |= set(step.output_map.values())
            missing = [t.name for t in c.output if t.name not in available]
            if missing:
                raise TritonConfigError(f"{name}: ensemble outputs {missing} are produced by no step")
    return parsed


# -- the repository ---------------------------------------------------------------------------
def _io_types(onnx_path: Path) -> dict[str, tuple[str, str, list[int]]]:
    """{"input"/"output": (name, Triton type, dims without batch)} of a graph, read from its ONNX."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    out = {}
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        if len(values) != 1:
            raise BundleError(f"{onnx_path}: expected one {kind}, found {len(values)}")
        v = values[0]
        elem = v.type.tensor_type.elem_type
        if elem not in _ONNX_TYPES:
            raise BundleError(f"{onnx_path}: {kind} {v.name} has ONNX element type {elem}, which Triton configs here do not map")
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim][1:]
        out[kind] = (v.name, _ONNX_TYPES[elem], dims)
    return out


def _python_precisions(bundle: Bundle, backend: str) -> list[str]:
    """What a python model can run with `backend` from this bundle's files."""
    info = backend_info(backend)
    if info.from_weights:
        return list(info.precisions) if WEIGHTS in bundle.files else []
    return runnable(backend, bundle.precisions(info.runs))


def choose(bundle: Bundle, platform: str = "auto", precision: str | None = None,
           instance_kind: str = "auto", backend: str = DEFAULT_PYTHON_BACKEND) -> tuple[str, str]:
    """(Triton platform, precision): `auto` serves TensorRT engines when the bundle has them.
    Without a precision: fp16 first on GPUs, fp32 first on CPUs (where the fp16 graphs of
    ONNX Runtime run slower than fp32). `backend` is what python models run."""
    if platform == "auto":
        engines = bundle.precisions(KIND_TRT_ENGINE)
        platform = "tensorrt" if (engines if precision is None else precision in engines) else "onnxruntime"
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; choose auto, tensorrt, onnxruntime or python")
    if platform == "python":
        have = _python_precisions(bundle, backend)
    else:
        have = bundle.precisions(KIND_TRT_ENGINE if platform == "tensorrt" else KIND_ONNX)
    if precision is None:
        cpu = platform in ("onnxruntime", "python") and instance_kind in ("auto", "cpu")
        order = DEFAULT_ORDER["cpu" if cpu else "gpu"]
        precision = next((p for p in order if p in have), None)
    if precision is None or precision not in have:
        kind = backend_info(backend).runs if platform == "python" else KIND_TRT_ENGINE if platform == "tensorrt" else KIND_ONNX
        what = {KIND_TRT_ENGINE: "TensorRT engines", KIND_ONNX: "ONNX graphs", KIND_AOTI_PACKAGE: "AOTInductor packages"}.get(
            kind, "weights")
        hint = _missing_hint(bundle, platform, precision, kind, backend, instance_kind)
        raise BundleError(f"bundle {bundle.root} has no {precision or ''} {what}"
                          f" (has: {', '.join(have) or 'none'}); {hint}")
    return platform, precision


def _missing_hint(bundle: Bundle, platform: str, precision: str | None, kind: str, backend: str,
                  instance_kind: str) -> str:
    """What to do when the bundle lacks the files of `precision` for `platform`: only advice the
    export can follow (it writes ONNX graphs of ONNX_PRECISIONS; AOTInductor packages are FP32)."""
    target = FILE_KIND_TARGET.get(kind)
    if target is None:
        return "re-export the bundle (it lacks model.safetensors)"
    if platform == "python":
        runs = backend_info(backend).precisions
        if precision is not None and precision not in runs:
            return f"the {backend} backend runs {', '.join(runs)} only; ask for one of those or another --backend"
    if precision is not None and precision not in ONNX_PRECISIONS:
        runners = [b for b in BACKENDS if precision in backend_info(b).precisions]
        serve = f"serve it with --platform python --backend {' or '.join(runners)}, or " if runners else ""
        return f"{precision} is a runtime precision (no exported file has it): {serve}pick {', '.join(ONNX_PRECISIONS)}"
    if kind == KIND_ONNX:
        return f"re-export with --precision {precision}" if precision else "re-export the bundle"
    if kind == KIND_AOTI_PACKAGE:
        device = "cuda" if instance_kind == "gpu" else "cpu"
        return f"build them with `rpiae export --target {target} --device {device} --out {bundle.root}` (FP32 only)"
    return f"build them with `rpiae export --target {target} --precision {precision or 'fp16'} --out {bundle.root}`"


def _engine_model(bundle: Bundle, graph: str, precision: str, max_batch: int | None) -> dict[str, Any]:
    """What serving one graph's TensorRT engine takes: its file, batch limits, comment, server args."""
    name = bundle.find(graph, precision, KIND_TRT_ENGINE)
    facts = bundle.files[name].facts
    prof = facts.profile
    if prof["min"] > 1:
        raise ValueError(f"{name}: its profile starts at batch {prof['min']} and Triton sends batches from 1; "
                         f"rebuild with --batch 1:{prof['opt']}:{prof['max']}")
    batch_max = prof["max"] if max_batch is None else max_batch
    if batch_max > prof["max"]:
        raise ValueError(f"--max-batch {batch_max} exceeds the engine profile's maximum {prof['max']} ({name})")
    built = (f"TensorRT {facts.tensorrt} engine for compute capability {facts.compute_capability} ({facts.gpu}), "
             f"profile {prof['min']}:{prof['opt']}:{prof['max']}")
    if facts.version_compatible:
        note = (f"version-compatible {built}: serve it with a Triton whose TensorRT is {facts.tensorrt} or later, "
                f"started with {VERSION_COMPATIBLE_ARG}, on a GPU of that compute capability")
    else:
        note = f"{built}: serve it with a Triton whose TensorRT is {facts.tensorrt}, on a GPU of that compute capability"
    return {"files": [(bundle.verify_file(name), MODEL_FILES["tensorrt_plan"])], "batch_max": batch_max,
            "preferred": [prof["opt"], batch_max], "comment": note,
            "server_args": [VERSION_COMPATIBLE_ARG] if facts.version_compatible else []}


def _onnx_model(bundle: Bundle, graph: str, precision: str, max_batch: int | None) -> dict[str, Any]:
    """What serving one graph's ONNX file takes (with its external data, which keeps its file
    name: the ONNX file refers to it by that name)."""
    onnx_name = bundle.find(graph, precision, KIND_ONNX)
    deps = bundle.files[onnx_name].external_data
    batch_max = max_batch or 32
    files = [(bundle.graph_path(graph, precision), MODEL_FILES["onnxruntime_onnx"])]
    return {"files": files + [(bundle.verify_file(d), Path(d).name) for d in deps], "batch_max": batch_max,
            "preferred": [min(8, batch_max), batch_max], "comment": None, "server_args": []}


def _aoti_package(bundle: Bundle, graph: str, precision: str, device: str) -> tuple[str, Any]:
    """(name, manifest entry) of the bundle's AOTInductor package of a graph for a device type."""
    from rpiae.export.aoti import bundle_packages

    found = bundle_packages(bundle, device, precision).get(graph)
    if found is not None:
        return found
    raise BundleError(f"bundle {bundle.root} has no {precision} AOTInductor {graph} package for {device}; "
                      f"run `rpiae export --target aoti --device {device} --out {bundle.root}`")


def _python_files(bundle: Bundle, backend: str, graph: str, precision: str, device: str) -> list[str]:
    """The bundle files a python model of `graph` needs to run it with `backend`."""
    info = backend_info(backend)
    if info.from_weights:
        return [WEIGHTS]
    if info.runs == KIND_AOTI_PACKAGE:  # one package per device type
        return [_aoti_package(bundle, graph, precision, device)[0]]
    name = bundle.find(graph, info.file_precision(precision), info.runs)
    if name is None:
        raise BundleError(f"bundle {bundle.root} has no {precision} {graph} file for the {backend} backend")
    return [name]


def _python_model(bundle: Bundle, graph: str, precision: str, max_batch: int | None, backend: str,
                  kind: str, python_env: str | None, threads: int | None,
                  options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What serving one graph as a python model takes: its parameters and bundle files."""
    info = backend_info(backend)
    if "cpu" not in info.devices and kind != "KIND_GPU":
        raise ValueError(f"the {backend} backend runs on GPU instances only; use --backend ort for CPU")
    device = "cuda" if kind == "KIND_GPU" else "cpu"
    limit = None  # the batch limit of files built for a batch range
    if info.runs == KIND_TRT_ENGINE:
        limit = bundle.files[bundle.find(graph, precision, KIND_TRT_ENGINE)].facts.profile["max"]
    elif info.runs == KIND_AOTI_PACKAGE:
        limit = _aoti_package(bundle, graph, precision, device)[1].facts.batch["max"]
    batch_max = max_batch or min(32, limit or 32)
    if limit is not None and batch_max > limit:
        raise ValueError(f"--max-batch {batch_max} exceeds the {backend} {graph} file's maximum batch {limit}")
    params = {"rpiae_graph": graph, "rpiae_backend": backend, "rpiae_precision": precision, "rpiae_bundle": BUNDLE_DIR}
    if threads:
        params["rpiae_threads"] = str(threads)
    if options:
        info.check_options(options)
        params["rpiae_options"] = json.dumps(options, sort_keys=True)
    if python_env:
        params["EXECUTION_ENV_PATH"] = python_env
    return {"bundle_files": _python_files(bundle, backend, graph, precision, device), "batch_max": batch_max,
            "preferred": [min(8, batch_max), batch_max], "parameters": params,
            "comment": f"python model: the {backend} backend runs {BUNDLE_DIR}/ (a copy of the bundle's files for it)"
                       + (f"; rpiae is imported from the Python environment {python_env}" if python_env else ""),
            "server_args": []}


def default_python_env() -> str | None:
    """The virtual environment this process runs in (None for a system Python: the server's
    own Python must then have rpiae installed)."""
    return sys.prefix if sys.prefix != sys.base_prefix else None


def write_model_repository(
    bundle: Bundle | str | Path, out: str | Path, precision: str | None = None, platform: str = "auto",
    instance_kind: str = "auto", instances: int = 1, max_batch: int | None = None, prefix: str = "rpiae",
    max_queue_delay_us: int = 100, overwrite: bool = False, backend: str = DEFAULT_PYTHON_BACKEND, python_env: str | None = "auto",
    threads: int | None = None, options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a Triton model repository for `bundle` at `out` (atomically). Returns a summary.

    python models only: `backend` runs each graph, `python_env` is the environment with rpiae
    installed ("auto": this process's virtual environment; None: the server's Python),
    `threads` the intra-op threads per instance, `options` the backend's keyword options
    (`rpiae.engines.backend_options`), kept as JSON in the config's `rpiae_options`."""
    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    platform, precision = choose(bundle, platform, precision, instance_kind, backend)
    triton_platform = PLATFORMS[platform]
    kind = {"auto": "KIND_GPU" if platform == "tensorrt" else "KIND_CPU", "gpu": "KIND_GPU", "cpu": "KIND_CPU"}.get(instance_kind)
    if kind is None:
        raise ValueError(f"instance kind {instance_kind!r}: expected auto, gpu or cpu")
    if python_env == "auto":
        python_env = default_python_env() if platform == "python" else None
    names = {g: f"{prefix}_{g}" for g in GRAPHS}
    configs, comments, files, subsets, io, server_args = {}, {}, {}, {}, {}, []
    for graph in GRAPHS:
        if platform == "python":
            # a python model takes float32 whatever the precision (the backend casts): names and
            # shapes come from the model config
            spec = graph_specs(bundle.config)[graph]
            io[graph] = {"input": (spec.input_name, "TYPE_FP32", list(spec.input_shape)),
                         "output": (spec.output_name, "TYPE_FP32", list(spec.output_shape))}
            served = _python_model(bundle, graph, precision, max_batch, backend, kind, python_env, threads, options)
            files[graph], subsets[graph] = [], served["bundle_files"]
        else:
            onnx_precision = precision if platform == "onnxruntime" else _engine_onnx_precision(bundle, graph, precision)
            io[graph] = _io_types(bundle.graph_path(graph, onnx_precision))
            served = (_engine_model if platform == "tensorrt" else _onnx_model)(bundle, graph, precision, max_batch)
            files[graph] = served["files"]
        server_args = served["server_args"] or server_args
        comments[names[graph]] = [f"rpiae {graph} graph, model {bundle.config.name}, precision {precision}, "
                                  f"from bundle {bundle.root}"] + ([served["comment"]] if served["comment"] else [])
        configs[names[graph]] = model_config(names[graph], triton_platform, served["batch_max"], [io[graph]["input"]],
                                             [io[graph]["output"]], kind, instances, served["preferred"], max_queue_delay_us,
                                             served.get("parameters"))
    latent, image_in, image_out = io["encode"]["output"], io["encode"]["input"], io["decode"]["output"]
    if latent[0] != io["decode"]["input"][0]:
        raise BundleError(f"encode output {latent[0]!r} and decode input {io['decode']['input'][0]!r} differ")
    steps = [
        {"model": names["encode"], "input_map": {image_in[0]: image_in[0]}, "output_map": {latent[0]: latent[0]}},
        {"model": names["decode"], "input_map": {latent[0]: latent[0]}, "output_map": {image_out[0]: image_out[0]}},
    ]
    batch = min(c.max_batch_size for c in configs.values())
    configs[prefix] = ensemble_config(prefix, batch, steps, [image_in], [latent, image_out])
    comments[prefix] = [f"rpiae round trip: {image_in[0]} -> {names['encode']} -> {latent[0]} -> {names['decode']} "
                        f"-> {image_out[0]}"]
    check_repository(configs)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for model, config in configs.items():
            (tmp / model / "1").mkdir(parents=True)
            (tmp / model / "config.pbtxt").write_text(config_text(config, comments[model]))
        for graph, pairs in files.items():
            for src, dst in pairs:
                shutil.copyfile(src, tmp / names[graph] / "1" / dst)
        for graph, subset in subsets.items():
            text = importlib.resources.files(PYTHON_MODEL[0]).joinpath(PYTHON_MODEL[1]).read_text()
            (tmp / names[graph] / "1" / MODEL_FILES["python"]).write_text(text)
            bundle.write_subset(tmp / names[graph] / BUNDLE_DIR, subset)
    return {"repository": str(out), "platform": triton_platform, "precision": precision,
            "backend": backend if platform == "python" else None, "python_env": python_env,
            "models": {**{names[g]: triton_platform for g in GRAPHS}, prefix: "ensemble"},
            "instance_kind": kind, "max_batch_size": {m: c.max_batch_size for m, c in configs.items()},
            "inputs": {prefix: image_in[0]}, "outputs": {prefix: [latent[0], image_out[0]]}, "server_args": server_args}


def _engine_onnx_precision(bundle: Bundle, graph: str, precision: str) -> str:
    """The precision of the ONNX graph an engine was built from (for its I/O names and types)."""
    name = bundle.find(graph, precision, KIND_TRT_ENGINE)
    if name is None:
        raise BundleError(f"bundle {bundle.root} has no {precision} TensorRT {graph} engine")
    src = bundle.files[name].get("onnx")
    return bundle.files[src]["precision"] if src in bundle.files else precision


__all__ = ["DEFAULT_PYTHON_BACKEND", "PLATFORMS", "PYTHON_PARAMETERS", "default_python_env", "TritonConfigError", "check_repository", "choose", "config_text", "ensemble_config",
           "model_config", "parse_config", "write_model_repository"]
