"""Triton Python-backend model of rpiae (written by `rpiae triton --platform python`).

Runs one graph of the export bundle named in config.pbtxt through rpiae's backends; see
`rpiae.engines.triton_python`. Needs rpiae in the model's Python environment (the
EXECUTION_ENV_PATH parameter of config.pbtxt, or the server's own Python).
"""

import torch
import triton_python_backend_utils as pb_utils

from rpiae.engines.base import InputError
from rpiae.engines.triton_python import GraphModel



def _error(e):
    """A bad request is INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT: clients do not retry it), a
    failed runtime INTERNAL. pb_utils gets TritonError from the stub once the model runs, not at
    import; its error codes exist since Triton 23.x."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if isinstance(e, InputError) else "INTERNAL", None)
    return pb_utils.TritonError(str(e)) if code is None else pb_utils.TritonError(str(e), code)


class TritonPythonModel:
    def initialize(self, args):
        self.model = GraphModel(args)

    def execute(self, requests):
        inputs = [torch.from_dlpack(pb_utils.get_input_tensor_by_name(r, self.model.input_name).to_dlpack())
                  for r in requests]
        responses = []
        for result in self.model.run(inputs):
            if isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(error=_error(result)))
            else:
                tensor = pb_utils.Tensor.from_dlpack(self.model.output_name, torch.utils.dlpack.to_dlpack(result))
                responses.append(pb_utils.InferenceResponse([tensor]))
        return responses

    def finalize(self):
        self.model.close()
