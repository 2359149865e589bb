"""``dipgo bench`` for a mask plan: the dense model against its SubNet on the block-sparse kernels.

What is timed is what the search report times, minus the weight tuning: the configured model is
loaded and wrapped (:meth:`dipgo.search.mask_task.MaskTask.build`, for the layers, costs and
saliency), every planned layer gets the keep mask its pattern and plan density give on that
saliency (:func:`dipgo.supernets.mask.density_mask`; for block and rowblock patterns these are
exactly the SubNet's masks, for unstructured / N:M the SubNet's OBS selection may pick other
weights at the same count), and the weights are only zeroed: no OBS reconstruction, no
distillation. Timing does not depend on the values of the kept weights, only on which blocks are
kept, so this is the SubNet's speed without minutes of reconstruction. Masked Linears measured
faster on the kernel than on the fastest dense path (timed here, at this batch's token count:
:func:`dipgo.postprocess.mask_subnet.to_kernels`) run on :class:`dipgo.kernels.BlockSparseLinear`,
the others stay dense with zeros; the lines printed say per layer what was chosen and the ratio. Dense and SubNet are timed interleaved in one process
(:func:`dipgo.measure.latency.compare_latency`) on one held-out batch; as a correctness check the
kernel SubNet's output is compared with the masked dense model's on that batch (``max_abs_diff``).
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from dipgo.errors import PlanError
from dipgo.measure.latency import compare_latency, speedup
from dipgo.postprocess.plan import MaskPayload, Plan

if TYPE_CHECKING:
    from dipgo.supernets.mask import MaskSuperNet


def plan_masks(supernet: MaskSuperNet, plan: Plan) -> dict[str, torch.Tensor]:
    """``{layer: bool keep mask (out, in)}`` of every planned layer below density 1 (saliency + plan density)."""
    from dipgo.supernets.mask import density_mask, parse_pattern

    if plan.kind != "mask":
        raise PlanError(f"this is a {plan.kind!r} plan; the mask bench needs a 'mask' plan")
    if list(plan.blocks) != list(supernet.layers):
        missing = sorted(set(plan.blocks) ^ set(supernet.layers))
        raise PlanError(f"the plan's layers do not match this model's prunable layers (first difference: "
                        f"{missing[0] if missing else 'the order'}): bench the plan with the config it was searched with")
    payload = MaskPayload.from_meta(plan.meta)
    pattern = parse_pattern(payload.pattern)
    dens = {p: float(d) for p, d in payload.pruned(plan.blocks).items()}
    return {p: density_mask(supernet.saliency[p], d, pattern) for p, d in dens.items() if p not in supernet.refused}


def bench_mask_plan(cfg: DictConfig, plan: Plan, *, runs: int, warmup: int, batch: int,
                    threads: int | None) -> dict[str, Any]:
    """Time a saved mask plan's kernel SubNet against the dense model (``dipgo bench``); JSON-able."""
    from dipgo.models.configured import load_configured_model
    from dipgo.postprocess.mask_subnet import kernel_block, masked_density, to_kernels
    from dipgo.postprocess.reconstruct import apply_masks
    from dipgo.report.block_eval import _latency_inputs, eval_data
    from dipgo.search.mask_task import MaskTask

    loaded = load_configured_model(cfg)
    supernet = MaskTask().build(loaded, cfg)
    model = supernet.remove()
    masks = plan_masks(supernet, plan)
    masked = copy.deepcopy(model).eval().requires_grad_(False)
    apply_masks(masked, masks)

    with_cfg = cfg.copy()
    with_cfg.report.num_samples = max(batch, 1)
    data = _latency_inputs(eval_data(loaded, with_cfg), batch)
    first = next(iter(data.values()))
    tokens = int(data["input_ids"].numel()) if "input_ids" in data else len(first)  # rows of x per Linear call
    block = kernel_block(plan)
    kern = copy.deepcopy(masked)
    conversion = to_kernels(kern, masks, block, tokens=tokens)

    fn = supernet.output_fn
    with torch.inference_mode():
        diff = float((fn(kern, data).float() - fn(masked, data).float()).abs().max())
    timings = compare_latency({"full": lambda: fn(model, data), "subnet": lambda: fn(kern, data)},
                              warmup=warmup, runs=runs, threads=threads)
    converted = [p for p, r in conversion.items() if r["converted"]]
    return {
        "kind": "mask",
        "model": type(model).__name__,
        "plan": {"model": plan.model, "source": plan.meta.get("model_source", str(cfg.model.name)),
                 "pattern": plan.payload.pattern, "target": plan.target, "selection": plan.meta.get("selection")},
        "pattern": plan.payload.pattern,
        "density": plan.cost_ratio,
        "masked_density": masked_density(masked, list(masks)) if masks else 1.0,
        "kernel_block": list(block),
        "kernel_layers": len(converted),
        "masked_layers": len(masks),
        "conversion": conversion,
        "batch": len(first),
        "tokens": tokens,
        "threads": timings["full"].threads,
        "full": timings["full"].to_dict(),
        "subnet": timings["subnet"].to_dict(),
        "latency_ms": {"full": timings["full"].median_s * 1e3, "subnet": timings["subnet"].median_s * 1e3},
        "speedup": speedup(timings["full"], timings["subnet"]),
        "max_abs_diff": diff,
        "machine": _machine(),
    }


def _machine_lines(m: dict[str, Any] | None) -> list[str]:
    if not m:
        return []
    simd = "AVX-512" if "avx512f" in m.get("simd_flags", []) else "AVX2" if "avx2" in m.get("simd_flags", []) else "no AVX2"
    return [f"measured on {m['cpu']} (family {m.get('cpu_family')}, model {m.get('cpu_model_number')}, {simd}), "
            f"native kernel {m.get('kernel_isa') or 'unavailable'}, torch {m['torch']} (ATen {m['aten_cpu_capability']})"]


def _machine() -> dict[str, Any]:
    """The machine record plus the native kernel's build (its ISA decides the kernel's speed)."""
    from dipgo.kernels import native
    from dipgo.measure.machine import machine_record

    kernel = native.load()
    return {**machine_record(), "kernel_isa": None if kernel is None else kernel.isa,
            "kernel_isa_env": os.environ.get(native.ISA_ENV),
            "native_kernel": None if kernel is None else kernel.path.name}


def bench_lines(result: dict[str, Any]) -> list[str]:
    """A few human lines for ``dipgo bench``, then one per masked layer."""
    from dipgo.postprocess.mask_subnet import conversion_lines

    lat = result["latency_ms"]
    return [
        f"{result['model']}: mask plan, pattern {result['pattern']}, density {result['density']:.4f} "
        f"(masked layers keep {result['masked_density']:.4f})",
        f"{result['kernel_layers']}/{result['masked_layers']} masked layers on block-sparse kernels "
        f"(blocks {result['kernel_block'][0]}x{result['kernel_block'][1]}), the rest dense with zeros",
        f"full {lat['full']:.2f} ms, SubNet {lat['subnet']:.2f} ms, speedup {result['speedup']:.2f}x "
        f"(batch {result['batch']}, {result['tokens']} tokens, {result['threads']} threads)",
        f"kernel SubNet vs masked dense model: max abs difference {result['max_abs_diff']:.2e}",
        *_machine_lines(result.get("machine")),
        "per layer (measured dense / kernel time; kernel where >= the margin):",
        *conversion_lines(result["conversion"]),
    ]
