"""dipgo: gated SuperNets, a learned pruner, and SubNets that really run faster.

The names a user reaches for first, e.g. ``dipgo.enable(pipe, "runs/.../plan.json")``. This file
is the facade on the top floor of docs/ARCHITECTURE.md: its re-exports are lazy (PEP 562), so
``import dipgo`` (which every ``dipgo.*`` import runs first) loads nothing else.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "enable": "dipgo.postprocess.reuse_subnet",  # a plan on a diffusers pipeline (pipe.unet / pipe.transformer)
    "install_plan": "dipgo.postprocess.reuse_subnet",  # a plan on a denoiser
    "load_subnet": "dipgo.postprocess.reuse_subnet",  # an exported reuse SubNet folder
    "Plan": "dipgo.postprocess.plan",
    "compile_blocks": "dipgo.postprocess.compile",  # regional torch.compile, before install_plan / enable
    "load_model": "dipgo.models.registry",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
