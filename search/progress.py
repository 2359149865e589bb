"""A progress bar over optimisation steps, not epochs.

A search is a fixed number of pruner steps (``trainer.max_steps``); epochs only mark where
checkpoints land. Lightning's bar restarts every epoch and shows ``Epoch 3/-2``, so we keep one
bar from step 0 to ``max_steps`` (starting where a resumed run left off) with the loss and the
expected cost beside it.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """TQDM bar whose total is ``trainer.max_steps`` and whose position is ``global_step``."""

    def on_train_start(self, trainer: pl.Trainer, *_: Any) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("dipgo search")

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        """Deliberately keep the bar across epochs."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        bar.n = trainer.global_step
        bar.set_postfix(self._compact(self.get_metrics(trainer, pl_module)), refresh=False)
        bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing to close: the bar lives until the end of training."""

    @staticmethod
    def _compact(metrics: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in metrics.items() if k != "v_num"}
