"""One AOTInductor-packaged bundle per test session, shared by test_aoti.py and
test_cpp_runner.py (compiling is the expensive step: it is done once, with Inductor's
cache and temporary files inside the session's tmp directory).

The bundle is made from the shipped checkpoint when it exists, else from the seeded random
tiny model of conftest.py.
"""

from __future__ import annotations

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
    """(bundle, cache_dir): an fp32 bundle with CPU AOTInductor packages (batch 1..8), made
    with the user's command `rpiae export --target aoti --device cpu --batch 1:2:8`."""
    if "bundle" not in _CACHE:
        from click.testing import CliRunner

        from rpiae.cli.main import main
        from rpiae.export import Bundle

        root = tmp_path_factory.mktemp("aoti")
        cache = aoti_cache_dir(tmp_path_factory)
        out = root / "bundle"
        args = ["export", "--checkpoint", str(source_checkpoint(root)), "--target", "aoti", "--device", "cpu",
                "--batch", str(PROFILE), "--out", str(out)]
        t0 = time.perf_counter()
        # RPIAE_CACHE_DIR: the compiler cache, temporary files and unpacked packages stay in the session's tmp
        res = CliRunner().invoke(main, args, env={"RPIAE_CACHE_DIR": str(cache)})
        TIMINGS["export_aoti_s"] = time.perf_counter() - t0
        assert res.exit_code == 0, f"rpiae {' '.join(args)} failed:\n{res.output}\n{res.exception!r}"
        _CACHE["bundle"] = Bundle.open(out)
        _CACHE["export_output"] = res.output
    return _CACHE["bundle"], _CACHE["cache"]
