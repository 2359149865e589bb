"""Layer-wise reconstruction: prune a layer and update its kept weights to compensate (OBS).

For a linear layer ``y = W x`` and calibration inputs ``X`` ``(tokens, in)``, removing weight
``w_qj`` and moving the others by the Optimal Brain Surgeon step keeps ``||W X^T - W' X^T||``
smallest: with ``H = X^T X + damping`` and ``U`` the upper Cholesky factor of ``H^-1``, column
``j`` is quantised to its mask, the error ``e = (w_j - w'_j) / U_jj`` is pushed onto the columns
after it (``W[:, j+1:] -= e U[j, j+1:]``), one column after the other (SparseGPT's lazy-batched
order). The mask is either given (the plan's block pattern) or chosen on the fly per column block
by the OBS score ``w^2 / U_jj^2`` at the layer's density (unstructured) or per group of ``M``
inputs (N:M), which is SparseGPT's joint mask selection.

:func:`sequential_reconstruct` runs it layer group by layer group (a transformer layer at a
time), collecting ``H`` from the already-pruned model, so later layers correct earlier errors.
:func:`distill_kept_weights` then tunes the kept weights end to end towards the dense model's
outputs on calibration data (masks fixed): the distillation half of the loss.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dipgo.postprocess.plan import MaskPayload, Plan
from dipgo.supernets.mask import Pattern, density_mask, parse_pattern, weight_matrix

OutputFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


@torch.no_grad()
def obs_prune(weight: torch.Tensor, hessian: torch.Tensor, density: float, pattern: Pattern,
              mask: torch.Tensor | None = None, blocksize: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pruned weight, bool keep mask)`` of ``weight`` ``(out, in)`` given ``H`` ``(in, in)``.

    ``mask``: a fixed keep mask; otherwise chosen per column block (unstructured) or per ``M``
    inputs (N:M) by the OBS score. Block patterns need ``mask`` (chosen by the caller on block
    saliency, since a block spans columns of several OBS steps).
    """
    w = weight.detach().clone().float()  # (O, I)
    o, i = w.shape
    h = hessian.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(i, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # (I, I) upper
    if mask is not None:
        return masked_solve(w, h, mask.bool()), mask.clone().bool()
    if pattern.blocked:
        raise ValueError("obs_prune: block patterns need a precomputed mask")
    keep = torch.ones_like(w, dtype=torch.bool)
    for c0 in range(0, i, blocksize):
        c1 = min(c0 + blocksize, i)
        wb = w[:, c0:c1].clone()  # (O, B)
        err = torch.zeros_like(wb)
        hb = hinv[c0:c1, c0:c1]  # (B, B)
        if mask is None and pattern.kind == "unstructured":
            score = wb.pow(2) / torch.diag(hb).pow(2)[None, :]
            k = int(round((1.0 - density) * score.numel()))
            if k > 0:
                thr = score.flatten().kthvalue(k).values
                keep[:, c0:c1] = score > thr
        for j in range(c1 - c0):
            col = c0 + j
            if mask is None and pattern.kind == "nm" and col % pattern.m == 0:
                sc = wb[:, j:j + pattern.m].pow(2) / torch.diag(hb)[j:j + pattern.m].pow(2)[None, :]
                top = sc.topk(pattern.n, dim=1).indices
                keep[:, col:col + pattern.m] = torch.zeros_like(sc, dtype=torch.bool).scatter_(1, top, True)
            q = wb[:, j] * keep[:, col]
            e = (wb[:, j] - q) / hb[j, j]
            wb[:, j:] -= e[:, None] * hb[j, j:][None, :]
            wb[:, j] = q
            err[:, j] = e
        w[:, c0:c1] = wb
        w[:, c1:] -= err @ hinv[c0:c1, c1:]
    return w * keep, keep


def masked_solve(w: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact layer-wise least squares for a fixed mask: per row, ``w'_K = w_K + w_P H_PK H_KK^-1``.

    Minimises ``(w' - w) H (w' - w)^T`` with the pruned entries ``P`` at zero. Rows sharing one
    mask (all rows of a block row) share one solve. ``h`` is already damped.
    """
    out = torch.zeros_like(w)
    patterns, inverse = torch.unique(mask, dim=0, return_inverse=True)
    for u in range(patterns.shape[0]):
        rows = (inverse == u).nonzero().flatten()
        k, p = patterns[u], ~patterns[u]
        if not k.any():
            continue
        wk = w[rows][:, k]
        if p.any():
            rhs = w[rows][:, p] @ h[p][:, k]  # (R, |K|)
            wk = wk + torch.linalg.solve(h[k][:, k], rhs.T).T
        out[rows.unsqueeze(1), k.nonzero().flatten().unsqueeze(0)] = wk
    return out


def _hessians(model: nn.Module, layers: list[str], batches: list[dict[str, torch.Tensor]],
              output_fn: OutputFn) -> dict[str, torch.Tensor]:
    """``X^T X / tokens`` of each layer's inputs over the calibration batches (current weights)."""
    acc: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}

    def hook_for(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float()
            if isinstance(module, nn.Conv2d):
                x = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
                x = x.transpose(1, 2).reshape(-1, x.shape[1])  # (B * L, C k k)
            else:
                x = x.reshape(-1, x.shape[-1])  # (tokens, in)
            acc[path] = acc.get(path, 0) + x.T @ x
            count[path] = count.get(path, 0) + x.shape[0]

        return hook

    handles = [model.get_submodule(p).register_forward_pre_hook(hook_for(p)) for p in layers]
    try:
        with torch.no_grad():
            for b in batches:
                output_fn(model, b)
    finally:
        for h in handles:
            h.remove()
    return {p: acc[p] / max(count[p], 1) for p in acc}


def layer_groups(layers: list[str]) -> list[list[str]]:
    """Consecutive layers sharing a parent up to a numbered container (``encoder.layer.3``)."""
    groups: list[list[str]] = []
    key_prev = None
    for p in layers:
        parts = p.split(".")
        idx = next((k for k, s in enumerate(parts) if s.isdigit()), len(parts) - 1)
        key = ".".join(parts[: idx + 1])
        if key != key_prev:
            groups.append([])
            key_prev = key
        groups[-1].append(p)
    return groups


@torch.no_grad()
def sequential_reconstruct(model: nn.Module, layers: list[str], densities: dict[str, float], pattern: Pattern,
                           batches: list[dict[str, torch.Tensor]], output_fn: OutputFn,
                           fixed_masks: dict[str, torch.Tensor] | None = None,
                           update: bool = True) -> dict[str, torch.Tensor]:
    """Prune ``layers`` of ``model`` in place, group by group; returns the keep masks.

    ``update=False`` only chooses the OBS masks without moving the kept weights (an ablation).
    Layers at density 1 are left untouched.
    """
    masks: dict[str, torch.Tensor] = {}
    fixed_masks = fixed_masks or {}
    for group in layer_groups(layers):
        todo = [p for p in group if densities.get(p, 1.0) < 1.0]
        if not todo:
            continue
        hess = _hessians(model, todo, batches, output_fn)
        for p in todo:
            mod = model.get_submodule(p)
            w = weight_matrix(mod)
            new, keep = obs_prune(w, hess[p], densities[p], pattern, mask=fixed_masks.get(p))
            if not update:
                new = w.detach().float() * keep
            mod.weight.copy_(new.reshape(mod.weight.shape).to(mod.weight.dtype))
            masks[p] = keep
    return masks


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place."""
    with torch.no_grad():
        for p, m in masks.items():
            mod = model.get_submodule(p)
            mod.weight.mul_(m.reshape(mod.weight.shape).to(mod.weight))


def distill_loss(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``1 - cosine + MSE / mean(ref^2)``: direction and scale of the outputs, both unit-free."""
    return (1 - nn.functional.cosine_similarity(out, ref, dim=-1)).mean() + \
        nn.functional.mse_loss(out, ref) / ref.pow(2).mean().clamp(min=1e-12)


def train_masked_layers(model: nn.Module, layers: list[str], batches: list[dict[str, torch.Tensor]],
                        references: list[torch.Tensor], output_fn: OutputFn, *, steps: int, lr: float,
                        after_step: Callable[[float], None]) -> list[float]:
    """Adam (cosine decay) on the weights and biases of ``layers`` towards ``references`` with
    :func:`distill_loss`; ``after_step(lr_of_that_step)`` runs after every optimiser step (re-zero
    the pruned weights, or shrink them). Returns the loss per step; the model is left frozen in eval mode.
    """
    params = []
    for p in layers:
        mod = model.get_submodule(p)
        params += [mod.weight] + ([mod.bias] if mod.bias is not None else [])
    flags = [(q, q.requires_grad) for q in model.parameters()]
    model.requires_grad_(False)
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    losses = []
    model.eval()
    try:
        for step in range(steps):
            i = step % len(batches)
            loss = distill_loss(output_fn(model, batches[i]), references[i].detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lr_t = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            after_step(lr_t)
            losses.append(float(loss.detach()))
    finally:
        for q, flag in flags:
            q.requires_grad_(flag)
        model.requires_grad_(False)
    return losses


def distill_kept_weights(model: nn.Module, masks: dict[str, torch.Tensor], batches: list[dict[str, torch.Tensor]],
                         references: list[torch.Tensor], output_fn: OutputFn, *, steps: int = 100,
                         lr: float = 1e-4) -> list[float]:
    """Tune the kept weights (and biases) of the masked layers towards the dense outputs.

    Loss: :func:`distill_loss` of ``output_fn`` against ``references`` (the dense model's outputs
    on the same batches); masks stay fixed (pruned weights are re-zeroed after every step).
    Returns the loss per step. The model is left frozen in eval mode.
    """
    if steps <= 0 or not masks:
        return []
    return train_masked_layers(model, list(masks), batches, references, output_fn, steps=steps, lr=lr,
                               after_step=lambda _lr: apply_masks(model, masks))


def block_masks(model: nn.Module, layers: list[str], densities: dict[str, float], pattern: Pattern,
                saliency: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep masks for block patterns (chosen on block saliency before the OBS update).

    ``block``: the globally most salient blocks of each layer; ``rowblock``: the same number of
    most salient column blocks in every block-row (:func:`~dipgo.supernets.mask.rowblock_mask`).
    """
    return {p: density_mask(saliency[p], densities[p], pattern) for p in layers if densities.get(p, 1.0) < 1.0}


def prune_once(model: nn.Module, plan: Plan, saliency: dict[str, torch.Tensor],
               batches: list[dict[str, torch.Tensor]], output_fn: OutputFn,
               references: list[torch.Tensor] | None, *, reconstruct: bool = True, distill_steps: int = 0,
               distill_lr: float = 1e-4) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """One prune of a copy of ``model``: masks at the plan's densities, OBS update, distillation of
    the kept weights towards ``references`` (the dense model's outputs on ``batches``)."""
    payload = MaskPayload.from_meta(plan.meta)
    pattern = parse_pattern(payload.pattern)
    pruned = copy.deepcopy(model).eval().requires_grad_(False)
    dens = payload.pruned(plan.blocks)
    layers = [p for p in plan.blocks if p in dens]
    fixed = block_masks(pruned, layers, dens, pattern, saliency) if pattern.blocked else None
    masks = sequential_reconstruct(pruned, layers, dens, pattern, batches, output_fn, fixed_masks=fixed,
                                   update=reconstruct)
    if distill_steps > 0:
        if references is None:
            raise ValueError("prune_once: distillation needs the dense model's outputs (references)")
        distill_kept_weights(pruned, masks, batches, references, output_fn, steps=distill_steps, lr=distill_lr)
    apply_masks(pruned, masks)
    return pruned, masks
