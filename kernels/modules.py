"""``BlockSparseLinear``: a kernel-backed drop-in for a masked ``nn.Linear`` (+ activation).

Post-processing converts a pruned layer with :meth:`BlockSparseLinear.from_dense`, exports it with
:meth:`~BlockSparseLinear.save` (safetensors + JSON) and reloads it with
:meth:`~BlockSparseLinear.load` or with ``load_state_dict`` into any ``BlockSparseLinear`` of the
same layer shape (the stored block count may differ: the buffers take the loaded shapes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dipgo.kernels.layout import (
    DEFAULT_BLOCK,
    BlockSparseWeight,
    block_mask_from_scores,
    block_scores,
    check_activation,
    check_block,
    check_sparsity,
    load_safetensors,
    save_safetensors,
)
from dipgo.kernels.ops import block_sparse_linear, eager_fast_path_ok, prepare_eager_call

_BUFFERS = ("values", "col_indices", "row_ptr")


def _block_mask(
    weight: torch.Tensor,
    mask_or_block_scores: torch.Tensor | None,
    sparsity: float | None,
    block: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masked weight, block mask)`` from what the caller has (see ``from_dense``)."""
    n, k = weight.shape
    bn, bk = check_block(n, k, block)
    grid = (n // bn, k // bk)
    m = mask_or_block_scores
    if m is not None and m.dtype == torch.bool and tuple(m.shape) == (n, k):
        if sparsity is not None:
            raise ValueError(f"Linear({k} -> {n}): pass an element mask or a sparsity, not both.")
        masked = weight * m.to(weight.device)
        return masked, m.reshape(grid[0], bn, grid[1], bk).any(dim=3).any(dim=1)
    if m is not None and m.dtype == torch.bool and tuple(m.shape) == grid:
        if sparsity is not None:
            raise ValueError(f"Linear({k} -> {n}): pass a block mask or a sparsity, not both.")
        return weight, m
    if m is not None and m.is_floating_point() and tuple(m.shape) == grid:
        scores = m
    elif m is None:
        scores = block_scores(weight, (bn, bk))
    else:
        raise ValueError(
            f"Linear({k} -> {n}) with blocks ({bn}, {bk}): mask_or_block_scores of shape {tuple(m.shape)} and "
            f"dtype {m.dtype} not understood; accepted are a bool element mask {(n, k)}, a bool block mask "
            f"{grid}, float block scores {grid} (with sparsity), or None (block L2 norms, with sparsity)."
        )
    if sparsity is None:
        raise ValueError(f"Linear({k} -> {n}): block scores need a sparsity in [0, 1) to choose blocks.")
    return weight, block_mask_from_scores(scores, check_sparsity(sparsity, n, k))


class BlockSparseLinear(nn.Module):
    """``act(x @ W^T + bias)`` with ``W`` stored block-sparse; runs ``dipgo::block_sparse_linear``.

    All state is buffers (``values``, ``col_indices``, ``row_ptr``, ``bias``): the module is for
    inference, like the kernels.
    """

    def __init__(self, weight: BlockSparseWeight, bias: torch.Tensor | None = None, activation: str = "none") -> None:
        super().__init__()
        weight.validate()
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.activation = check_activation(activation)
        for name, tensor in weight.tensors().items():
            self.register_buffer(name, tensor)
        if bias is not None and tuple(bias.shape) != (weight.out_features,):
            raise ValueError(f"bias must have shape ({weight.out_features},), got {tuple(bias.shape)}.")
        self.register_buffer("bias", None if bias is None else bias.detach().to(weight.values.dtype))

    # --- conversion -------------------------------------------------------------------------------

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        mask_or_block_scores: torch.Tensor | None = None,
        *,
        sparsity: float | None = None,
        block: tuple[int, int] = DEFAULT_BLOCK,
        activation: str = "none",
    ) -> BlockSparseLinear:
        """Convert ``linear`` (followed by ``activation``, which the kernel fuses).

        ``mask_or_block_scores`` is one of:

        - a bool element mask of the weight's shape: the weight is multiplied by it and every block
          holding a kept entry is stored (exact for any pattern; fast when whole blocks are zero);
        - a bool block mask ``(out / bn, in / bk)``: the blocks to keep;
        - float block scores ``(out / bn, in / bk)`` with ``sparsity``: keep the top-scoring blocks;
        - ``None`` with ``sparsity``: keep the blocks with the largest L2 norm.
        """
        weight = linear.weight.detach()
        masked, mask = _block_mask(weight, mask_or_block_scores, sparsity, block)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(BlockSparseWeight.from_dense(masked, mask), bias, activation)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the same function (dropped blocks as zeros; the activation is not included)."""
        w = self.weight.to_dense()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @property
    def weight(self) -> BlockSparseWeight:
        return BlockSparseWeight(self.values, self.col_indices, self.row_ptr, self.out_features, self.in_features)

    @property
    def block(self) -> tuple[int, int]:
        return self.weight.block

    @property
    def density(self) -> float:
        return self.weight.density

    # --- forward ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if x.shape[-1] == self.in_features and eager_fast_path_ok(x):
            # The buffers were validated when built or loaded; the kernel call is prepared once per
            # buffer set (and after native.reset()). Plain dict reads: nn.Module attribute lookups
            # cost ~2 us each, per call.
            b, state = self._buffers, self.__dict__
            values, cols, row_ptr, bias = b["values"], b["col_indices"], b["row_ptr"], b["bias"]
            call = state.get("_eager_call")
            if call is None or not call.current(values, cols, row_ptr, bias):
                call = prepare_eager_call(values, cols, row_ptr, bias, self.in_features, self.out_features,
                                          self.activation)
                state["_eager_call"] = call  # None: this buffer set takes the op (checked again next call)
            if call is not None:
                return call(x)
        return block_sparse_linear(x, self.values, self.col_indices, self.row_ptr, self.bias, self.activation)

    def __getstate__(self) -> dict[str, Any]:
        # the prepared call holds ctypes handles: never pickled or deep-copied (it is rebuilt on use)
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        return {k: v for k, v in state.items() if k != "_eager_call"}

    def extra_repr(self) -> str:
        bn, bk = self.block
        return (f"in_features={self.in_features}, out_features={self.out_features}, block=({bn}, {bk}), "
                f"density={self.density:.3f}, bias={self.bias is not None}, activation={self.activation}")

    # --- state ------------------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # The number of stored blocks is data, not architecture: take the incoming shapes.
        for name in (*_BUFFERS, "bias"):
            key = prefix + name
            if key in state_dict and (getattr(self, name) is None
                                      or getattr(self, name).shape != state_dict[key].shape):
                current = getattr(self, name)
                device = current.device if current is not None else self.values.device
                setattr(self, name, torch.empty_like(state_dict[key], device=device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if not error_msgs:
            self.weight.validate()

    def config(self) -> dict[str, Any]:
        """JSON-able description: the layout config plus the module's own fields."""
        return {**self.weight.config(), "activation": self.activation, "bias": self.bias is not None}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<path>.safetensors`` (the buffers) and ``<path>.json`` (:meth:`config`); returns the stem."""
        return save_safetensors(self.state_dict(), self.config(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> BlockSparseLinear:
        """Rebuild a module written by :meth:`save` (no pickle: safetensors + JSON)."""
        tensors, config = load_safetensors(path)
        weight = BlockSparseWeight.from_tensors(tensors, config)
        if config.get("bias") and "bias" not in tensors:
            raise ValueError(f"{path}: the config says the layer has a bias but the tensors hold none.")
        module = cls(weight, tensors.get("bias"), config.get("activation", "none"))
        return module.to(device)
