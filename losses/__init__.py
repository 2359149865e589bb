"""Losses of the search: distortion (gated vs original outputs) and cost (kept MACs vs target).

Pure functions of tensors plus one small stateful helper (:class:`CostController`, plain floats
so that checkpoints restore it exactly); nothing here knows about Lightning or model families.

Re-exports are lazy (PEP 562): :mod:`dipgo.losses.config` holds the settings dataclasses that
are also the Hydra schema of ``search.distortion`` / ``search.cost``, and composing a config
must not import torch. The distortion function is ``dipgo.losses.distortion.distortion``
(``dipgo.losses.distortion`` is its module, which a lazy package cannot also re-export).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "CostConfig": "dipgo.losses.config",
    "DistortionConfig": "dipgo.losses.config",
    "CostController": "dipgo.losses.cost",
    "check_target": "dipgo.losses.cost",
    "cost_loss": "dipgo.losses.cost",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
