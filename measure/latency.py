"""Wall-clock latency and peak memory, measured the same way for every report.

Every speed claim in dipgo is a ratio of medians taken in one process run (see DESIGN.md).
``compare_latency`` times the variants *interleaved* (a, b, c, a, b, c, ...) so that a noisy,
shared machine slows them alike; a ratio of two separate runs would mostly measure the noise.
Medians, not means: one descheduled call should not move the result.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class LatencyResult:
    """Timings of one callable. All times are seconds per call."""

    median_s: float
    """Median of ``times_s``: the number speedups are computed from."""
    mean_s: float
    std_s: float
    """Sample standard deviation (0 with a single run)."""
    min_s: float
    runs: int
    """Number of timed calls (the length of ``times_s``)."""
    warmup: int
    """Untimed calls made before timing (compile caches, allocator, lazy init)."""
    threads: int
    """``torch.get_num_threads()`` while timing."""
    device: str
    times_s: list[float]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (benchmark scripts write these)."""
        return asdict(self)

    @classmethod
    def from_times(cls, times_s: list[float], *, warmup: int, threads: int, device: str) -> LatencyResult:
        """Summarise raw per-call times."""
        if not times_s:
            raise ValueError("no timed runs: runs must be >= 1")
        return cls(
            median_s=statistics.median(times_s),
            mean_s=statistics.fmean(times_s),
            std_s=statistics.stdev(times_s) if len(times_s) > 1 else 0.0,
            min_s=min(times_s),
            runs=len(times_s),
            warmup=warmup,
            threads=threads,
            device=device,
            times_s=list(times_s),
        )


def speedup(baseline: LatencyResult, other: LatencyResult) -> float:
    """``baseline.median_s / other.median_s``: > 1 means ``other`` is faster."""
    return baseline.median_s / other.median_s


@contextmanager
def _num_threads(threads: int | None) -> Iterator[int]:
    """Set torch's intra-op thread count for the block and restore it after, even on error."""
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def _timed_call(fn: Callable[[], Any], cuda: bool) -> float:
    """One call, timed. CUDA is asynchronous, so we synchronise on both sides of the call;
    otherwise we would time the kernel launches, not the work."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _check_counts(warmup: int, runs: int, rounds: int = 1) -> None:
    if warmup < 0 or runs < 1 or rounds < 1:
        raise ValueError(f"need warmup >= 0, runs >= 1, rounds >= 1; got {warmup}, {runs}, {rounds}")


def measure_latency(
    fn: Callable[[], Any],
    *,
    warmup: int = 2,
    runs: int = 5,
    device: str | torch.device = "cpu",
    threads: int | None = None,
) -> LatencyResult:
    """Time ``fn()``: ``warmup`` untimed calls, then ``runs`` timed calls.

    Runs under ``torch.inference_mode()`` (no autograd bookkeeping, as in deployment).
    ``threads`` sets torch's thread count for the measurement only; ``None`` keeps the current one.
    """
    return compare_latency({"fn": fn}, warmup=warmup, runs=runs, device=device, threads=threads)["fn"]


def _round_order(names: list[str], round_idx: int) -> list[str]:
    """Rotate the order each round so no variant always runs right after the same neighbour."""
    shift = round_idx % len(names)
    return names[shift:] + names[:shift]


def compare_latency(
    fns: dict[str, Callable[[], Any]],
    *,
    warmup: int = 2,
    runs: int = 5,
    rounds: int = 1,
    device: str | torch.device = "cpu",
    threads: int | None = None,
) -> dict[str, LatencyResult]:
    """Time several variants interleaved, in one process.

    Every variant first gets ``warmup`` untimed calls (round-robin). Then, per round, the variants
    are called round-robin ``runs`` times (a, b, c, a, b, c, ...); each round rotates the starting
    variant (round 2: b, c, a, ...). Each result therefore holds ``runs * rounds`` timed calls.
    Report speedups as ``speedup(results["full"], results["subnet"])`` from the same call.
    """
    _check_counts(warmup, runs, rounds)
    if not fns:
        raise ValueError("fns is empty: pass at least one {name: callable}")
    names = list(fns)
    cuda = _is_cuda(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    with _num_threads(threads) as used_threads, torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                fns[n]()
        for r in range(rounds):
            order = _round_order(names, r)
            for _ in range(runs):
                for n in order:
                    times[n].append(_timed_call(fns[n], cuda))
    dev = str(torch.device(device))
    return {
        n: LatencyResult.from_times(times[n], warmup=warmup, threads=used_threads, device=dev) for n in names
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    It is a high-water mark over the whole process life: compare variants in fresh processes, or
    read it as an upper bound. ``ru_maxrss`` is KiB on Linux but bytes on macOS.
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return rss * scale / 2**20


def cuda_peak_mb(device: str | torch.device | None = None, *, reset: bool = False) -> float | None:
    """Peak CUDA memory allocated by torch on ``device``, in MiB; ``None`` without CUDA.

    ``reset=True`` resets the high-water mark after reading it, so the next reading covers only
    what runs in between.
    """
    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peak
