"""Post-processing: gate probabilities -> hard Plans -> SubNets that really run faster.

Re-exports are lazy (PEP 562) so that importing the plan format does not pull in diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "Plan": "dipgo.postprocess.plan",
    "PlanError": "dipgo.postprocess.plan",
    "extract_reuse_plan": "dipgo.postprocess.reuse_plan",
    "validate_plan": "dipgo.postprocess.reuse_plan",
    "install_plan": "dipgo.postprocess.reuse_subnet",
    "enable": "dipgo.postprocess.reuse_subnet",
    "schedule_scheduler": "dipgo.postprocess.reuse_subnet",
    "ReuseSubNet": "dipgo.postprocess.reuse_subnet",
    "check_plan_matches": "dipgo.postprocess.block_subnet",
    "export_block_subnet": "dipgo.postprocess.block_subnet",
    "load_block_subnet": "dipgo.postprocess.block_subnet",
    "make_block_plan": "dipgo.postprocess.block_subnet",
    "remove_blocks": "dipgo.postprocess.block_subnet",
    "extract_mask_plan": "dipgo.postprocess.mask_plan",
    "prune_with_plan": "dipgo.postprocess.mask_subnet",
    "to_kernels": "dipgo.postprocess.mask_subnet",
    "export_mask_subnet": "dipgo.postprocess.mask_subnet",
    "load_mask_subnet": "dipgo.postprocess.mask_subnet",
    "obs_prune": "dipgo.postprocess.reconstruct",
    "prune_baseline": "dipgo.postprocess.mask_baselines",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
