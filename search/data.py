"""Calibration data as LightningDataModules, counter-based so that a resumed search is exact.

Every item is a pure function of ``(seed, index)``: noises are drawn from a generator seeded by
the pool index, and the pool items of optimisation step ``k`` are a pure function of ``(seed, k)`` (see
:class:`StepSampler`), so a run resumed from its last checkpoint sees exactly the batches an
uninterrupted run would have seen. Each item carries its pool ``index`` so the search module
can cache the original model's outputs per item (the reference trajectory is computed once).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def _generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from several integers (order matters, no collisions in practice)."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class NoisePool(Dataset):
    """A fixed pool of Gaussian noises (and class labels) for a denoiser's calibration.

    Item ``i``: ``{"index": i, "noise": (C, H, W), "class_labels": ()}`` (labels only when the
    model is class-conditional; they cycle through the classes so every class is covered).
    """

    def __init__(self, size: int, shape: tuple[int, ...], seed: int, num_classes: int | None = None):
        self.size, self.shape, self.seed, self.num_classes = size, tuple(shape), seed, num_classes

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        noise = torch.randn(self.shape, generator=_generator(self.seed, 17, index))  # (C, H, W)
        item = {"index": torch.tensor(index), "noise": noise}
        if self.num_classes:
            item["class_labels"] = torch.tensor(index % self.num_classes)
        return item


class StepSampler(Sampler[int]):
    """Pool indices for optimisation steps, as a pure function of the global step.

    Step ``k`` takes stream positions ``k*B .. k*B+B-1``; position ``p`` is item
    ``perm(seed, p // pool)[p % pool]``, so every pool item is visited once per pass, in an
    order seeded by the pass. Each iteration starts at the trainer's *current* global step, read
    when Lightning opens the dataloader (after a checkpoint is restored), so a resumed search
    sees exactly the batches an uninterrupted one would have, whatever Lightning's epoch
    bookkeeping does on a mid-epoch restart.

    Under DDP ``batch_size`` is the *global* batch and rank ``r`` of ``W`` yields its slice
    ``r*B/W .. (r+1)*B/W - 1`` of each step's positions, so the W processes together see exactly
    the batch one process would (Lightning's DistributedSampler is switched off for this).
    """

    def __init__(
        self,
        pool_size: int,
        batch_size: int,
        steps: int,
        seed: int,
        current_step: Callable[[], int],
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size % world_size:
            from dipgo.errors import ConfigError

            raise ConfigError(
                f"data.batch_size={batch_size} is the global batch and must be divisible by the {world_size} "
                "DDP processes (trainer.devices x trainer.num_nodes)"
            )
        self.pool_size, self.batch_size, self.steps, self.seed = pool_size, batch_size, steps, seed
        self.current_step = current_step
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size

    def __len__(self) -> int:
        return self.steps * self.local_batch

    def _order(self, rounds: int) -> list[int]:
        return torch.randperm(self.pool_size, generator=_generator(self.seed, 29, rounds)).tolist()

    def __iter__(self) -> Iterator[int]:
        first = self.current_step()
        mine = range(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)  # this rank's slice
        orders: dict[int, list[int]] = {}  # one permutation per pass over the pool
        out = []
        for step in range(first, first + self.steps):
            for j in mine:
                rounds, offset = divmod(step * self.batch_size + j, self.pool_size)
                if rounds not in orders:
                    orders[rounds] = self._order(rounds)
                out.append(orders[rounds][offset])
        return iter(out)


class CalibrationDataModule(pl.LightningDataModule):
    """Wraps any pool Dataset into epoch-seeded batches (diffusion noise, images, text)."""

    def __init__(self, pool: Dataset, batch_size: int, steps_per_epoch: int, seed: int, num_workers: int = 0):
        super().__init__()
        self.pool, self.batch_size, self.seed = pool, batch_size, seed
        self.steps_per_epoch, self.num_workers = steps_per_epoch, num_workers

    def _global_step(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_step) if trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        """Step-seeded batches; under DDP each rank gets its slice of the global ``batch_size``
        (the Trainer runs with ``use_distributed_sampler=False``)."""
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = StepSampler(len(self.pool), self.batch_size, self.steps_per_epoch, self.seed, self._global_step,
                              rank=rank, world_size=world)
        return DataLoader(
            self.pool,
            batch_size=sampler.local_batch,
            sampler=sampler,
            num_workers=self.num_workers,
            drop_last=True,
        )


def diffusion_datamodule(
    sample_shape: tuple[int, ...], num_classes: int | None, data_cfg: Any, seed: int
) -> CalibrationDataModule:
    """The DataModule for denoisers: noise of ``sample_shape`` (C, H, W) + optional class labels."""
    pool = NoisePool(data_cfg.pool_size, sample_shape, seed, num_classes)
    return CalibrationDataModule(pool, data_cfg.batch_size, data_cfg.steps_per_epoch, seed, data_cfg.num_workers)


def eval_batch(sample_shape: tuple[int, ...], num: int, num_classes: int | None, seed: int) -> dict[str, torch.Tensor]:
    """A fixed evaluation batch (same noise for full model, plans and baselines)."""
    pool = NoisePool(num, sample_shape, seed + 100_003, num_classes)
    items = [pool[i] for i in range(num)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class ImagePool(Dataset):
    """Calibration images for classifiers: the first ``size`` images of a fixed shuffle of the
    digits training split (never the test split the report evaluates on).

    Item ``i``: ``{"index": i, "images": (C, H, W)}``.
    """

    def __init__(self, images: torch.Tensor, size: int, seed: int):
        order = torch.randperm(len(images), generator=_generator(seed, 61))[: min(size, len(images))]
        self.images = images[order].contiguous()  # (P, C, H, W)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(index), "images": self.images[index]}


class TextPool(Dataset):
    """Calibration sentences for text encoders, tokenised once to a fixed length so batches stack.

    Item ``i``: ``{"index": i, "input_ids": (T,), "attention_mask": (T,)}``.
    """

    def __init__(self, sentences: list[str], tokenizer: Any, size: int, max_length: int):
        chosen = sentences[: min(size, len(sentences))]
        enc = tokenizer(chosen, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        self.input_ids, self.attention_mask = enc["input_ids"], enc["attention_mask"]  # (P, T)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(index), "input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index]}


def image_datamodule(images: torch.Tensor, data_cfg: Any, seed: int) -> CalibrationDataModule:
    """The DataModule for image classifiers: a fixed pool of training images."""
    pool = ImagePool(images, data_cfg.pool_size, seed)
    return CalibrationDataModule(pool, data_cfg.batch_size, data_cfg.steps_per_epoch, seed, data_cfg.num_workers)


def text_datamodule(sentences: list[str], tokenizer: Any, data_cfg: Any, seed: int) -> CalibrationDataModule:
    """The DataModule for text encoders: a fixed pool of tokenised training sentences."""
    pool = TextPool(sentences, tokenizer, data_cfg.pool_size, data_cfg.max_length)
    return CalibrationDataModule(pool, data_cfg.batch_size, data_cfg.steps_per_epoch, seed, data_cfg.num_workers)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool items -> one batch, like the DataLoader does: tensors stacked, nested dicts (SDXL's
    ``added_cond_kwargs``) stacked key by key (torch's ``default_collate``)."""
    from torch.utils.data import default_collate

    return default_collate(items)


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], tree: Any) -> Any:
    """``fn`` applied to every tensor of a batch, through nested dicts (move, slice, index)."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: map_tensors(fn, v) for k, v in tree.items()}
    return tree
