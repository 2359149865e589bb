"""Losses of the search: distortion (gated vs original outputs) and cost (kept MACs vs target).

Pure functions of tensors plus one small stateful helper (:class:`CostController`, plain floats
so that checkpoints restore it exactly); nothing here knows about Lightning or model families.
"""

from dipgo.losses.cost import CostConfig, CostController, check_target, cost_loss
from dipgo.losses.distortion import DistortionConfig, distortion

__all__ = [
    "CostConfig",
    "CostController",
    "DistortionConfig",
    "check_target",
    "cost_loss",
    "distortion",
]
