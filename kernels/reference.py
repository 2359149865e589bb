"""Pure-PyTorch implementations of the block-sparse linear: the reference and the fallback.

``reference_block_sparse_linear`` rebuilds the dense weight and calls ``F.linear``: obviously
correct, no speed-up; tests compare every backend against it. ``torch_block_sparse_linear`` is what
runs when no native or Triton kernel can: torch's own BSR matmul where it exists for the dtype,
the reference otherwise.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from dipgo.kernels.layout import densify


def activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    """The fused epilogue, unfused: ``none``, ``relu`` or exact (erf) ``gelu``."""
    if activation == "relu":
        return F.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    return y


def reference_block_sparse_linear(
    x: torch.Tensor,  # (..., K)
    values: torch.Tensor,  # (nnz, bk, bn)
    col_indices: torch.Tensor,  # (nnz,) int32
    row_ptr: torch.Tensor,  # (N / bn + 1,) int32
    bias: torch.Tensor | None,  # (N,)
    activation: str = "none",
) -> torch.Tensor:  # (..., N)
    """``act(x @ W^T + b)`` with ``W`` densified from the block-CSR tensors."""
    weight = densify(values.to(x.dtype), col_indices, row_ptr, x.shape[-1])
    return activate(F.linear(x, weight, None if bias is None else bias.to(x.dtype)), activation)


def _bsr_supported(x: torch.Tensor, block: tuple[int, int]) -> bool:
    if x.device.type == "cpu":  # MKL sparse: fp32/fp64, square blocks only
        return x.dtype in (torch.float32, torch.float64) and block[0] == block[1]
    return x.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def torch_block_sparse_linear(
    x: torch.Tensor,  # (T, K)
    values: torch.Tensor,
    col_indices: torch.Tensor,
    row_ptr: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:  # (T, N)
    """Fallback without a dipgo kernel: ``W @ x^T`` with ``W`` as a torch BSR tensor.

    ``torch.mm(bsr, dense)`` (``addmm`` with a bias) is torch's fast sparse path (``F.linear(x, bsr)`` is several times
    slower on CPU). The BSR tensor wraps the stored tensors and is built inside the call, because a
    sparse tensor made outside ``torch.inference_mode`` cannot be used inside it. Where torch has
    no BSR matmul (CPU half precision, non-square blocks on CPU) this is the reference.
    """
    _, bk, bn = values.shape
    if not _bsr_supported(x, (bn, bk)):
        return reference_block_sparse_linear(x, values, col_indices, row_ptr, bias, activation)
    n, k = (row_ptr.numel() - 1) * bn, x.shape[-1]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
        weight = torch.sparse_bsr_tensor(
            row_ptr, col_indices, values.to(x.dtype).transpose(1, 2).contiguous(), size=(n, k),
            check_invariants=False,
        )
    if bias is None:
        y = torch.mm(weight, x.t()).t()  # (T, N), transposed strides
    else:
        y = torch.addmm(bias.to(x.dtype)[:, None], weight, x.t()).t()
    return activate(y, activation).contiguous()
