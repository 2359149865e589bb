"""The ``reuse`` gate kind as a search task: DiP-GO timestep feature reuse for diffusers denoisers.

Build: wrap the denoiser into a :class:`~dipgo.supernets.reuse.ReuseSuperNet`. Data: a pool of
noises (+ class labels). Plan: exact-budget extraction with dependency repair. Evaluate: sample
the same evaluation noise with the full model, the SubNet (plan installed on the plain diffusers
model, reused blocks really skipped) and baselines at the same MACs; measure fidelity and
interleaved wall-clock latency; draw the heatmap, sample grid and loss curves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from dipgo.postprocess.plan import Plan
from dipgo.search.data import diffusion_datamodule, eval_batch
from dipgo.search.tasks import load_configured_model, register_task


def sample_spec(model: torch.nn.Module) -> tuple[tuple[int, int, int], int | None]:
    """``((C, H, W), num_classes)`` of a diffusers denoiser, read from its config.

    ``num_classes`` excludes the null label used for classifier-free guidance: a UNet2DModel
    with ``num_class_embeds=11`` has 10 classes; a DiT with ``num_embeds_ada_norm=10`` has 10.
    """
    from dipgo.supernets.sampling import null_class_for

    size = model.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    # the null label sits right after the real classes, so its index is the class count
    return (model.config.in_channels, h, w), null_class_for(model)


def reuse_config(cfg: DictConfig, loaded: Any) -> Any:
    from dipgo.supernets.reuse import ReuseConfig

    scheduler_config = dict(loaded.scheduler.config) if getattr(loaded, "scheduler", None) is not None else None
    return ReuseConfig(
        num_steps=cfg.supernet.num_steps,
        granularity=cfg.supernet.granularity,
        mode=cfg.supernet.mode,
        guidance_scale=cfg.supernet.guidance_scale,
        scheduler=cfg.supernet.scheduler,
        scheduler_config=scheduler_config,
        checkpointing=cfg.supernet.checkpointing,
        truncate_steps=cfg.supernet.truncate_steps,
    )


@register_task("reuse")
class ReuseTask:
    """Timestep feature reuse: one gate per (sampling step, block)."""

    kind = "reuse"

    def build(self, loaded: Any, cfg: DictConfig) -> Any:
        from dipgo.supernets.adapters import UnsupportedModelError
        from dipgo.supernets.reuse import apply_reuse

        if loaded.kind not in ("diffusion_unet", "diffusion_dit"):
            raise UnsupportedModelError(
                f"supernet.kind=reuse needs a diffusion denoiser (a diffusers UNet or DiT), but {loaded.source} "
                f"is a {loaded.kind} ({type(loaded.model).__name__})"
            )
        if cfg.data.kind != "diffusion":
            raise UnsupportedModelError(f"supernet.kind=reuse calibrates on data.kind=diffusion (noise + labels), not {cfg.data.kind!r}")

        shape, num_classes = sample_spec(loaded.model)
        example = eval_batch(shape, 1, num_classes, cfg.seed)
        example.pop("index")
        return apply_reuse(loaded.model, reuse_config(cfg, loaded), example)

    def datamodule(self, loaded: Any, supernet: Any, cfg: DictConfig) -> Any:
        shape, num_classes = sample_spec(loaded.model)
        if cfg.data.num_classes is not None:
            num_classes = cfg.data.num_classes
        return diffusion_datamodule(shape, num_classes, cfg.data, cfg.seed)

    def extract_plan(self, probs: torch.Tensor, supernet: Any, cfg: DictConfig) -> Plan:
        from dipgo.postprocess.reuse_plan import extract_reuse_plan

        meta = {"scheduler": cfg.supernet.scheduler, "guidance_scale": cfg.supernet.guidance_scale,
                "model_source": cfg.model.name}
        grid = supernet.gate_grid(probs)  # (S, B), row 0 = 1
        meta["keep_probs"] = [[round(float(p), 4) for p in row] for row in grid]
        return extract_reuse_plan(probs, supernet, cfg.search.target, meta=meta)

    def evaluate(self, loaded: Any, supernet: Any, plan: Plan, cfg: DictConfig, run_dir: Path) -> tuple[dict, dict]:
        from dipgo.report.reuse_eval import evaluate_reuse

        return evaluate_reuse(loaded, supernet, plan, cfg, run_dir)

    def summary_lines(self, report: dict[str, Any]) -> list[str]:
        from dipgo.report.reuse_eval import summary_lines

        return summary_lines(report)

    def bench(self, cfg: DictConfig, plan: Plan, *, runs: int, warmup: int, batch: int, threads: int | None) -> dict:
        from dipgo.report.reuse_eval import bench_plan

        return bench_plan(cfg, plan, runs=runs, warmup=warmup, batch=batch, threads=threads)

    def bench_lines(self, result: dict[str, Any]) -> list[str]:
        from dipgo.report.reuse_eval import bench_lines

        return bench_lines(result)

    def export(self, cfg: DictConfig, plan: Plan, out: Path) -> Path:
        from dipgo.postprocess.reuse_subnet import ReuseSubNet

        loaded = load_configured_model(cfg)
        subnet = ReuseSubNet(
            model=loaded.model,
            plan=plan,
            scheduler=cfg.supernet.scheduler,
            scheduler_config=dict(loaded.scheduler.config) if loaded.scheduler is not None else None,
            guidance_scale=cfg.supernet.guidance_scale,
            source=cfg.model.name,
        )
        return subnet.save(out)
