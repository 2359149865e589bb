"""A progress bar over optimisation steps, not epochs.

A search is a fixed number of pruner steps (``trainer.max_steps``); epochs only mark where
checkpoints land. Lightning's bar restarts every epoch and shows ``Epoch 3/-2``, so we keep one
bar from step 0 to ``max_steps`` (starting where a resumed run left off) with the loss and the
expected cost beside it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar
from tqdm import tqdm

if TYPE_CHECKING:
    from dipgo.models.registry import LoadedModel
    from dipgo.supernets.gates import SuperNet


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


def describe_search(cfg: Any, loaded: LoadedModel, supernet: SuperNet) -> str:
    """One paragraph printed before the first pruner step: what is about to run.

    A search spends its first seconds caching the model's reference outputs and its first
    minute or more without visible output on a small CPU; saying what runs, and how much of it,
    tells the user that nothing is frozen.
    """
    kinds = sorted({s.kind for s in supernet.slots})
    target = float(cfg.search.target)
    budget = "kept density" if cfg.supernet.kind == "mask" else ("kept latency" if cfg.supernet.cost == "latency" else "kept MACs")
    model = f"{type(loaded.model).__name__} ({cfg.model.name})"
    lora = (getattr(loaded, "extra", None) or {}).get("lora")
    if lora is not None:
        model += f" with {lora.describe()}"
    sampler = ""
    if cfg.supernet.kind in ("reuse", "joint") and str(loaded.kind).startswith("diffusion"):
        sampler = f", {cfg.supernet.num_steps}-step {cfg.supernet.scheduler} sampling"
    after = "then the plan is refined on calibration data and the report measures it" if cfg.search.refine.enabled \
        else "then the report measures the plan"
    return (f"dipgo search: {cfg.recipe_name}: {len(supernet.slots)} {'/'.join(kinds)} gates on {model}{sampler}; "
            f"{cfg.trainer.max_steps} pruner steps of batch {cfg.data.batch_size} towards {target:g} {budget}; "
            f"{after}. Time estimate after the first step.")


class FirstStepEstimate(pl.Callback):
    """Prints how long the pruner steps will take, from the duration of the first timed steps.

    The first step also builds caches (reference outputs of the first batch), so the estimate
    uses the steps after it when there are any: ``estimate_after`` steps are timed, the first one
    excluded, and the remaining steps are extrapolated from their mean. Printed with
    ``tqdm.write`` so the step bar stays intact.
    """

    def __init__(self, estimate_after: int = 3, printer: Any = tqdm.write) -> None:
        self.estimate_after = max(1, estimate_after)
        self.printer = printer
        self._times: list[float] = []
        self._t0 = 0.0
        self._done = False

    def on_train_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        if self._done:
            return
        self._times.append(time.perf_counter() - self._t0)
        timed = self._times[1:] if len(self._times) > 1 else self._times
        left = trainer.max_steps - trainer.global_step
        if len(self._times) < min(self.estimate_after, trainer.max_steps) and left > 0:
            return
        self._done = True
        per_step = sum(timed) / len(timed)
        self.printer(f"dipgo search: {per_step:.2f} s per pruner step here: about {format_duration(per_step * left)} "
                     f"for the remaining {left} of {trainer.max_steps} steps (refinement and report come after)")


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``"1 min 15 s"``; under a minute ``"42 s"``."""
    seconds = max(0, round(seconds))
    minutes, secs = divmod(seconds, 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"
