"""Gate slots and the SuperNet protocol every gate kind implements.

A *gate* is one optional computation of the wrapped model. The pruner network sees only the
list of :class:`GateSlot` objects (their order is the order of its queries and of its
output logits), and the Lightning search loop sees only the :class:`SuperNet` protocol. That
keeps search/ and losses/ independent of diffusers, timm or transformers.

Gate values are *keep probabilities*: 1.0 means "compute" (the original model), 0.0 means
"closed" (reuse the cache / drop the block / mask the weight). Every tensor of gates has
shape ``(N,)`` with ``N == len(slots)``, in slot order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

GateKind = Literal["reuse", "block", "mask"]
GATE_KINDS: tuple[str, ...] = ("reuse", "block", "mask")
# The block name of a reuse *step* gate: one slot per sampling step that gates all of its units.
STEP_BLOCK = "*"


@dataclass(frozen=True)
class GateSlot:
    """One optional computation that the pruner can switch off.

    Attributes:
        name: unique, human-readable id, e.g. ``"step07/up_blocks.1"``; used in logs and plots.
        kind: which gate kind owns the slot (``reuse``, ``block`` or ``mask``).
        block: module path of the gated block inside the wrapped model (``"up_blocks.1"``), so a
            Plan can name what it removes and be checked against another model.
        cost: MACs saved when the slot is closed, ignoring dependency cascades (the cost model
            of the SuperNet adds those). Counted by ``dipgo.measure.macs``, never by hand.
        step: sampling step index for ``reuse`` slots, ``None`` for the other kinds.
    """

    name: str
    kind: str
    block: str
    cost: float
    step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class SuperNet(Protocol):
    """What the search loop needs from a wrapped model (any gate kind).

    The wrapped model is frozen: the SuperNet owns no trainable parameters, so checkpoints of
    the search hold the pruner only.
    """

    slots: list[GateSlot]

    def full_cost(self) -> float:
        """MACs of the original (ungated) computation for one calibration batch element."""
        ...

    def expected_cost(self, gates: torch.Tensor) -> torch.Tensor:
        """Differentiable cost of the gated computation relative to the full one, in [0, 1].

        ``gates``: ``(N,)`` keep probabilities. Includes dependency cascades (work consumed
        only by closed gates is free).
        """
        ...

    def reference(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Outputs of the original model for a calibration batch (no grad).

        Always has ``"output"`` (final sample / logits / embedding); may have more keys that the
        distortion loss understands (``"eps"``: per-step noise predictions ``(S, B, ...)``).
        """
        ...

    def gated(self, batch: dict[str, torch.Tensor], gates: torch.Tensor) -> dict[str, torch.Tensor]:
        """Same keys as :meth:`reference`, with soft (or hard 0/1) gates, differentiable in ``gates``."""
        ...


def freeze(model: nn.Module) -> Callable[[], None]:
    """Freeze and switch to eval; returns the function that restores the previous flags exactly.

    Every SuperNet wraps a frozen model (the pruner is the only thing trained) and must hand the
    model back untouched when removed.
    """
    grads = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    model.requires_grad_(False)
    model.eval()

    def restore() -> None:
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag

    return restore
