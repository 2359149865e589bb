"""Gated SuperNets: gate slots, the SuperNet protocol and one module per gate kind.

Re-exports are lazy (PEP 562) so that ``import dipgo.supernets.gates`` does not pull in diffusers
for users of the block or mask kinds.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "GateSlot": "dipgo.supernets.gates",
    "SuperNet": "dipgo.supernets.gates",
    "ReuseConfig": "dipgo.supernets.reuse",
    "ReuseSuperNet": "dipgo.supernets.reuse",
    "apply_reuse": "dipgo.supernets.reuse",
    "remove_reuse": "dipgo.supernets.reuse",
    "UnsupportedModelError": "dipgo.supernets.adapters",
    "register_reuse_adapter": "dipgo.supernets.adapters",
    "get_reuse_adapter": "dipgo.supernets.adapters",
    "BlockSuperNet": "dipgo.supernets.block",
    "apply_block_gates": "dipgo.supernets.block",
    "find_blocks": "dipgo.supernets.block",
    "register_block_finder": "dipgo.supernets.block",
    "MaskGateConfig": "dipgo.supernets.mask",
    "MaskSuperNet": "dipgo.supernets.mask",
    "apply_mask_gates": "dipgo.supernets.mask",
    "make_scheduler": "dipgo.supernets.sampling",
    "sample": "dipgo.supernets.sampling",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
