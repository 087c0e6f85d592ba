"""Verification: the layer above the runtimes. It opens backends (`rpiae.engines`) on what
`rpiae.export` built and measures them against PyTorch FP32 (`parity`) or against the FP32 ONNX
graph with polygraphy's Comparator (`polygraphy`), and it holds the exports that record that
proof in their manifest (`export_bundle`, `package_bundle`)."""

from rpiae.verify.export import export_bundle, export_target, package_bundle
from rpiae.verify.parity import TOLERANCES, verify_bundle

__all__ = ["TOLERANCES", "export_bundle", "export_target", "package_bundle", "verify_bundle"]
