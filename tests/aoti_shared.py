"""One AOTInductor-packaged bundle per test session, shared by test_aoti.py and
test_cpp_runner.py (compiling is the expensive step: it is done once, with Inductor's
cache and temporary files inside the session's tmp directory).

The bundle is made from the shipped checkpoint when it exists, else from the seeded random
tiny model of conftest.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rpiae.export.profile import BatchProfile

PROFILE = BatchProfile(1, 2, 8)
_CACHE: dict[str, object] = {}
TIMINGS: dict[str, float] = {}


def source_checkpoint(tmp_root: Path) -> Path:
    from rpiae.assets import DEFAULT_CHECKPOINT

    if DEFAULT_CHECKPOINT.is_file():
        return DEFAULT_CHECKPOINT
    from tests.conftest import make_tiny

    path = tmp_root / "tiny.safetensors"
    if not path.exists():
        make_tiny().save(path)
    return path


def aoti_cache_dir(tmp_path_factory) -> Path:
    if "cache" not in _CACHE:
        _CACHE["cache"] = tmp_path_factory.mktemp("rpiae-cache")
    return _CACHE["cache"]  # type: ignore[return-value]


def aoti_bundle(tmp_path_factory):
    """(bundle, cache_dir): an ONNX fp32 bundle with CPU AOTInductor packages (batch 1..8)."""
    if "bundle" not in _CACHE:
        from rpiae.export import export_bundle
        from rpiae.export.aoti import package_bundle

        root = tmp_path_factory.mktemp("aoti")
        cache = aoti_cache_dir(tmp_path_factory)
        t0 = time.perf_counter()
        bundle = export_bundle(source_checkpoint(root), root / "bundle", precisions="fp32", progress=False)
        t1 = time.perf_counter()
        saved = os.environ.get("RPIAE_CACHE_DIR")
        os.environ["RPIAE_CACHE_DIR"] = str(cache)  # the backends opened by the parity check use it too
        try:
            package_bundle(bundle, device="cpu", profile=PROFILE, progress=False)
        finally:
            if saved is None:
                os.environ.pop("RPIAE_CACHE_DIR", None)
            else:
                os.environ["RPIAE_CACHE_DIR"] = saved
        TIMINGS.update(onnx_export_s=t1 - t0, aoti_package_s=time.perf_counter() - t1)
        _CACHE["bundle"] = bundle
    return _CACHE["bundle"], _CACHE["cache"]
