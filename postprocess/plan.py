"""The Plan: hard gate decisions as plain, versioned JSON.

A Plan is what a search produces and what every SubNet builder consumes. It is plain data so
that post-processing, export, ``dipgo bench`` and ``dipgo report`` share it without importing
the search code, and so that it can be diffed, committed and reloaded anywhere.

For the ``reuse`` kind, ``compute`` is a ``steps x blocks`` grid of booleans: ``True`` means the
block is computed at that step, ``False`` means its output is reused from the previous step.
Row 0 is always all ``True`` (nothing to reuse yet). A reuse plan may instead be a *solver
schedule* (:class:`SolverSchedule`): every call computes the whole model, but the sampler runs K
learned timesteps of a multistep solver in place of the reference's S steps; its grid is then
K all-``True`` rows and ``num_steps`` is K.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dipgo.errors import PlanError
from dipgo.files import read_json, write_json_atomic

PLAN_VERSION = 1
# forecast orders a reuse plan may record (supernets/forecast.py FORECAST_ORDERS; kept literal so
# that reading a plan imports no torch)
FORECAST_ORDERS: tuple[int, ...] = (0, 1, 2)
# solvers a solver-schedule plan may name (supernets/sampling.py SCHEDULE_SOLVERS; literal, as above)
SCHEDULE_SOLVERS: tuple[str, ...] = ("dpmsolver++", "unipc")


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
        meta: what the SubNet builders need, read through the typed :attr:`payload` (stored in
            ``meta`` under the keys plans have always used, so old plan files load unchanged),
            and free-form provenance (scheduler, seed, recipe, probabilities...).
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
            schedule = self.payload.schedule
            if schedule is not None and (len(schedule.timesteps) != self.num_steps
                                         or not all(all(row) for row in self.compute)):
                raise PlanError(f"a solver-schedule plan computes every block at each of its "
                                f"{len(schedule.timesteps)} timesteps, but its grid has {len(self.compute)} rows "
                                "with some blocks closed")

    @property
    def num_closed(self) -> int:
        return sum(not v for row in self.compute for v in row)

    @property
    def payload(self) -> ReusePayload | BlockPayload | MaskPayload | JointPayload:
        """The typed part of ``meta`` that this kind's SubNet builder needs."""
        if self.kind not in PAYLOADS:
            raise PlanError(f"plan kind {self.kind!r} has no typed payload; known: {', '.join(PAYLOADS)}")
        return PAYLOADS[self.kind].from_meta(self.meta or {})

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


# ---- typed payloads ----------------------------------------------------------------------------
# Each gate kind's SubNet builder reads a small dataclass instead of poking ``meta`` keys; the
# dataclass is (de)serialised to the very keys plans have always had, so the JSON is unchanged.


@dataclass(frozen=True)
class SolverSchedule:
    """A reuse plan that changes the sampler instead of the denoiser: ``scheduler`` (a multistep
    solver) runs exactly ``timesteps`` (strictly decreasing), one full denoiser call each, in place
    of the ``reference_steps``-step ``reference_scheduler`` trajectory the plan was searched
    against. Stored in a plan's ``meta`` as ``solver_schedule``."""

    scheduler: str
    timesteps: list[int]
    reference_scheduler: str
    reference_steps: int

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULE_SOLVERS:
            raise PlanError(f"a solver schedule runs on {' or '.join(SCHEDULE_SOLVERS)}, got {self.scheduler!r}")
        ts = self.timesteps
        if (not ts or any(type(t) is not int for t in ts) or any(a <= b for a, b in zip(ts, ts[1:]))
                or ts[-1] < 0):
            raise PlanError(f"solver schedule timesteps must be strictly decreasing non-negative integers, got {ts!r}")
        if type(self.reference_steps) is not int or self.reference_steps < 1:
            raise PlanError(f"solver schedule reference_steps must be a positive integer, got {self.reference_steps!r}")

    @classmethod
    def from_meta(cls, data: dict[str, Any] | None) -> SolverSchedule | None:
        if data is None:
            return None
        try:
            return cls(str(data["scheduler"]), list(data["timesteps"]), str(data["reference_scheduler"]),
                       data["reference_steps"])
        except (KeyError, TypeError) as exc:
            raise PlanError(f"plan solver_schedule is not a solver schedule: {exc}") from None

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ReusePayload:
    """How the reuse units are rebuilt: ``granularity`` (block / layer), the requested ``mode``, the
    per-unit ``modes`` the search used (output / residual), checked against the model, and what a
    closed unit returns: ``forecast_order`` 0 = its last computed output, 1 / 2 = a linear /
    quadratic extrapolation from its computed steps (written only when nonzero, so plans without
    forecasting keep the bytes they always had). ``whole_step_skip`` (written only when set) forces
    whether a fully closed step skips the denoiser call (``ReuseConfig.whole_step_skip``)."""

    granularity: str = "block"
    mode: str = "auto"
    modes: list[str] | None = None
    forecast_order: int = 0
    whole_step_skip: bool | None = None
    schedule: SolverSchedule | None = None
    """Set on solver-schedule plans (written only then)."""

    def __post_init__(self) -> None:
        if self.whole_step_skip is not None and type(self.whole_step_skip) is not bool:
            raise PlanError(f"plan whole_step_skip must be true, false or absent, got {self.whole_step_skip!r}")
        if type(self.forecast_order) is not int or self.forecast_order not in FORECAST_ORDERS:
            raise PlanError(
                f"plan forecast_order must be one of {', '.join(map(str, FORECAST_ORDERS))}, got {self.forecast_order!r}"
            )

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ReusePayload:
        modes = meta.get("modes")
        return cls(str(meta.get("granularity", "block")), str(meta.get("mode", "auto")),
                   None if modes is None else [str(m) for m in modes], meta.get("forecast_order", 0),
                   meta.get("whole_step_skip"), SolverSchedule.from_meta(meta.get("solver_schedule")))

    def to_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"granularity": self.granularity, "mode": self.mode, "modes": self.modes}
        if self.forecast_order:
            meta["forecast_order"] = self.forecast_order
        if self.whole_step_skip is not None:
            meta["whole_step_skip"] = self.whole_step_skip
        if self.schedule is not None:
            meta["solver_schedule"] = self.schedule.to_meta()
        return meta


@dataclass(frozen=True)
class BlockPayload:
    """The kept blocks are the plan's ``compute`` row; ``signatures`` (class, parameter count per
    block) tell models with the same block names apart (resnet18 / resnet34)."""

    signatures: dict[str, Any] | None = None

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> BlockPayload:
        return cls(meta.get("block_signatures"))

    def to_meta(self) -> dict[str, Any]:
        return {"block_signatures": self.signatures}


@dataclass(frozen=True)
class MaskPayload:
    """The kept density of every planned layer (in the plan's ``blocks`` order) and the pattern."""

    pattern: str
    density: list[float]

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> MaskPayload:
        if "pattern" not in meta or "density" not in meta:
            raise PlanError("a mask plan needs meta.pattern and meta.density (the kept fraction per layer)")
        return cls(str(meta["pattern"]), list(meta["density"]))

    def to_meta(self) -> dict[str, Any]:
        return {"density": self.density, "pattern": self.pattern}

    def pruned(self, layers: list[str]) -> dict[str, float]:
        """``{layer: density}`` of the layers the plan prunes (density below 1)."""
        if len(layers) != len(self.density):
            raise PlanError(f"the mask plan has {len(self.density)} densities for {len(layers)} layers")
        return {p: d for p, d in zip(layers, self.density) if d < 1.0}


@dataclass(frozen=True)
class JointPayload:
    """Its parts: the searched ``kinds``, the reuse part (a reuse + mask plan's ``compute`` is the
    grid), the mask part (stored under ``meta["mask"]`` with its ``layers``, which are not the
    plan's ``blocks``) and, for block + mask, the kept blocks (the ``compute`` row)."""

    kinds: list[str]
    reuse: ReusePayload | None = None
    mask: MaskPayload | None = None
    mask_layers: list[str] = field(default_factory=list)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> JointPayload:
        kinds = [str(k) for k in meta.get("kinds", [])]
        mask = meta.get("mask") or None
        return cls(kinds, ReusePayload.from_meta(meta) if "reuse" in kinds else None,
                   MaskPayload.from_meta(mask) if mask else None, list(mask.get("layers", [])) if mask else [])


PAYLOADS: dict[str, Any] = {"reuse": ReusePayload, "block": BlockPayload, "mask": MaskPayload, "joint": JointPayload}
