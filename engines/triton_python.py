"""One graph of an export bundle as a Triton Python-backend model.

`rpiae triton --platform python` writes, per graph, a `model.py` (a copy of
`rpiae/engines/triton_model.py`, a few lines) whose `TritonPythonModel` hands everything to
`GraphModel` here. The model's `config.pbtxt` says what to run, in its parameters:

    rpiae_graph      encode | decode
    rpiae_backend    a registered backend (rpiae.export.backends) the bundle has files for
    rpiae_precision  fp32 | fp16 | int8 | bf16
    rpiae_bundle     the bundle, relative to the model's directory (or absolute)
    rpiae_threads    intra-op threads per instance (optional; empty: the runtime's default)
    rpiae_options    the backend's keyword options as a JSON object (optional: `--backend-option`)

so the tensor names, shapes and batch limit in the config (built from the model config)
and what the instance runs come from one file. Tensors cross the Python backend by DLPack
(no copy, and no dependence on the numpy the server's stub was built with). Each request of
a batch Triton formed is checked on its own: a bad one (NaN/Inf, pixels outside [0, 1])
gets its error and the others are answered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rpiae.engines.base import InputError
from rpiae.export.backends import backend_info
from rpiae.export.spec import GRAPHS, graph_spec
from rpiae.export.triton import PYTHON_PARAMETERS


def parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """The parameters of a model config (Triton's JSON form); those rpiae needs must be set."""
    params = {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}
    missing = [k for k in PYTHON_PARAMETERS if not params.get(k)]
    if missing:
        raise ValueError(f"model {model_config.get('name')!r}: config.pbtxt lacks the parameters {', '.join(missing)}")
    return params


def instance_device(backend: str, kind: str, device_id: int | str) -> str:
    """The device string of rpiae's backends for a Triton instance (KIND_CPU / KIND_GPU)."""
    if str(kind).upper() in ("GPU", "KIND_GPU"):
        return f"cuda:{int(device_id)}"
    if "cpu" not in backend_info(backend).devices:
        raise ValueError(f"the {backend} backend runs on GPU instances only (instance_group kind KIND_GPU)")
    return "cpu"


class GraphModel:
    """What a Triton model instance runs: one graph of a bundle through an rpiae backend.

    `args` is the dict Triton passes to `TritonPythonModel.initialize` (model_config as JSON
    text, model_repository, model_instance_kind, model_instance_device_id)."""

    def __init__(self, args: dict[str, Any]) -> None:
        from rpiae.engines import load_backend

        config = json.loads(args["model_config"])
        params = parameters(config)
        self.graph = params["rpiae_graph"]
        if self.graph not in GRAPHS:
            raise ValueError(f"rpiae_graph is {self.graph!r}: expected one of {', '.join(GRAPHS)}")
        bundle = Path(params["rpiae_bundle"])
        if not bundle.is_absolute():
            bundle = Path(args["model_repository"]) / bundle
        device = instance_device(params["rpiae_backend"], args.get("model_instance_kind", "CPU"),
                                 args.get("model_instance_device_id", 0))
        accepts = backend_info(params["rpiae_backend"]).options
        options: dict[str, Any] = {"graphs": (self.graph,)}
        if "spinning" in accepts:
            options["spinning"] = False  # a server's instances share the cores: idle threads must not spin
        if params.get("rpiae_threads"):
            if "threads" in accepts:
                options["threads"] = int(params["rpiae_threads"])
            else:
                torch.set_num_threads(int(params["rpiae_threads"]))
        options.update(json.loads(params.get("rpiae_options") or "{}"))
        self.backend = load_backend(bundle, params["rpiae_backend"], params["rpiae_precision"], device, **options)
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self._run = self.backend.graph_call(self.graph)
        self.spec = graph_spec(self.backend.config, self.graph)

    def check(self, x: torch.Tensor) -> None:
        """InputError for an input this graph must not run: wrong shape or dtype, NaN/Inf, and
        for images, values outside [0, 1]."""
        self.backend.check(self.graph, x, self.spec.input_range)  # one pass over x

    @torch.inference_mode()
    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor | Exception]:
        """Each request's output (float32, contiguous, on the CPU) or its one-line error: an
        `InputError` for a request that must not run (the client's fault; retrying cannot help), a
        `RuntimeError` when the runtime failed. The good requests run as one batch, in order."""
        results: list[torch.Tensor | Exception] = [RuntimeError("not run")] * len(inputs)
        good: list[int] = []
        for i, x in enumerate(inputs):
            try:
                self.check(x)
                good.append(i)
            except InputError as e:
                results[i] = e
        if not good:
            return results
        batch = [inputs[i] for i in good]
        try:
            out = self._run(batch[0] if len(batch) == 1 else torch.cat(batch))
        except Exception as e:  # noqa: BLE001 - every request of the batch gets the runtime's reason
            message = " ".join(f"{type(e).__name__}: {e}".split())[:500]
            for i in good:
                results[i] = RuntimeError(f"rpiae {self.graph} failed: {message}")
            return results
        out = out.float().cpu()
        for i, part in zip(good, torch.split(out, [len(x) for x in batch])):
            results[i] = part.contiguous()
        return results

    def close(self) -> None:
        self.backend.close()


__all__ = ["GraphModel", "instance_device", "parameters"]
