"""Should a pruned layer run on the block-sparse kernel or stay dense? A cheap first guess.

Nothing ships on this estimate alone: :mod:`dipgo.kernels.decide` times every candidate layer on
the converting machine and only uses this model to skip timing layers it calls hopeless. It must
not build or time anything, so it is a small cost model whose constants come from
``scripts/bench_kernels.py`` runs (docs/results/kernels.json) on a 2-thread AVX-512 CPU:

    t_dense = max(macs / R, weight_bytes / BW) + c_dense
    t_ours  = max(density * macs / (R * E), density * weight_bytes / BW) + output_bytes / BW + c_ours

``R`` is MKL's dense rate, ``E`` how much faster the native kernel runs a dense pattern than MKL
(the kernel uses 512-bit vectors where MKL, on AMD CPUs, does not), ``BW`` the rate at which a
weight streams from memory (what bounds a few-token call; writing the output costs the sparse
kernel the same at any sparsity), ``c_*`` fixed per-call costs (the custom-op dispatch and ctypes
call are the larger one). It predicts the benchmark's 768/3072 points within about 1.5x. Only ratios matter, so ``R`` and ``BW``
need not match the machine exactly. Without the native kernel the fallback is torch's BSR matmul,
slower than dense except at very high sparsity. The CUDA numbers are an unmeasured guess
(no GPU was available when this was written): expect a speed-up only from 60 % sparsity on.
"""

from __future__ import annotations

from dipgo.kernels import native
from dipgo.kernels.layout import DEFAULT_BLOCK, check_block, check_sparsity

DENSE_MACS_PER_S = 45e9
"""MKL fp32 multiply-adds per second per thread (measured: ~90 GFLOP/s per thread)."""
WEIGHT_BYTES_PER_S = 10e9
"""Weight bytes per second per thread when a call is bound by reading the weight (few tokens;
measured ~20 GB/s for a 9.4 MB weight at 2 threads)."""
DENSE_CALL_S = 5e-6
"""Fixed cost of one ``F.linear`` call (measured: 5-6 us for a 256 x 256 layer at 1 token)."""
NATIVE_CALL_S = 14e-6
"""Fixed cost of one custom-op call into the native kernel (measured: 14-17 us at 1 token)."""
NATIVE_EFFICIENCY_AVX512 = 2.0
"""Native kernel on a dense pattern vs MKL, AVX-512 CPU: measured 1.8-2.1x at 256-2048 tokens on the
2026-11-22 host, 1.05-1.41x on the Zen 4 of 2026-12-06 (docs/results/kernels.json; oneDNN, the bar
there, runs 10-25 % faster than MKL). Kept high on purpose: an optimistic guess only makes
:mod:`dipgo.kernels.decide` time a layer it could have skipped, never ship one untimed."""
NATIVE_EFFICIENCY_OTHER = 1.0
"""Without AVX-512: the AVX2 build (6x16 tiles) vs MKL. Measured on an AVX2-only AMD EPYC Zen 3
on a dense pattern: 0.90-1.10x of MKL at 256-2048 tokens (docs/results/kernels_zen3_avx2.json);
the forced AVX2 build on the AVX-512 Zen 4 ran at 0.99-1.14x of MKL (kernels_avx2.json). It only
decides which layers are worth timing (:mod:`dipgo.kernels.decide` times the rest)."""
BSR_EFFICIENCY = 0.3
"""torch's BSR matmul vs MKL dense on a dense pattern (measured 0.2-0.5x)."""
GPU_BREAK_EVEN_DENSITY = 0.4


def estimated_speedup(
    shape: tuple[int, int],
    sparsity: float,
    block: tuple[int, int] = DEFAULT_BLOCK,
    *,
    tokens: int = 256,
    device: str = "cpu",
    threads: int = 2,
) -> float:
    """Estimated ``dense time / block-sparse time`` for a weight of ``shape = (out, in)``.

    ``sparsity`` is the fraction of ``block``-sized blocks dropped; ``tokens`` the rows of ``x``
    per call (batch x sequence). Raises ``ValueError`` for a block or sparsity the kernels refuse.
    """
    out_f, in_f = shape
    bn, bk = check_block(out_f, in_f, block)
    density = max(1.0 - check_sparsity(sparsity, out_f, in_f), bn * bk / (out_f * in_f))
    if device.startswith("cuda"):
        return (1.0 - GPU_BREAK_EVEN_DENSITY) / density if density < 1 else 0.9
    macs = float(tokens) * out_f * in_f
    rate = DENSE_MACS_PER_S * threads
    weight_s = 4.0 * out_f * in_f / (WEIGHT_BYTES_PER_S * threads)
    output_s = 4.0 * tokens * out_f / (WEIGHT_BYTES_PER_S * threads)  # writing y: sparsity does not shrink it
    dense = max(macs / rate, weight_s) + DENSE_CALL_S
    if native.compiler_available():
        eff = NATIVE_EFFICIENCY_AVX512 if native.has_avx512() else NATIVE_EFFICIENCY_OTHER
        eff *= min(1.0, bk / 16)  # narrow blocks: more block overhead per multiply-add
        eff *= 0.7 if bn == 16 else 1.0  # one vector per row: loads, not FMAs, bound (measured ~0.7x of 32)
        ours = max(density * macs / (rate * eff), density * weight_s) + output_s + NATIVE_CALL_S
    else:
        ours = max(density * macs / (rate * BSR_EFFICIENCY), density * weight_s) + output_s + NATIVE_CALL_S
    return dense / ours


def kernel_speedup_expected(
    shape: tuple[int, int],
    sparsity: float,
    block: tuple[int, int] = DEFAULT_BLOCK,
    *,
    tokens: int = 256,
    device: str = "cpu",
    threads: int = 2,
    min_speedup: float = 1.2,
) -> bool:
    """True when converting a layer to :class:`~dipgo.kernels.BlockSparseLinear` should pay:
    :func:`estimated_speedup` reaches ``min_speedup`` (a margin for the model's error)."""
    return estimated_speedup(shape, sparsity, block, tokens=tokens, device=device, threads=threads) >= min_speedup
