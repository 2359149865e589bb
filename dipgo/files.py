"""Atomic JSON / bytes writes and checked JSON reads, on the ground floor.

Plans, reports, sweep summaries and the measured latency tables are all written so that a reader
sees either the old file or the complete new one, never half of it; the measurement floor needs
this as much as the plan code, so it lives below both.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from dipgo.errors import PlanError


def read_json(path: str | Path, expected: str) -> Any:
    """Read a JSON artifact, or raise :class:`PlanError` saying what was expected there."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"nothing at {path}: expected {expected}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON so that readers see either the old file or the complete new one, never half.

    Writes to a temporary file in the same folder, fsyncs, then ``os.replace``s it.
    """
    return write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def write_bytes_atomic(path: str | Path, payload: bytes) -> Path:
    """Atomic write of raw bytes (same-folder temp file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
