"""Export: ONNX graphs in FP32/FP16/INT8, bundles with manifests, parity against PyTorch."""

from rpiae.export.api import export_bundle, verify_bundle
from rpiae.export.bundle import Bundle, BundleError

__all__ = ["Bundle", "BundleError", "export_bundle", "verify_bundle"]
