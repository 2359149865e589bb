"""MACs per module and per model, from torch's maintained FLOP counter.

We never count MACs by hand per layer type: ``torch.utils.flop_counter.FlopCounterMode`` knows
matmul, conv, SDPA and their variants, and keeps up with new ops. One MAC = two FLOPs.
Elementwise work (norms, activations) is not counted, as in every MAC table of the field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_macs(fn: Callable[[], Any]) -> tuple[float, dict[str, float]]:
    """Run ``fn()`` under the FLOP counter.

    Returns ``(total_macs, per_module)`` where ``per_module`` maps the counter's module names
    with the root class name stripped (``"down_blocks.0.resnets.1"``) to MACs; the root model
    itself is ``""``.
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    per_module: dict[str, float] = {}
    for name, ops in counter.get_flop_counts().items():
        if name == "Global":
            continue
        _, _, path = name.partition(".")
        per_module[path] = per_module.get(path, 0.0) + sum(ops.values()) / 2.0
    return counter.get_total_flops() / 2.0, per_module


def model_macs(model: nn.Module, *args: Any, **kwargs: Any) -> float:
    """MACs of one ``model(*args, **kwargs)`` call."""
    total, _ = count_macs(lambda: model(*args, **kwargs))
    return total


def block_macs(
    model: nn.Module, blocks: Iterable[str], *args: Any, **kwargs: Any
) -> tuple[float, dict[str, float]]:
    """MACs of one forward call, split over the named blocks (module paths).

    Blocks that the forward never reaches get 0. Returns ``(total, {block: macs})``.
    """
    total, per_module = count_macs(lambda: model(*args, **kwargs))
    return total, {b: per_module.get(b, 0.0) for b in blocks}


class OutputCall(nn.Module):
    """``model`` + output function as one module, so the MAC counter sees the real forward."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fn(self.model, inputs)
