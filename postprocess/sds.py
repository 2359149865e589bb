"""SDS (Sparse-Dense-Sparse): prune, re-dense with a sparse regulariser, prune again.

One-shot pruning decides the mask from weights that were trained dense: the weights it removes
carried part of the function, and the OBS update plus distillation can only redistribute that
part over the weights the *first* mask kept. SDS gives the model a second chance to arrive at a
weight distribution that suits the mask it will finally get:

1. **Sparse** (first prune): dipgo's own prune, :func:`dipgo.postprocess.mask_subnet.prune_with_plan`
   without SDS (OBS reconstruction + distillation at the plan's per-layer densities). It is the
   starting point because it is already a good approximation of the dense model at the target
   sparsity, and its mask is the best available guess of which weights will be pruned again.
2. **Dense** (re-dense): the pruned connections are re-activated and *all* weights (and biases)
   of the masked layers are trained towards the dense model's outputs on the calibration batches
   (the distillation objective of :func:`dipgo.postprocess.reconstruct.distill_kept_weights`:
   ``1 - cosine + relative MSE``). The extra capacity lets the kept weights move to where they
   work with the re-activated ones, and lets a re-activated weight that the data clearly needs
   grow back, so that the second prune may keep it instead of a weaker kept one.

   *Initialisation*: re-activated entries start at **zero**, not at their original values. The
   first prune's OBS update and distillation have already moved the kept weights to compensate
   for the removed ones; putting the original values back would count that contribution twice.
   From zero, step 2 starts exactly at the step-1 model (its loss is the first prune's loss) and
   only moves away where the gradient says so.

   *Sparse regulariser*: an L1 penalty on the entries the first prune removed (the ones expected
   to be pruned again), applied as a proximal step after every Adam step: each such entry shrinks
   towards zero by ``l1 * lr_t`` (soft threshold, exact zeros possible). Since Adam moves a weight
   by about ``lr_t * |m / sqrt(v)|`` per step, ``l1`` reads as a signal-to-noise threshold: an
   entry grows back only where its normalised gradient is consistently above ``l1``; gradient
   noise (``|m / sqrt(v)|`` about 0.23 for Adam's default betas on pure noise) is held at zero.
   So the re-densed model stays pruning-friendly: what step 3 removes is close to zero already.
   The kept entries are not penalised (penalising them would only cost fidelity).
3. **Sparse** (second prune): the re-densed model is pruned again at the *same* per-layer densities
   and pattern: saliency re-computed on the re-densed weights (magnitude or Wanda with the
   supernet's input norms; block patterns choose their mask from it, unstructured and N:M choose
   it jointly with the OBS update, as in the first prune), then OBS reconstruction and the
   configured distillation towards the *dense* model's outputs.

``rounds`` repeats steps 2-3 (each round re-densifies the previous round's result). The result is
``(model, keep masks)`` like ``prune_with_plan``'s, so kernels and export are unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dipgo.postprocess.reconstruct import prune_once, train_masked_layers
from dipgo.postprocess.settings import SDSConfig, SDSError, sds_refusal  # noqa: F401  (re-exported)

OutputFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def redense(model: nn.Module, masks: dict[str, torch.Tensor], batches: list[dict[str, torch.Tensor]],
            references: list[torch.Tensor], output_fn: OutputFn, *, steps: int, lr: float,
            l1: float) -> list[float]:
    """Step 2, in place: train all weights (and biases) of the masked layers of ``model``.

    The entries outside ``masks`` are re-activated from their current value (zero after a prune)
    and pulled towards zero by a proximal L1 step of ``l1 * lr_t`` after every Adam step. Returns
    the distillation loss per step; the model is left frozen in eval mode.
    """
    if sds_refusal(steps, lr, l1, 1) is not None:
        raise SDSError(sds_refusal(steps, lr, l1, 1))
    if not masks:
        return []
    weights = []
    for p, m in masks.items():
        mod = model.get_submodule(p)
        weights.append((mod.weight, ~m.reshape(mod.weight.shape).to(mod.weight.device)))

    def shrink(lr_t: float) -> None:
        if l1 <= 0:
            return
        with torch.no_grad():
            for w, pruned in weights:
                shrunk = w.sign() * (w.abs() - l1 * lr_t).clamp(min=0)
                w.copy_(torch.where(pruned, shrunk, w))

    return train_masked_layers(model, list(masks), batches, references, output_fn, steps=steps, lr=lr,
                               after_step=shrink)


def resaliency(model: nn.Module, layers: list[str], kind: str, norms: dict[str, torch.Tensor] | None,
               batches: list[dict[str, torch.Tensor]], output_fn: OutputFn) -> dict[str, torch.Tensor]:
    """Saliency of the (re-densed) weights: ``|W|`` or Wanda's ``|W| * ||X_j||``.

    Wanda uses ``norms`` (the supernet's calibration input norms) where given, else measures them
    on ``model``.
    """
    from dipgo.supernets.mask import input_norms, saliency_of

    if kind == "wanda" and (norms is None or any(p not in norms for p in layers)):
        norms = {**input_norms(model, layers, batches, output_fn), **(norms or {})}
    return {p: saliency_of(model.get_submodule(p), kind, (norms or {}).get(p)) for p in layers}


def sds_prune(dense: nn.Module, first: nn.Module, masks: dict[str, torch.Tensor], plan: Any,
              batches: list[dict[str, torch.Tensor]], output_fn: OutputFn, config: SDSConfig, *,
              references: list[torch.Tensor] | None = None, norms: dict[str, torch.Tensor] | None = None,
              reconstruct: bool = True, distill_steps: int = 0,
              distill_lr: float = 1e-4) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Steps 2-3 (``config.rounds`` times) after the first prune ``(first, masks)`` of ``dense``.

    ``first`` is not modified. Returns ``(pruned model, keep masks)`` at the plan's densities and
    pattern. ``references``: the dense model's outputs on ``batches`` (computed when omitted).
    """
    if references is None:
        with torch.no_grad():
            references = [output_fn(dense, b) for b in batches]
    kind = str(plan.meta.get("saliency", "magnitude"))
    model = first
    for _ in range(config.rounds):
        model = copy.deepcopy(model)
        redense(model, masks, batches, references, output_fn, steps=config.steps, lr=config.lr, l1=config.l1)
        saliency = resaliency(model, list(masks), kind, norms, batches, output_fn)
        model, masks = prune_once(model, plan, saliency, batches, output_fn, references, reconstruct=reconstruct,
                                  distill_steps=distill_steps, distill_lr=distill_lr)
    return model, masks
