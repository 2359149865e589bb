"""scripts/placement_frontier.py: which placements of whole steps it judges."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

SCRIPT = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "placement_frontier.py"))


def test_whole_steps_reads_only_all_or_nothing_plans() -> None:
    whole_steps = SCRIPT["whole_steps"]
    assert whole_steps([[True, True], [False, False], [True, True]]) == [0, 2]
    assert whole_steps([[True, True], [True, False]]) is None  # a partly computed step: not a placement


def test_placements_enumerate_small_spaces_and_draw_from_large_ones() -> None:
    placements = SCRIPT["placements"]
    every = placements(6, 3, limit=100, seed=0, must=[[0, 2, 4]])
    assert len(every) == math.comb(5, 2) and every[0] == [0, 2, 4]  # the plan first, then no duplicate of it
    assert all(p[0] == 0 and len(set(p)) == 3 and p == sorted(p) for p in every)
    drawn = placements(25, 5, limit=20, seed=0, must=[[0, 5, 10, 15, 20], [0, 6, 14, 21, 24]])
    assert drawn[:2] == [[0, 5, 10, 15, 20], [0, 6, 14, 21, 24]]
    assert 20 <= len(drawn) <= 22 and len({tuple(p) for p in drawn}) == len(drawn)
    assert all(p[0] == 0 and len(p) == 5 and max(p) < 25 for p in drawn)
    assert drawn == placements(25, 5, limit=20, seed=0, must=[[0, 5, 10, 15, 20], [0, 6, 14, 21, 24]])  # reproducible
