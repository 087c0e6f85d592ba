"""Where compilers and loaders may write: one directory the user controls.

`cache_dir=`, else `$RPIAE_CACHE_DIR`, else `$XDG_CACHE_HOME/rpiae` (`~/.cache/rpiae`), with
`inductor/` (TORCHINDUCTOR_CACHE_DIR), `triton/` (TRITON_CACHE_DIR) and `tmp/` (TMPDIR, also
where AOTInductor packages are unpacked); ONNX Runtime's TensorRT provider keeps the engines
of a read-only bundle under `ort-trt/`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rpiae.host import environ


def default_cache_dir() -> Path:
    if os.environ.get("RPIAE_CACHE_DIR"):
        return Path(os.environ["RPIAE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rpiae"


@contextlib.contextmanager
def compiler_workdir(cache_dir: str | Path | None = None) -> Iterator[Path]:
    """Point Inductor's cache, Triton's cache and every temporary file into `cache_dir`."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = root.expanduser().resolve()
    dirs = {"TORCHINDUCTOR_CACHE_DIR": root / "inductor", "TRITON_CACHE_DIR": root / "triton", "TMPDIR": root / "tmp"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    changed = any(os.environ.get(k) != str(v) for k, v in dirs.items())
    saved_tempdir = tempfile.tempdir
    with environ(**{k: str(v) for k, v in dirs.items()}):
        tempfile.tempdir = str(dirs["TMPDIR"])
        if changed:
            _clear_inductor_caches()
        try:
            yield root
        finally:
            tempfile.tempdir = saved_tempdir
            if changed:
                _clear_inductor_caches()


def _clear_inductor_caches() -> None:
    # Inductor keeps in-memory caches that remember the previous cache directory
    try:
        from torch._inductor.utils import clear_caches

        clear_caches()
    except Exception:  # pragma: no cover - best effort across torch versions
        pass
