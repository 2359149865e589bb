"""Triton block-sparse linear for GPUs (also runs on CPU tensors in Triton's interpreter).

One program computes a ``BM x bn`` tile of ``y``: rows ``pid_m * BM ..`` of block row ``j``. It
walks the kept blocks of block row ``j`` (``row_ptr[j] .. row_ptr[j+1]``), loads the ``BM x bk``
slice of ``x`` at each block's column and the ``bk x bn`` block (stored k-major, so the load is
row-major), accumulates ``tl.dot`` in fp32, then adds the bias, applies the activation and stores
once. ``tl.dot`` needs every tile side >= 16 and powers of two, hence :func:`supported`.

Interpreter mode: triton 3.x reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function,
i.e. when this module is imported. With ``TRITON_INTERPRET=1`` in the environment before the first
``import dipgo.kernels.triton_kernels``, :func:`triton_block_sparse_linear` runs on CPU tensors
(tests do this in a subprocess).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships with torch on Linux; elsewhere the GPU path is simply absent
    triton = None
    tl = None

ACT_CODES = {"none": 0, "relu": 1, "gelu": 2}


def available() -> bool:
    return triton is not None


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


def supported(x: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether the Triton kernel handles these inputs (otherwise callers fall back to PyTorch)."""
    if triton is None or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if x.device.type != "cuda" and not interpreting():
        return False
    _, bk, bn = values.shape
    return bk >= 16 and bk & (bk - 1) == 0 and bn in (16, 32, 64)


if triton is not None:

    @triton.jit
    def _block_sparse_linear_kernel(
        x_ptr, values_ptr, cols_ptr, row_ptr_ptr, bias_ptr, y_ptr,
        T, stride_xm, stride_ym,
        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        j = tl.program_id(1)  # block row
        rows = pid_m * BM + tl.arange(0, BM)
        row_ok = rows < T
        rows = rows.to(tl.int64)  # rows * stride can pass 2**31 for long inputs
        offs_k = tl.arange(0, BK)
        offs_n = tl.arange(0, BN)
        start = tl.load(row_ptr_ptr + j)
        end = tl.load(row_ptr_ptr + j + 1)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for b in range(start, end):
            col = tl.load(cols_ptr + b)
            x_tile = tl.load(
                x_ptr + rows[:, None] * stride_xm + (col * BK + offs_k)[None, :], mask=row_ok[:, None], other=0.0
            )  # (BM, BK)
            w_tile = tl.load(values_ptr + b * (BK * BN) + offs_k[:, None] * BN + offs_n[None, :])  # (BK, BN)
            acc += tl.dot(x_tile, w_tile, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + j * BN + offs_n).to(tl.float32)[None, :]
        if ACT == 1:
            acc = tl.maximum(acc, 0.0)
        elif ACT == 2:
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        out = y_ptr + rows[:, None] * stride_ym + (j * BN + offs_n)[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None])


def triton_block_sparse_linear(
    x: torch.Tensor,  # (T, K), unit stride in K
    values: torch.Tensor,  # (nnz, bk, bn), same dtype as x
    col_indices: torch.Tensor,  # (nnz,) int32
    row_ptr: torch.Tensor,  # (N / bn + 1,) int32
    bias: torch.Tensor | None,  # (N,)
    activation: str,
) -> torch.Tensor:  # (T, N)
    """Launch the kernel; inputs must satisfy :func:`supported` (indices are trusted)."""
    if not supported(x, values):
        raise ValueError(
            f"the Triton kernel takes float32/16/bf16 CUDA tensors (or CPU ones with TRITON_INTERPRET=1) and "
            f"blocks with rows in (16, 32, 64) and power-of-two columns >= 16; got {x.dtype} on {x.device}, "
            f"blocks {tuple(values.shape[1:][::-1])}."
        )
    rows = x.shape[0]
    _, bk, bn = values.shape
    block_rows = row_ptr.numel() - 1
    y = torch.empty(rows, block_rows * bn, dtype=x.dtype, device=x.device)
    if rows == 0 or block_rows == 0:
        return y
    bm = 16 if rows <= 16 else 32 if rows <= 32 else 64
    # fp32 inputs follow torch's matmul setting (TF32 only where torch would use it too);
    # half-precision inputs take triton's default.
    precision = None
    if x.dtype == torch.float32:
        precision = "tf32" if x.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    grid = (triton.cdiv(rows, bm), block_rows)
    _block_sparse_linear_kernel[grid](
        x, values, col_indices, row_ptr, bias if bias is not None else y, y,
        rows, x.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, ACT=ACT_CODES[activation], PRECISION=precision,
        BM=bm, BN=bn, BK=bk,
    )
    return y
