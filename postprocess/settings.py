"""Settings of the post-processing steps: plain dataclasses, no torch.

``search.refine`` and ``supernet.sds`` are these very classes, used as the Hydra schema and at
run time (``dipgo.search.config.config_of`` builds them
from the composed node; ``__post_init__`` checks the values once, for both).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RefineConfig:
    """Settings of the post-search refinement (``search.refine`` in the config), for every kind."""

    enabled: bool = True
    """Run the refinement (off: the plan is the greedy extraction from the learned probabilities)."""
    max_evals: int = 150
    """Hard-plan evaluations of the local search (each samples the calibration batch once)."""
    batch: int = 16
    """Calibration items sampled per evaluation (the first items of the pool)."""
    seeds: list[str] = field(default_factory=lambda: ["uniform", "whole_steps", "weight_norm", "drop_last"])
    """Static plans also tried as starting points, besides the learned plan; each kind uses the
    names it knows (reuse: uniform / whole_steps and the reuse baselines; block: weight_norm /
    drop_last) and ignores the others."""

    def __post_init__(self) -> None:
        if self.max_evals < 0 or self.batch < 1:
            raise ValueError(f"search.refine.max_evals must be >= 0 and search.refine.batch >= 1; "
                             f"got {self.max_evals}, {self.batch}")


class SDSError(ValueError):
    """An SDS setting that cannot work; the message is one sentence."""


@dataclass
class SDSConfig:
    """The optional SDS step of the mask kind (``supernet.sds`` in the config).

    Attributes:
        enabled: run SDS after dipgo's first prune.
        steps: Adam steps of the re-dense training per round (at least 1).
        lr: Adam learning rate of the re-dense training (cosine decay to 0).
        l1: strength of the L1 pull of the previously pruned entries towards zero, per step in units
            of the current learning rate (proximal soft threshold); 0 = plain re-dense, >= 0.
        rounds: dense-sparse rounds after the first prune (at least 1).
    """

    enabled: bool = False
    steps: int = 100
    lr: float = 3e-4
    l1: float = 0.3
    rounds: int = 1

    def __post_init__(self) -> None:
        problem = sds_refusal(self.steps, self.lr, self.l1, self.rounds)
        if problem is not None:
            raise SDSError(problem)

    @classmethod
    def from_config(cls, node: Any) -> SDSConfig:
        """From ``cfg.supernet.sds`` (a mapping, or the old bare boolean)."""
        if node is None or isinstance(node, bool):
            return cls(enabled=bool(node))
        if isinstance(node, SDSConfig):
            return node
        get = node.get if isinstance(node, Mapping) or hasattr(node, "get") else lambda k, d: getattr(node, k, d)
        d = cls()
        return cls(enabled=bool(get("enabled", d.enabled)), steps=int(get("steps", d.steps)),
                   lr=float(get("lr", d.lr)), l1=float(get("l1", d.l1)), rounds=int(get("rounds", d.rounds)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sds_refusal(steps: int, lr: float, l1: float, rounds: int) -> str | None:
    """``None`` when the SDS settings can work, else one sentence saying which one cannot."""
    if steps < 1:
        return f"supernet.sds.steps must be at least 1 (Adam steps of the re-dense training); got {steps}"
    if not lr > 0:
        return f"supernet.sds.lr must be > 0; got {lr}"
    if l1 < 0:
        return f"supernet.sds.l1 must be >= 0 (0 = no sparse regulariser); got {l1}"
    if rounds < 1:
        return f"supernet.sds.rounds must be at least 1; got {rounds}"
    return None
