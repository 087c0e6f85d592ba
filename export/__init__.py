"""Export: the graphs and their contract (`spec`, `manifest`), ONNX graphs in FP32/FP16/INT8,
graph checks, bundles, and the builders of TensorRT engines, AOTInductor packages and Triton
repositories. Nothing here runs a runtime: measuring parity is `rpiae.verify`'s job."""

from rpiae.export.build import build_bundle
from rpiae.export.bundle import Bundle, BundleError

__all__ = ["Bundle", "BundleError", "build_bundle"]
