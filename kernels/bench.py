"""Benchmark of the block-sparse linear against every dense path (MKL, oneDNN) and torch's BSR matmul.

``scripts/bench_kernels.py`` is the command line; this module holds the logic so that tests and
post-processing can call it. Every ratio is a median of interleaved runs in one process
(:func:`dipgo.measure.latency.compare_latency`): the dense paths, ours and torch BSR alternate call
by call. Speed-ups are quoted against the *fastest* dense path measured (GitHub issue 14: on AMD
CPUs oneDNN's AVX-512 code beats MKL's ``F.linear``, so MKL alone would flatter the kernel).
"""

from __future__ import annotations

import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dipgo.kernels import native
from dipgo.kernels.baselines import dense_paths
from dipgo.kernels.layout import DEFAULT_BLOCK, BlockSparseWeight, block_mask_from_scores, check_block
from dipgo.kernels.modules import BlockSparseLinear
from dipgo.kernels.reference import activate, reference_block_sparse_linear
from dipgo.measure.latency import compare_latency
from dipgo.measure.machine import SIMD_FLAGS, cpu_model

# GitHub issues 5 and 14: speed-up over the fastest dense path at 2 threads the CPU kernel must reach.
TARGET_SPEEDUPS = {0.5: 1.5, 0.7: 2.5, 0.9: 6.0}
DEFAULT_SHAPES = ((768, 3072), (3072, 768))
DEFAULT_TOKENS = (256, 2048)
DEFAULT_SPARSITIES = (0.0, 0.5, 0.7, 0.9)


@dataclass
class KernelBenchRow:
    """One (tokens, layer shape, sparsity) point. Times are medians in milliseconds."""

    tokens: int
    in_features: int
    out_features: int
    sparsity: float
    """Fraction of blocks dropped (the requested value; ``density`` is what the mask really keeps)."""
    density: float
    block: tuple[int, int]
    activation: str
    dense_ms: float
    """The fastest dense path's time (``best_dense``)."""
    best_dense: str
    """``mkl`` (``F.linear``) or ``onednn`` (``torch.ops.mkldnn._linear_pointwise``)."""
    mkl_ms: float
    """``F.linear(x, W, b)`` (+ activation), dense weight: MKL on CPU."""
    onednn_ms: float | None
    """oneDNN's linear (+ activation) on the dense weight; ``None`` where torch has no oneDNN."""
    ours_ms: float
    """``BlockSparseLinear`` called as a SubNet calls it (eager: the native kernel without the dispatcher)."""
    torch_bsr_ms: float | None
    """``torch.addmm(b, W_bsr, x^T)^T`` (+ activation): torch's own block-sparse path (MKL sparse)."""
    speedup: float
    """``dense_ms / ours_ms``: against the fastest dense path."""
    speedup_vs_mkl: float
    bsr_speedup: float | None
    max_abs_err: float
    """Largest ``|ours - reference|``, the reference computed in float64."""
    max_rel_err: float
    """``max_abs_err / max |reference|``."""
    target: float | None
    """The issue's speed-up target at this sparsity (``None`` where it sets none)."""
    runs: int

    @property
    def meets_target(self) -> bool | None:
        return None if self.target is None else self.speedup >= self.target

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "block": list(self.block), "meets_target": self.meets_target}


def random_block_sparse(
    out_features: int, in_features: int, sparsity: float, block: tuple[int, int] = DEFAULT_BLOCK, seed: int = 0
) -> tuple[torch.Tensor, BlockSparseWeight]:
    """A random ``(out, in)`` weight pruned to random blocks: ``(dense masked weight, packed weight)``."""
    bn, bk = check_block(out_features, in_features, block)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    scores = torch.rand(out_features // bn, in_features // bk, generator=gen)
    packed = BlockSparseWeight.from_dense(weight, block_mask_from_scores(scores, sparsity))
    return packed.to_dense(), packed


def bench_point(
    tokens: int,
    in_features: int,
    out_features: int,
    sparsity: float,
    *,
    block: tuple[int, int] = DEFAULT_BLOCK,
    activation: str = "none",
    runs: int = 10,
    rounds: int = 2,
    warmup: int = 2,
    threads: int | None = None,
    with_bsr: bool = True,
    seed: int = 0,
) -> KernelBenchRow:
    """Time dense, ours and torch BSR at one point; check ours against the float64 reference."""
    dense_w, packed = random_block_sparse(out_features, in_features, sparsity, block, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen) * 0.1
    v, c, r = packed.values, packed.col_indices, packed.row_ptr

    fns = {f"dense:{name}": (lambda f=f: activate(f(), activation)) for name, f in dense_paths(x, dense_w, bias).items()}
    layer = BlockSparseLinear(packed, bias, activation)  # as a SubNet calls the kernel (eager fast path)
    # The dense paths are plain function calls, so ours is one too: nn.Module.__call__'s hook checks
    # (~30 us with cold caches) are paid by a SubNet's nn.Linear and BlockSparseLinear alike.
    fns["ours"] = lambda: layer.forward(x)
    if with_bsr:
        # torch at its best: values pre-transposed to BSR's block orientation, addmm, (T, N) view out
        bsr_values = v.transpose(1, 2).contiguous()  # (nnz, bn, bk)

        def torch_bsr() -> torch.Tensor:
            w = torch.sparse_bsr_tensor(r, c, bsr_values, size=(out_features, in_features), check_invariants=False)
            return activate(torch.addmm(bias[:, None], w, x.t()).t(), activation)

        fns["torch_bsr"] = torch_bsr
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
        times = compare_latency(fns, warmup=warmup, runs=runs, rounds=rounds, threads=threads)

    with torch.inference_mode():
        ours = layer(x).double()
        ref = reference_block_sparse_linear(x.double(), v.double(), c, r, bias.double(), activation)
    err = (ours - ref).abs().max().item()
    dense = {n.split(":", 1)[1]: t.median_s for n, t in times.items() if n.startswith("dense:")}
    best = min(dense, key=dense.__getitem__)
    dense_s, ours_s = dense[best], times["ours"].median_s
    bsr_s = times["torch_bsr"].median_s if with_bsr else None
    return KernelBenchRow(
        tokens=tokens, in_features=in_features, out_features=out_features, sparsity=sparsity,
        density=packed.density, block=packed.block, activation=activation,
        dense_ms=dense_s * 1e3, best_dense=best, mkl_ms=dense["mkl"] * 1e3,
        onednn_ms=dense["onednn"] * 1e3 if "onednn" in dense else None,
        ours_ms=ours_s * 1e3, torch_bsr_ms=None if bsr_s is None else bsr_s * 1e3,
        speedup=dense_s / ours_s, speedup_vs_mkl=dense["mkl"] / ours_s, bsr_speedup=None if bsr_s is None else dense_s / bsr_s,
        max_abs_err=err, max_rel_err=err / max(ref.abs().max().item(), 1e-30),
        target=TARGET_SPEEDUPS.get(round(sparsity, 4)), runs=times["ours"].runs,
    )


def cpu_busy_fraction(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over ``seconds`` (Linux ``/proc/stat``), sampled while this
    process sleeps: what other jobs use. The load average lags by minutes; this does not."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return None if total <= 0 else round(1.0 - (idle1 - idle0) / total, 3)


def _cpu_numbers() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("cpu family", "model", "stepping") and key not in out:
                out[key] = value.strip()
    except OSError:
        pass
    return out




def machine_info() -> dict[str, Any]:
    kernel = native.load()
    numbers = _cpu_numbers()
    return {
        "cpu": cpu_model(),
        "cpu_family": numbers.get("cpu family"),
        "cpu_model_number": numbers.get("model"),
        "simd_flags": [f for f in SIMD_FLAGS if f in native.cpu_flags()],
        "kernel_isa": None if kernel is None else kernel.isa,
        "kernel_isa_env": os.environ.get(native.ISA_ENV),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
        "onednn_max_cpu_isa_env": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "mkl_enable_instructions_env": os.environ.get("MKL_ENABLE_INSTRUCTIONS"),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "native_kernel": None if kernel is None else kernel.path.name,
        "native_tile_rows": None if kernel is None else kernel.tile_rows,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_busy_by_others": cpu_busy_fraction(),
    }


def format_table(rows: list[KernelBenchRow]) -> str:
    """Markdown table of the rows (what docs and the script print)."""
    head = ("| tokens | layer | sparsity | MKL ms | oneDNN ms | ours ms | torch BSR ms | ours x best dense | "
            "ours x MKL | BSR x | target | max abs err |\n"
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = [head]
    for r in rows:
        bsr = "-" if r.torch_bsr_ms is None else f"{r.torch_bsr_ms:.2f}"
        bsr_x = "-" if r.bsr_speedup is None else f"{r.bsr_speedup:.2f}"
        target = "-" if r.target is None else f"{r.target:g}x {'ok' if r.meets_target else 'MISSED'}"
        onednn = "-" if r.onednn_ms is None else f"{r.onednn_ms:.2f}"
        lines.append(
            f"| {r.tokens} | {r.in_features}->{r.out_features} | {r.sparsity:g} | {r.mkl_ms:.2f} | {onednn} | "
            f"{r.ours_ms:.2f} | {bsr} | {r.speedup:.2f} ({r.best_dense}) | {r.speedup_vs_mkl:.2f} | {bsr_x} | "
            f"{target} | {r.max_abs_err:.1e} |"
        )
    return "\n".join(lines)
