"""Per-block latency tables: what removing each block saves on *this* device.

MACs are a poor proxy for time: a block at high resolution with few channels is cheap in MACs
but slow in memory traffic, and the ratio differs between a CPU and a GPU. So a latency target
is met with measured costs: at search start every gateable block is timed alone on the input it
really receives (captured by a hook during one forward of the calibration example), interleaved
with the full model, on the search device and thread count. The table is cached on disk per
model, input shape, device and thread count, so a sweep measures it once; a different device
gives a different table, hence possibly a different plan from the same recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dipgo.files import write_json_atomic
from dipgo.measure.latency import compare_latency

CACHE_ENV = "DIPGO_CACHE"


def cache_root() -> Path:
    """``$DIPGO_CACHE`` or ``~/.cache/dipgo``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dipgo")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu:{platform.processor() or platform.machine()}"


def table_key(model: nn.Module, blocks: Sequence[str], inputs: dict[str, torch.Tensor], device: torch.device, threads: int) -> str:
    """A digest of everything the timings depend on (not the weights' values: timing ignores them)."""
    shapes = [(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()]
    parts = {
        "model": type(model).__name__,
        "params": shapes,
        "blocks": list(blocks),
        "inputs": {k: (tuple(v.shape), str(v.dtype)) for k, v in inputs.items()},
        "device": _device_name(device),
        "threads": threads,
        "torch": torch.__version__,
    }
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _capture_block_inputs(model: nn.Module, blocks: Sequence[str], call: Callable[[], Any]) -> dict[str, tuple[tuple, dict]]:
    """The positional and keyword inputs each block receives in one forward of ``call()``."""
    captured: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for path in blocks:
        def hook(module: nn.Module, args: tuple, kwargs: dict, path: str = path) -> None:
            captured.setdefault(path, (args, kwargs))

        handles.append(model.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return captured


def measure_block_latency(
    model: nn.Module, blocks: Sequence[str], call: Callable[[], Any], *, device: torch.device,
    runs: int = 5, warmup: int = 2,
) -> dict[str, Any]:
    """Median seconds of the full forward ``call()`` and of each block alone on its real input."""
    captured = _capture_block_inputs(model, blocks, call)
    missing = [b for b in blocks if b not in captured]
    if missing:
        raise ValueError(f"blocks never reached by the forward pass, cannot time them: {', '.join(missing)}")
    fns: dict[str, Callable[[], Any]] = {"__full__": call}
    for path in blocks:
        module, (args, kwargs) = model.get_submodule(path), captured[path]
        fns[path] = lambda m=module, a=args, k=kwargs: m(*a, **k)
    results = compare_latency(fns, warmup=warmup, runs=runs, device=device)
    return {
        "full_s": results["__full__"].median_s,
        "block_s": {b: results[b].median_s for b in blocks},
        "threads": results["__full__"].threads,
        "device": _device_name(device),
        "runs": runs,
    }


def block_latency_table(
    model: nn.Module, blocks: Sequence[str], inputs: dict[str, torch.Tensor], call: Callable[[], Any], *,
    device: torch.device, runs: int = 5, warmup: int = 2, use_cache: bool = True,
) -> dict[str, Any]:
    """The cached table for ``(model, blocks, input shapes, device, threads)``; measured when absent.

    Returns ``{"full_s", "block_s": {block: s}, "threads", "device", "runs", "key", "cached"}``.
    """
    key = table_key(model, blocks, inputs, device, torch.get_num_threads())
    path = cache_root() / "latency" / f"{key}.json"
    if use_cache and path.is_file():
        try:
            table = json.loads(path.read_text())
            if set(table.get("block_s", {})) == set(blocks):
                return {**table, "key": key, "cached": True}
        except (OSError, ValueError):
            pass  # a corrupt cache entry is re-measured and overwritten
    table = measure_block_latency(model, blocks, call, device=device, runs=runs, warmup=warmup)
    if use_cache:
        write_json_atomic(path, table)
    return {**table, "key": key, "cached": False}
