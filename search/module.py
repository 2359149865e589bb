"""The LightningModule that trains the pruner network while the SuperNet stays frozen.

One optimisation step: the pruner turns its slot queries into two-way logits; straight-through
Gumbel-softmax samples hard gates (forward = a real SubNet, backward = soft gradients); the
SuperNet runs with those gates; the loss is the distortion against the original model's cached
output plus a controlled cost penalty that drives the expected kept-MACs ratio to the target.

The SuperNet is held outside ``nn.Module`` registration on purpose: checkpoints then hold the
pruner alone (kilobytes, not the denoiser), and the frozen weights never reach the optimiser.
Randomness is counter-based (Gumbel noise seeded by ``(seed, global_step)``), so a search
resumed from a checkpoint ends with the same plan as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from dipgo.losses.cost import CostConfig, CostController, cost_loss
from dipgo.losses.distortion import DistortionConfig, distortion
from dipgo.search.config import config_of
from dipgo.search.data import _generator, collate, map_tensors
from dipgo.search.pruner import PrunerConfig, PrunerNetwork, gumbel_gates, keep_probs, temperature
from dipgo.supernets.gates import SuperNet


class SearchModule(pl.LightningModule):
    """Trains a :class:`PrunerNetwork` over the slots of a frozen :class:`SuperNet`."""

    def __init__(
        self,
        supernet: SuperNet,
        search_cfg: DictConfig,
        *,
        seed: int,
        max_steps: int,
        pool: Any = None,
        ref_chunk: int = 8,
    ):
        super().__init__()
        self._supernet = (supernet,)  # a tuple hides it from nn.Module registration
        self.search_cfg = search_cfg
        self.seed, self.max_steps = seed, max_steps
        self.target = float(search_cfg.target)
        self.pruner_cfg: PrunerConfig = config_of(PrunerConfig, search_cfg.pruner)
        self.distortion_cfg: DistortionConfig = config_of(DistortionConfig, search_cfg.distortion)
        self.cost_cfg: CostConfig = config_of(CostConfig, search_cfg.cost)
        self.pruner = PrunerNetwork(supernet.slots, self.pruner_cfg, grid=getattr(supernet, "grid_shape", None))
        prior = getattr(supernet, "prior_keep", None)  # the kind's static schedule at the target
        if self.pruner_cfg.init == "prior" and prior is not None:
            self.pruner.start_at(prior(self.target))
        self.controller = CostController(self.cost_cfg)
        self._ref_cache: dict[int, dict[str, torch.Tensor]] = {}
        self._pool, self._ref_chunk = pool, ref_chunk
        self._last_expected, self._last_target = 1.0, self.target
        # saved in checkpoints, so a resumed run divides by exactly the same number
        self.register_buffer("distortion_scale_buffer", torch.zeros(()), persistent=True)

    @property
    def supernet(self) -> SuperNet:
        return self._supernet[0]

    # ---- the pruner's view -------------------------------------------------------------------
    def logits(self, target: float | None = None) -> torch.Tensor:
        """Current gate logits ``(N, 2)`` for ``target`` (budget-conditioned pruners) or the configured one."""
        if not self.pruner_cfg.budget_conditioned:
            return self.pruner()
        return self.pruner(torch.tensor(self.target if target is None else target, device=self.device))

    @torch.no_grad()
    def keep_probabilities(self, target: float | None = None) -> torch.Tensor:
        """``(N,)`` keep probabilities after training, input to post-processing."""
        return keep_probs(self.logits(target)).float().cpu()

    def step_target(self, step: int) -> float:
        """The budget of optimisation step ``step``: the configured target, or for a
        budget-conditioned pruner one drawn uniformly from ``search.target_range`` (counter-seeded,
        so a resumed run draws the same budgets), so one pruner learns plans for the whole range."""
        low_high = self.search_cfg.get("target_range") if self.pruner_cfg.budget_conditioned else None
        if not low_high:
            return self.target
        low, high = float(low_high[0]), float(low_high[1])
        u = float(torch.rand((), generator=_generator(self.seed, 59, step)))
        return low + (high - low) * u

    # ---- training ----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Move the (unregistered) frozen model to the module's device; Lightning only moves the pruner."""
        model = getattr(self.supernet, "model", None)
        if isinstance(model, torch.nn.Module):
            model.to(self.device)

    @torch.no_grad()
    def _calibrate_distortion_scale(self) -> None:
        """Distortion of random hard gates at the target on the first pool items: the loss unit.

        The cost controller works for distortions of order 0.1-1; an MSE of final samples can be
        1e-4 or 10 depending on the model. Dividing by what a random plan at the budget costs
        makes one config fit every model. Counter-seeded, so a resumed run gets the same scale.
        """
        if self.distortion_scale_buffer.item() > 0:
            return
        n = min(len(self._pool), self._ref_chunk) if self._pool is not None else 0
        if n == 0:
            self.distortion_scale_buffer.fill_(1.0)
            return
        items = [self._pool[i] for i in range(n)]
        batch = map_tensors(lambda t: t.to(self.device), collate(items))
        reference = self._reference(batch)
        gen = _generator(self.seed, 53)
        gates = (torch.rand(len(self.supernet.slots), generator=gen) < self.target).float().to(self.device)
        soft = getattr(self.supernet, "soft_slots", None)  # joint search: densities at the target, not 0/1
        if soft is not None:
            gates = torch.where(soft.to(self.device), torch.full_like(gates, self.target), gates)
        gated = self.supernet.gated({k: v for k, v in batch.items() if k != "index"}, gates)
        value = float(distortion(gated, reference, self.distortion_cfg)["total"])
        self.distortion_scale_buffer.fill_(max(value, 1e-12))

    @property
    def distortion_scale(self) -> float:
        return float(self.distortion_scale_buffer.item()) if self.distortion_scale_buffer.item() > 0 else 1.0

    def on_train_start(self) -> None:
        """Compute the original model's outputs for the whole calibration pool, in pool order.

        Fixed chunks in a fixed order make the cached references bit-identical whether a run is
        fresh or resumed (batched kernels may round differently for other batch groupings).
        """
        if self._pool is None:
            return
        self._calibrate_distortion_scale()
        todo = [i for i in range(len(self._pool)) if i not in self._ref_cache]
        for start in range(0, len(todo), self._ref_chunk):
            items = [self._pool[i] for i in todo[start : start + self._ref_chunk]]
            batch = map_tensors(lambda t: t.to(self.device), collate(items))
            self._reference(batch)

    def _reference(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Original-model outputs for the batch, computed once per calibration item and cached."""
        indices = batch["index"].tolist()
        missing = [i for i, idx in enumerate(indices) if idx not in self._ref_cache]
        if missing:
            sub = {k: map_tensors(lambda t: t[missing], v) for k, v in batch.items() if k != "index"}
            with torch.no_grad():
                ref = self.supernet.reference(sub)
            for j, i in enumerate(missing):
                self._ref_cache[indices[i]] = {k: _item(v, j, k) for k, v in ref.items()}
        keys = self._ref_cache[indices[0]].keys()
        return {k: _stack([self._ref_cache[idx][k] for idx in indices], k) for k in keys}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        step = int(self.global_step)
        target = self.step_target(step)
        logits = self.logits(target)  # (N, 2)
        tau = temperature(step, self.max_steps, self.pruner_cfg)
        gen = _generator(self.seed, 41, step)
        soft = getattr(self.supernet, "soft_slots", None)  # joint search: (N,) bool, True = a density
        if getattr(self.supernet, "gate_mode", "hard") == "soft":  # mask kind: gates are densities
            gates = keep_probs(logits)  # (N,)
        else:
            gates = gumbel_gates(logits, tau, self.pruner_cfg.hard, gen).to(logits.dtype)  # (N,)
            if soft is not None:
                gates = torch.where(soft.to(gates.device), keep_probs(logits), gates)  # (N,)
        reference = self._reference(batch)
        inputs = {k: v for k, v in batch.items() if k != "index"}
        gated = self.supernet.gated(inputs, gates)
        terms = distortion(gated, reference, self.distortion_cfg)
        probs = keep_probs(logits)  # (N,)
        expected = self.supernet.expected_cost(probs)
        lam = self.controller.value
        penalty = cost_loss(expected, target, 1.0, self.cost_cfg.mode, delta=self.cost_cfg.delta)
        scaled = terms["total"] / self.distortion_scale
        loss = scaled + lam * penalty + self.pruner.regularizer(logits)
        self._last_expected, self._last_target = float(expected.detach()), target

        hard_cost = self.supernet.expected_cost((probs > 0.5).to(probs.dtype))
        log = {f"loss/{k}": v.detach() for k, v in terms.items()}
        log.update(
            {
                "loss/cost_penalty": penalty.detach(),
                "loss/distortion_scaled": scaled.detach(),
                "loss/total": loss.detach(),
                "cost/expected": expected.detach(),
                "cost/hard_at_0.5": hard_cost.detach(),
                "cost/target": torch.tensor(target),
                "cost/lambda": torch.tensor(lam),
                "gates/mean_keep_prob": probs.mean().detach(),
                "gates/frac_closed_sampled": (gates < 0.5).float().mean(),
                "gates/frac_undecided": ((probs > 0.1) & (probs < 0.9)).float().mean(),
                "tau": torch.tensor(tau),
            }
        )
        self.log_dict(log, on_step=True, prog_bar=False, batch_size=int(batch["index"].shape[0]))
        self.log("cost", expected.detach(), prog_bar=True, logger=False, on_step=True, batch_size=1)
        self.log("dist", scaled.detach(), prog_bar=True, logger=False, on_step=True, batch_size=1)
        return loss

    def on_train_batch_end(self, *args: Any) -> None:
        """The multiplier for the next step follows this step's expected cost (after the optimiser step)."""
        self.controller.update(self._last_expected, self._last_target)

    def configure_optimizers(self) -> dict[str, Any]:
        """Adam with cosine decay: a decaying step lets the gates settle on the budget at the end."""
        opt = torch.optim.Adam(
            self.pruner.parameters(), lr=float(self.search_cfg.lr), weight_decay=float(self.search_cfg.weight_decay)
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.max_steps), eta_min=0.05 * float(self.search_cfg.lr))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- exact resume: the controller's multiplier is state too --------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dipgo_cost_controller"] = self.controller.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "dipgo_cost_controller" in checkpoint:
            self.controller.load_state_dict(checkpoint["dipgo_cost_controller"])


def _item(value: torch.Tensor, j: int, key: str) -> torch.Tensor:
    """Slice item ``j`` out of a batched reference output (``eps`` is step-major: ``(S, B, ...)``)."""
    return value[:, j].clone() if key == "eps" else value[j].clone()


def _stack(values: list[torch.Tensor], key: str) -> torch.Tensor:
    return torch.stack(values, dim=1 if key == "eps" else 0)
