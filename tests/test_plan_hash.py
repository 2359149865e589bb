"""scripts/plan_hash.py: equal for plans that differ only in timings, different otherwise."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

SCRIPT = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "plan_hash.py"))


def _write(path: Path, seconds: float, compute: list[list[bool]]) -> Path:
    plan = {"kind": "reuse", "compute": compute, "meta": {"search_seconds": seconds,
                                                          "refine": {"eval_seconds": seconds, "start": "learned"}}}
    path.write_text(json.dumps(plan))
    return path


def test_plan_hash_ignores_timings_only(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", 1.5, [[True, True], [False, True]])
    b = _write(tmp_path / "b.json", 9.0, [[True, True], [False, True]])
    c = _write(tmp_path / "c.json", 1.5, [[True, True], [True, False]])
    assert SCRIPT["plan_hash"](a) == SCRIPT["plan_hash"](b)
    assert SCRIPT["plan_hash"](a) != SCRIPT["plan_hash"](c)
    assert SCRIPT["main"]([str(a), str(b)]) == 0
    assert SCRIPT["main"]([str(a), str(c)]) == 1
