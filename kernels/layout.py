"""The block-sparse weight layout shared by every backend, the module and the saved files.

A weight ``W`` of shape ``(N, K)`` (``out_features x in_features``, as in ``nn.Linear``) is cut
into blocks of ``bn`` output rows by ``bk`` input columns. Only kept blocks are stored, in
block-CSR order (block rows top to bottom, kept blocks left to right within a block row):

- ``values``: ``(nnz_blocks, bk, bn)`` float, each block stored *k-major* (the transpose of the
  block as it sits in ``W``), because the CPU and GPU kernels read ``bn`` contiguous weights per
  input column;
- ``col_indices``: ``(nnz_blocks,)`` int32, the block column of each kept block;
- ``row_ptr``: ``(N / bn + 1,)`` int32, block row ``j`` owns ``values[row_ptr[j]:row_ptr[j+1]]``.

The pattern inside a kept block is free (zeros are stored as zeros), so an unstructured mask is
represented exactly by keeping every block that holds a nonzero; speed comes from the blocks
that are dropped. These are plain tensors (safetensors) plus a small JSON config; nothing is
pickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LAYOUT_VERSION = 1
BLOCK_ROWS = (16, 32, 64)
"""Block heights (output rows per block) the kernels support: multiples of the 16-float vector."""
DEFAULT_BLOCK = (32, 32)
"""``(bn, bk)``: 32 output rows x 32 input columns, the best speed/granularity trade-off measured
(docs/results/kernels.json)."""
ACTIVATIONS = ("none", "relu", "gelu")
"""Epilogues fused into the kernels; ``gelu`` is the exact (erf) GELU, as ``F.gelu``'s default."""


def _layer_name(out_features: int, in_features: int) -> str:
    return f"Linear({in_features} -> {out_features}), weight ({out_features}, {in_features})"


def check_block(out_features: int, in_features: int, block: tuple[int, int]) -> tuple[int, int]:
    """Validate a ``(bn, bk)`` block for a weight of shape ``(out_features, in_features)``.

    Raises ``ValueError`` with one sentence naming the layer shape and what is accepted.
    """
    try:
        bn, bk = (int(b) for b in block)
    except (TypeError, ValueError):
        raise ValueError(f"block must be a pair (rows, cols) of ints, got {block!r}") from None
    layer = _layer_name(out_features, in_features)
    if bn not in BLOCK_ROWS:
        raise ValueError(f"{layer}: block rows {bn} not supported; accepted block rows are {BLOCK_ROWS}.")
    if bk < 1:
        raise ValueError(f"{layer}: block columns must be >= 1, got {bk}.")
    if bn > out_features or bk > in_features:
        raise ValueError(
            f"{layer}: block ({bn}, {bk}) is larger than the weight; accepted blocks have rows in "
            f"{BLOCK_ROWS} dividing {out_features} and columns dividing {in_features}."
        )
    if out_features % bn:
        raise ValueError(
            f"{layer}: out_features {out_features} is not divisible by the block rows {bn}; "
            f"accepted block rows divide {out_features} (one of {BLOCK_ROWS})."
        )
    if in_features % bk:
        raise ValueError(
            f"{layer}: in_features {in_features} is not divisible by the block columns {bk}; "
            f"accepted block columns divide {in_features}."
        )
    return bn, bk


def check_sparsity(sparsity: float, out_features: int, in_features: int) -> float:
    """Sparsity is the fraction of blocks dropped: accepted in ``[0, 1)``."""
    s = float(sparsity)
    if not 0.0 <= s < 1.0:
        raise ValueError(
            f"{_layer_name(out_features, in_features)}: sparsity {sparsity} is outside [0, 1); "
            "it is the fraction of weight blocks dropped, so 0 keeps all and values below 1 keep some."
        )
    return s


def check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not supported; accepted: {', '.join(ACTIVATIONS)}.")
    return activation


def block_scores(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """L2 norm of every ``(bn, bk)`` block of ``weight``: ``(N / bn, K / bk)``, the default importance."""
    n, k = weight.shape
    bn, bk = check_block(n, k, block)
    w = weight.detach().float().reshape(n // bn, bn, k // bk, bk)
    return w.pow(2).sum(dim=(1, 3)).sqrt()


def block_mask_from_scores(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the ``round((1 - sparsity) * num_blocks)`` highest-scoring blocks (at least one).

    Ties are broken by position (stable), so the same scores always give the same mask.
    """
    nbr, nbc = scores.shape
    s = float(sparsity)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity {sparsity} is outside [0, 1); it is the fraction of blocks dropped.")
    total = nbr * nbc
    keep = max(1, min(total, round((1.0 - s) * total)))
    order = torch.argsort(scores.detach().float().flatten(), descending=True, stable=True)
    mask = torch.zeros(total, dtype=torch.bool)
    mask[order[:keep]] = True
    return mask.view(nbr, nbc)


@dataclass(frozen=True)
class BlockSparseWeight:
    """A ``(out_features, in_features)`` weight in block-CSR (see the module docstring)."""

    values: torch.Tensor
    """``(nnz_blocks, bk, bn)``: kept blocks, k-major."""
    col_indices: torch.Tensor
    """``(nnz_blocks,)`` int32: block column of each kept block."""
    row_ptr: torch.Tensor
    """``(out_features / bn + 1,)`` int32: kept blocks of block row j are ``row_ptr[j]:row_ptr[j+1]``."""
    out_features: int
    in_features: int

    @property
    def block(self) -> tuple[int, int]:
        """``(bn, bk)``: output rows x input columns per block."""
        return int(self.values.shape[2]), int(self.values.shape[1])

    @property
    def nnz_blocks(self) -> int:
        return int(self.values.shape[0])

    @property
    def num_blocks(self) -> int:
        bn, bk = self.block
        return (self.out_features // bn) * (self.in_features // bk)

    @property
    def density(self) -> float:
        """Fraction of blocks kept (the fraction of a dense layer's multiply-adds the kernel does)."""
        return self.nnz_blocks / self.num_blocks

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def validate(self) -> BlockSparseWeight:
        """Check shapes, dtypes and index ranges (kernels trust them: a bad index reads out of bounds)."""
        bn, bk = check_block(self.out_features, self.in_features, self.block)
        layer = _layer_name(self.out_features, self.in_features)
        nbr, nbc = self.out_features // bn, self.in_features // bk
        if self.values.dim() != 3:
            raise ValueError(f"{layer}: values must be (nnz_blocks, bk, bn), got shape {tuple(self.values.shape)}.")
        if self.col_indices.dtype != torch.int32 or self.row_ptr.dtype != torch.int32:
            raise ValueError(f"{layer}: col_indices and row_ptr must be int32 tensors.")
        if self.row_ptr.shape != (nbr + 1,) or self.col_indices.shape != (self.nnz_blocks,):
            raise ValueError(
                f"{layer}: expected row_ptr of {nbr + 1} entries and {self.nnz_blocks} col_indices, got "
                f"{tuple(self.row_ptr.shape)} and {tuple(self.col_indices.shape)}."
            )
        rp = self.row_ptr.cpu()
        if int(rp[0]) != 0 or int(rp[-1]) != self.nnz_blocks or bool((rp.diff() < 0).any()):
            raise ValueError(f"{layer}: row_ptr must rise from 0 to nnz_blocks={self.nnz_blocks}.")
        if self.nnz_blocks and not (0 <= int(self.col_indices.min()) and int(self.col_indices.max()) < nbc):
            raise ValueError(f"{layer}: col_indices must lie in [0, {nbc}).")
        return self

    @classmethod
    def from_dense(cls, weight: torch.Tensor, block_mask: torch.Tensor) -> BlockSparseWeight:
        """Pack the blocks of ``weight`` (N, K) where ``block_mask`` (N / bn, K / bk) is True.

        The block size is read from the two shapes. Entries of kept blocks are copied as they are
        (zeros inside a kept block stay zeros), dropped blocks are gone.
        """
        n, k = weight.shape
        nbr, nbc = block_mask.shape
        if nbr == 0 or nbc == 0 or n % nbr or k % nbc:
            raise ValueError(
                f"{_layer_name(n, k)}: block mask of shape {tuple(block_mask.shape)} does not tile the weight; "
                "accepted masks are (out_features / bn, in_features / bk)."
            )
        bn, bk = check_block(n, k, (n // nbr, k // nbc))
        mask = block_mask.to(device=weight.device, dtype=torch.bool)
        blocks = weight.detach().reshape(nbr, bn, nbc, bk).permute(0, 2, 3, 1)  # (nbr, nbc, bk, bn)
        rows, cols = mask.nonzero(as_tuple=True)  # row-major: block-CSR order
        values = blocks[rows, cols].contiguous()  # (nnz, bk, bn)
        counts = mask.sum(dim=1)
        row_ptr = torch.zeros(nbr + 1, dtype=torch.int32, device=weight.device)
        row_ptr[1:] = counts.cumsum(0).to(torch.int32)
        return cls(values, cols.to(torch.int32), row_ptr, n, k).validate()

    def block_mask(self) -> torch.Tensor:
        """``(N / bn, K / bk)`` bool: which blocks are stored."""
        bn, bk = self.block
        nbr, nbc = self.out_features // bn, self.in_features // bk
        rows = torch.repeat_interleave(
            torch.arange(nbr, device=self.row_ptr.device), self.row_ptr.diff().long()
        )
        mask = torch.zeros(nbr, nbc, dtype=torch.bool, device=self.row_ptr.device)
        mask[rows, self.col_indices.long()] = True
        return mask

    def to_dense(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight, dropped blocks as zeros."""
        return densify(self.values, self.col_indices, self.row_ptr, self.in_features)

    def to(self, *args: Any, **kwargs: Any) -> BlockSparseWeight:
        """Move/cast ``values`` (indices keep int32, move with the device)."""
        values = self.values.to(*args, **kwargs)
        dev = values.device
        return BlockSparseWeight(
            values, self.col_indices.to(dev), self.row_ptr.to(dev), self.out_features, self.in_features
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "col_indices": self.col_indices, "row_ptr": self.row_ptr}

    def config(self) -> dict[str, Any]:
        return {
            "format": "dipgo.block_sparse",
            "version": LAYOUT_VERSION,
            "out_features": self.out_features,
            "in_features": self.in_features,
            "block": list(self.block),
            "nnz_blocks": self.nnz_blocks,
            "density": self.density,
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> BlockSparseWeight:
        """Rebuild from :meth:`tensors` and :meth:`config` (e.g. read back from disk); validated."""
        if config.get("format") != "dipgo.block_sparse" or config.get("version") != LAYOUT_VERSION:
            raise ValueError(
                f"not a dipgo block-sparse config of version {LAYOUT_VERSION}: format={config.get('format')!r}, "
                f"version={config.get('version')!r}."
            )
        missing = {"values", "col_indices", "row_ptr"} - set(tensors)
        if missing:
            raise ValueError(f"block-sparse tensors are missing {sorted(missing)}.")
        w = cls(
            tensors["values"], tensors["col_indices"], tensors["row_ptr"],
            int(config["out_features"]), int(config["in_features"]),
        ).validate()
        if list(w.block) != list(config["block"]):
            raise ValueError(f"values hold blocks {w.block} but the config says {tuple(config['block'])}.")
        return w


def densify(values: torch.Tensor, col_indices: torch.Tensor, row_ptr: torch.Tensor, in_features: int) -> torch.Tensor:
    """Dense ``(N, K)`` weight from block-CSR tensors (pure PyTorch; the reference uses it)."""
    nnz, bk, bn = values.shape
    nbr, nbc = row_ptr.numel() - 1, in_features // bk
    rows = torch.repeat_interleave(torch.arange(nbr, device=values.device), row_ptr.diff().long(), output_size=nnz)
    dense = values.new_zeros(nbr, nbc, bk, bn)
    dense[rows, col_indices.long()] = values
    return dense.permute(0, 3, 1, 2).reshape(nbr * bn, nbc * bk)


def save_safetensors(tensors: dict[str, torch.Tensor], config: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json`` atomically (a failed write leaves old files intact).

    ``path`` is the common stem; a ``.safetensors`` or ``.json`` suffix on it is dropped. Returns the stem.
    """
    from safetensors.torch import save_file

    stem = _stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    for suffix, write in (
        (".safetensors", lambda p: save_file(plain, p)),
        (".json", lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n")),
    ):
        fd, tmp = tempfile.mkstemp(dir=stem.parent, prefix=stem.name, suffix=suffix + ".tmp")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, _with_suffix(stem, suffix))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return stem


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read what :func:`save_safetensors` wrote: ``(tensors, config)``."""
    from safetensors.torch import load_file

    stem = _stem(path)
    for suffix in (".safetensors", ".json"):
        if not _with_suffix(stem, suffix).is_file():
            raise FileNotFoundError(f"{_with_suffix(stem, suffix)} not found: expected a .safetensors + .json pair.")
    tensors = load_file(str(_with_suffix(stem, ".safetensors")))
    return tensors, json.loads(_with_suffix(stem, ".json").read_text())


def _stem(path: str | os.PathLike) -> Path:
    """``path`` without a ``.safetensors``/``.json`` suffix (other dots, as in ``blocks.0.fc1``, stay)."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".safetensors", ".json") else p


def _with_suffix(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)
