"""Kernel or dense: decided by timing the layer on the machine doing the conversion.

The cost model in :mod:`dipgo.kernels.heuristics` was fitted on one AVX-512 CPU; on another CPU
(issue 14: an AVX2-only AMD EPYC) its constants were off by 20x and SubNets shipped layers that ran
several times slower than dense. So :func:`decide_layer` times the real thing: the layer's shape,
its kept blocks and the token count it will see, on the native kernel and on every dense path
(:mod:`dipgo.kernels.baselines`), interleaved in this process (medians), and picks the kernel only
when it beats the *fastest* dense path by ``min_speedup``. The cost model is only a first guess
that skips timing layers it calls hopeless (estimated speed-up below ``skip_below``).

Timings are cached on disk like the per-block latency tables (:mod:`dipgo.measure.block_latency`):
``$DIPGO_CACHE/kernel_decisions/<machine key>.json`` (default ``~/.cache/dipgo``), one file per
CPU model, kernel build (ISA, source), thread count and torch version, so a different machine or
setting never reuses them. Without the native kernel (no compiler, refused ISA, failed build)
every layer stays dense: torch's BSR fallback is slower than dense almost everywhere.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dipgo.kernels import native
from dipgo.kernels.baselines import dense_paths
from dipgo.kernels.heuristics import estimated_speedup
from dipgo.kernels.layout import BlockSparseWeight

Timer = Callable[[dict[str, Callable[[], Any]]], dict[str, float]]
"""Takes ``{name: zero-argument call}``, returns ``{name: median seconds}`` (tests inject fakes)."""

CACHE_SUBDIR = "kernel_decisions"
MIN_SPEEDUP = 1.1
"""The kernel must beat the fastest dense path by this much (a margin for timing noise)."""
SKIP_BELOW = 0.3
"""Layers the cost model expects at under this speed-up stay dense untimed (e.g. 1-token calls)."""


@dataclass
class Choice:
    """What :func:`decide_layer` chose for one layer, and why."""

    kernel: bool
    reason: str
    ratio: float | None = None
    """Fastest dense time / kernel time (> 1: the kernel is faster); ``None`` when not timed."""
    dense_path: str | None = None
    """Name of the fastest dense path (``mkl`` or ``onednn``)."""
    times_ms: dict[str, float] | None = None
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_timer(fns: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Interleaved medians in this process (:func:`dipgo.measure.latency.compare_latency`)."""
    from dipgo.measure.latency import compare_latency

    results = compare_latency(fns, warmup=2, runs=5, rounds=2)
    return {name: r.median_s for name, r in results.items()}


def _cpu_identity() -> str:
    """CPU model name, family and model number (``/proc/cpuinfo``)."""
    wanted = ("model name", "cpu family", "model\t", "model  ")
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return " | ".join(sorted({ln.strip() for ln in lines if ln.startswith(wanted)}))
    except OSError:
        return platform.processor() or platform.machine()


def machine_key(kernel: native.NativeKernel) -> dict[str, Any]:
    """Everything a timing depends on besides the layer: CPU, kernel build, threads, torch."""
    return {
        "cpu": _cpu_identity(),
        "isa": kernel.isa,
        "kernel_build": kernel.path.name,  # holds the digest of source, flags, compiler, CPU flags
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def cache_file(key: dict[str, Any]) -> Path:
    """Where the timings for ``key`` live (the ``$DIPGO_CACHE`` convention of the latency tables)."""
    from dipgo.measure.block_latency import cache_root

    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / CACHE_SUBDIR / f"{digest}.json"


def _layer_key(weight: BlockSparseWeight, tokens: int, bias: bool, activation: str = "none") -> str:
    """Timing depends on the shape, block, token count, the fused activation and which blocks are
    kept (not on values)."""
    mask = weight.block_mask().flatten().to(torch.uint8).numpy().tobytes()
    pattern = hashlib.sha1(mask).hexdigest()[:12]
    bn, bk = weight.block
    act = "" if activation == "none" else f"/{activation}"
    return f"{weight.out_features}x{weight.in_features}/b{bn}x{bk}/t{tokens}/bias{int(bias)}{act}/{pattern}"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) and isinstance(data.get("layers"), dict) else {}
    except (OSError, ValueError):
        return {}  # absent or corrupt: re-measured and overwritten


def time_layer(weight: BlockSparseWeight, bias: torch.Tensor | None, tokens: int,
               timer: Timer, activation: str = "none") -> dict[str, float]:
    """Median seconds of ``{"kernel", "mkl", "onednn"?}`` for this layer on ``tokens`` random rows:
    the kernel as a SubNet calls it (:class:`~dipgo.kernels.BlockSparseLinear`, ``activation``
    fused), each dense path followed by torch's ``activation``."""
    from dipgo.kernels.modules import BlockSparseLinear
    from dipgo.kernels.reference import activate

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, weight.in_features, generator=gen)
    dense_w = weight.to_dense().float()
    b = None if bias is None else bias.detach().float()
    layer = BlockSparseLinear(weight.to(torch.float32), b, activation)
    # layer.forward, not layer(...): the dense paths are plain calls (see dipgo.kernels.bench)
    fns: dict[str, Callable[[], Any]] = {"kernel": lambda: layer.forward(x)}
    fns.update({name: (lambda f=f: activate(f(), activation)) for name, f in dense_paths(x, dense_w, b).items()})
    with torch.inference_mode():
        return timer(fns)


def decide_layer(weight: BlockSparseWeight, bias: torch.Tensor | None, tokens: int, *,
                 timer: Timer | None = None, use_cache: bool = True, min_speedup: float = MIN_SPEEDUP,
                 skip_below: float = SKIP_BELOW, activation: str = "none") -> Choice:
    """Should this block-sparse layer run on the native kernel at ``tokens`` rows per call?
    ``activation``: what follows the layer (the kernel fuses it; the dense paths run torch's)."""
    kernel = native.load()
    if kernel is None:
        return Choice(False, "native CPU kernel unavailable (see the warning): dense")
    sparsity = 1.0 - weight.density
    guess = estimated_speedup((weight.out_features, weight.in_features), min(sparsity, 0.9999), weight.block,
                              tokens=tokens, threads=torch.get_num_threads())
    if guess < skip_below:
        return Choice(False, f"cost model expects {guess:.2f}x (< {skip_below:g}x), not timed: dense")
    key = machine_key(kernel)
    path = cache_file(key)
    layer = _layer_key(weight, tokens, bias is not None, activation)
    cache = _read_cache(path) if use_cache else {}
    times = cache.get("layers", {}).get(layer)
    cached = times is not None
    if not cached:
        times = time_layer(weight, bias, tokens, timer or default_timer, activation)
        if use_cache:
            from dipgo.files import write_json_atomic

            cache = _read_cache(path)  # another process may have added entries meanwhile
            cache.setdefault("machine", key)
            cache.setdefault("layers", {})[layer] = times
            write_json_atomic(path, cache)
    dense_name = min((n for n in times if n != "kernel"), key=lambda n: times[n])
    ratio = times[dense_name] / times["kernel"]
    use = ratio >= min_speedup
    verdict = "kernel" if use else "dense"
    reason = (f"measured {ratio:.2f}x vs {dense_name} "
              f"({'>=' if use else '<'} {min_speedup:g}x){' (cached)' if cached else ''}: {verdict}")
    return Choice(use, reason, ratio, dense_name, {n: t * 1e3 for n, t in times.items()}, cached)
