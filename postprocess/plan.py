"""The Plan: hard gate decisions as plain, versioned JSON.

A Plan is what a search produces and what every SubNet builder consumes. It is plain data so
that post-processing, export, ``dipgo bench`` and ``dipgo report`` share it without importing
the search code, and so that it can be diffed, committed and reloaded anywhere.

For the ``reuse`` kind, ``compute`` is a ``steps x blocks`` grid of booleans: ``True`` means the
block is computed at that step, ``False`` means its output is reused from the previous step.
Row 0 is always all ``True`` (nothing to reuse yet).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dipgo.errors import PlanError
from dipgo.files import read_json, write_json_atomic

PLAN_VERSION = 1


@dataclass
class Plan:
    """Hard decisions of one search.

    Attributes:
        kind: gate kind (``reuse``, ``block``, ``mask``).
        model: class name of the wrapped model, checked when the plan is applied.
        blocks: module paths of the gated blocks, in column order.
        compute: for ``reuse``: ``steps x blocks`` grid, ``True`` = compute. For ``block``: one
            row, ``True`` = keep the block.
        target: the kept-cost ratio the user asked for.
        cost_ratio: the plan's real kept-cost ratio (MACs of the SubNet / MACs of the full model).
        num_steps: sampling steps the plan was searched for (``reuse`` only).
        meta: free-form provenance (scheduler, seed, recipe, probabilities...).
    """

    kind: str
    model: str
    blocks: list[str]
    compute: list[list[bool]]
    target: float
    cost_ratio: float
    num_steps: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if not self.compute or any(len(row) != len(self.blocks) for row in self.compute):
            raise PlanError(
                f"plan grid does not match its blocks: every row must have {len(self.blocks)} entries"
            )
        if self.kind == "reuse":
            if self.num_steps is None or len(self.compute) != self.num_steps:
                raise PlanError(
                    f"reuse plan has {len(self.compute)} rows but num_steps={self.num_steps}"
                )
            if not all(self.compute[0]):
                raise PlanError("reuse plan must compute every block at step 0 (nothing to reuse yet)")

    @property
    def num_closed(self) -> int:
        return sum(not v for row in self.compute for v in row)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if data.get("version", PLAN_VERSION) > PLAN_VERSION:
            raise PlanError(f"plan version {data['version']} is newer than this dipgo ({PLAN_VERSION})")
        try:
            return cls(**data)
        except TypeError as exc:
            raise PlanError(f"not a dipgo plan: {exc}") from None

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_dict(read_json(path, "a plan.json written by `dipgo search`"))
