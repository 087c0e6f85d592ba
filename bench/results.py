"""Benchmark result files: one JSON per run (`format: rpiae-bench`), written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rpiae.fileio import atomic_file, read_json

FORMAT = "rpiae-bench"
FORMAT_VERSION = 1


def write_results(result: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
        tmp.chmod(0o644)
    return out


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(type(value), type(value).__name__)


def check_results(data: Any) -> str | None:
    """What makes `data` not a benchmark result the report can render, or None: the format tag,
    the `model`, `settings` and `machine` objects, and `rows` (objects naming graph, backend,
    precision, batch and status; those that ran with their `timing`)."""
    if not isinstance(data, dict):
        return f"the file holds {_kind(data)}, not an object"
    if data.get("format") != FORMAT:
        return f"format {data.get('format')!r}, expected {FORMAT!r}"
    for key, kind in (("model", dict), ("settings", dict), ("rows", list)):
        if not isinstance(data.get(key), kind):
            return f"{key!r} is {'missing' if key not in data else _kind(data[key])}, expected {_kind(kind())}"
    for key in ("machine", "peaks", "load_average", "real_photos"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            return f"{key!r} is {_kind(data[key])}, expected an object"
    for key in ("targets", "profiles", "accuracy"):
        if data.get(key) is not None and not isinstance(data[key], list):
            return f"{key!r} is {_kind(data[key])}, expected a list"
    for i, row in enumerate(data["rows"]):
        if not isinstance(row, dict):
            return f"rows[{i}] is {_kind(row)}, expected an object"
        missing = [k for k in ("graph", "backend", "precision", "batch", "status") if k not in row]
        if missing:
            return f"rows[{i}] has no {', '.join(missing)}"
        if row["status"] == "ok" and not isinstance(row.get("timing"), dict):
            return f"rows[{i}] ran (status ok) but has no timing object"
    return None


def load_results(path: str | Path) -> dict[str, Any]:
    """A result file, checked (`check_results`); ValueError, one line naming the file, otherwise."""
    p = Path(path)
    data = read_json(p, "an rpiae bench result")
    why = check_results(data)
    if why:
        raise ValueError(f"{p}: not an rpiae bench result: {why}")
    return data
