"""Where each run of a sweep stands, read from its folder alone (no Ray, no bookkeeping server).

A run folder is *done* when ``results.json`` holds every task, *failed* when ``error.json`` is
there (written by the run, or by the driver when the worker died), *partial* when it has some
tasks, *pending* otherwise. Values are read leniently: ``NaN`` and ``null`` are both accepted
wherever the package writes a float.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

ERROR_FILE = "error.json"
SWEEP_FILE = "sweep.json"


def read_json_lenient(path: Path) -> Any:
    """JSON that may hold ``NaN`` (older results) or ``null`` (strict writers)."""
    return json.loads(Path(path).read_text())


def run_state(run_dir: Path) -> dict:
    """{"state": done|failed|partial|pending, "stages": n, "num_tasks": T, "error": {...}}."""
    run_dir = Path(run_dir)
    out: dict[str, Any] = {"state": "pending", "stages": 0, "num_tasks": None}
    res = run_dir / "results.json"
    if res.is_file():
        try:
            results = read_json_lenient(res)
            out["stages"] = len(results.get("stages") or [])
            out["num_tasks"] = results.get("num_tasks")
        except (OSError, ValueError):
            out["state"] = "failed"
            out["error"] = {"error": "unreadable results.json", "message": str(res)}
            return out
        if out["num_tasks"] and out["stages"] >= out["num_tasks"]:
            out["state"] = "done"
            return out
        out["state"] = "partial" if out["stages"] else "pending"
    err = run_dir / ERROR_FILE
    if err.is_file():
        out["state"] = "failed"
        try:
            out["error"] = read_json_lenient(err)
        except (OSError, ValueError):
            out["error"] = {"error": "unreadable error.json", "message": str(err)}
    return out


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, for strict JSON writers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict(v) for v in obj]
    return obj


def write_strict_json(path: Path, obj: Any) -> None:
    """Atomic, standard JSON (no NaN/Infinity tokens): what JavaScript's JSON.parse accepts."""
    from ..io import write_bytes

    text = json.dumps(strict(obj), indent=2, allow_nan=False, default=str)
    write_bytes(path, text.encode())
