"""Benchmark result files: one JSON per run (`format: rpiae-bench`), written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rpiae.fileio import atomic_file

FORMAT = "rpiae-bench"
FORMAT_VERSION = 1


def write_results(result: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
        tmp.chmod(0o644)
    return out


def load_results(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if data.get("format") != FORMAT:
        raise ValueError(f"{p}: not an rpiae bench result (format {data.get('format')!r})")
    return data
