"""Sparse kernels for SubNets: ``dipgo::block_sparse_linear`` and the module that calls it.

- :func:`block_sparse_linear` / ``torch.ops.dipgo.block_sparse_linear``: ``act(x @ W^T + b)`` with
  a block-sparse ``W`` (native AVX-512/AVX2 kernel on CPU, Triton on CUDA, PyTorch fallback);
- :class:`BlockSparseWeight`: the block-CSR layout (plain tensors + JSON config);
- :class:`BlockSparseLinear`: ``from_dense(nn.Linear, mask_or_block_scores)``, ``to_dense()``,
  ``save``/``load`` (safetensors + JSON);
- :func:`dipgo.kernels.decide.decide_layer`: should a layer run on the kernel, timed on this
  machine against the fastest dense path (:func:`kernel_speedup_expected`, the cost model, is
  only its first guess).
"""

from dipgo.kernels.heuristics import estimated_speedup, kernel_speedup_expected
from dipgo.kernels.layout import (
    ACTIVATIONS,
    DEFAULT_BLOCK,
    BlockSparseWeight,
    block_mask_from_scores,
    block_scores,
)
from dipgo.kernels.modules import BlockSparseLinear
from dipgo.kernels.ops import block_sparse_linear
from dipgo.kernels.reference import reference_block_sparse_linear

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_BLOCK",
    "BlockSparseLinear",
    "BlockSparseWeight",
    "block_mask_from_scores",
    "block_scores",
    "block_sparse_linear",
    "estimated_speedup",
    "kernel_speedup_expected",
    "reference_block_sparse_linear",
]
