"""Optional short distillation fine-tune of a depth-pruned SubNet, progressive as in UPDP.

Removing blocks at once shifts every later block's input distribution. A progressive schedule
eases that: the closed blocks are not cut but faded out, ``x + g(t) (f(x) - x)`` with ``g`` going
linearly from 1 to 0 over the first ``anneal_fraction`` of the steps, while all weights train to
match the original model's outputs (the search's own distortion: KL for classifiers, cosine for
encoders) on the calibration pool. Once ``g`` reaches 0 the closed blocks are exactly identity,
so removing them physically afterwards changes nothing. Lightning runs the loop (same trainer
settings as the search), so it logs, checkpoints and runs on the same devices.
"""

from __future__ import annotations

import copy
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from dipgo.losses.distortion import DistortionConfig, distortion
from dipgo.postprocess.plan import Plan
from dipgo.search.config import FinetuneConfig


def fade(step: int, total: int, anneal_fraction: float) -> float:
    """Gate of the closed blocks at ``step``: 1 -> 0 linearly, then 0."""
    span = max(1, round(total * anneal_fraction))
    return max(0.0, 1.0 - step / span)


class _Fader:
    """Forward hooks that blend each closed block with its input by the current fade value."""

    def __init__(self, model: nn.Module, closed: list[str]):
        self.value = 1.0
        self.handles = [model.get_submodule(p).register_forward_hook(self._hook, with_kwargs=True) for p in closed]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        hidden = output if torch.is_tensor(output) else output[0]
        mixed = self.value * hidden + (1.0 - self.value) * x
        return mixed if torch.is_tensor(output) else (mixed, *output[1:])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class FinetuneModule(pl.LightningModule):
    """Trains a copy of the model (student) to match the frozen original (teacher)."""

    def __init__(self, teacher: nn.Module, plan: Plan, output_fn: Any, dist_cfg: DistortionConfig, cfg: FinetuneConfig):
        super().__init__()
        self.student = copy.deepcopy(teacher).train().requires_grad_(True)
        self._teacher = (teacher.eval(),)  # hidden from registration: frozen, not in checkpoints
        self.output_fn, self.dist_cfg, self.cfg = output_fn, dist_cfg, cfg
        closed = [b for b, keep in zip(plan.blocks, plan.compute[0], strict=True) if not keep]
        self.fader = _Fader(self.student, closed)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.fader.value = fade(int(self.global_step), self.cfg.steps, self.cfg.anneal_fraction)
        inputs = {k: v for k, v in batch.items() if k != "index"}
        with torch.no_grad():
            ref = self.output_fn(self._teacher[0], inputs)
        terms = distortion({"output": self.output_fn(self.student, inputs)}, {"output": ref}, self.dist_cfg)
        self.log_dict({"finetune/loss": terms["total"].detach(), "finetune/fade": torch.tensor(self.fader.value)},
                      on_step=True, batch_size=len(ref))
        return terms["total"]

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.AdamW(self.student.parameters(), lr=self.cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.cfg.steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def finetune_subnet(
    teacher: nn.Module, plan: Plan, pool: Any, output_fn: Any, dist_cfg: DistortionConfig, cfg: FinetuneConfig,
    *, accelerator: str = "cpu", seed: int = 0, logger: Any = False,
) -> nn.Module:
    """A full-depth copy of ``teacher`` whose closed blocks are faded to identity and whose other
    weights are distilled; remove the closed blocks from it (``remove_blocks``) to get the SubNet."""
    pl.seed_everything(seed, workers=True, verbose=False)
    module = FinetuneModule(teacher, plan, output_fn, dist_cfg, cfg)
    loader = DataLoader(pool, batch_size=min(cfg.batch_size, len(pool)), shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    trainer = pl.Trainer(max_steps=cfg.steps, max_epochs=-1, accelerator=accelerator, devices=1, logger=logger,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, log_every_n_steps=min(5, cfg.steps))
    trainer.fit(module, train_dataloaders=loader)
    module.fader.remove()
    student = module.student.eval().requires_grad_(False)
    return student.cpu()
