"""Train the reference models on scikit-learn's digits (16x16) and write them under --out.

    python scripts/train_reference.py --which all --out models/

Folders written (each with metrics.json):
  digits_cnn/   timm ResNet classifier   (model.safetensors + timm config.json; loads with
                timm.create_model("local-dir:<folder>", pretrained=True))
  digits_resnet/ timm ResNet-34 layout   (same layout; 3-4-6-3 blocks, the depth-pruning reference)
  digits_vit/   timm VisionTransformer   (same layout)
  digits_unet/  diffusers UNet2DModel    (unet/ + scheduler/ + samples.png)
  digits_dit/   diffusers DiT            (transformer/ + scheduler/ + samples.png)

The CNN is also the judge of sample quality (accuracy on generated digits, Frechet distance in its
penultimate features), so it is trained first. Everything runs on CPU with a fixed seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dipgo.measure.macs import model_macs
from dipgo.models.digits import NUM_CLASSES, class_conditional, digits_tensors, sample_digits, to_unit_range
from dipgo.models.registry import digits_classifier_features, load_model

SEED = 0
SUFFIX = ""  # folder suffix of a variant denoiser (--suffix); the shipped references have none
NULL_LABEL = NUM_CLASSES  # label 10: the classifier-free-guidance "no class" label
TRAIN_TIMESTEPS = 1000
BETA_SCHEDULE = "squaredcos_cap_v2"
EVAL_PER_CLASS = 50
EVAL_STEPS = 50
DEFAULT_GUIDANCE = 2.0

CNN_ARGS = dict(in_chans=1, num_classes=10, channels=(16, 32, 64, 128), stem_width=16)
# ResNet-34 block layout with a light 3-conv stem, so the residual blocks (not a 64-channel 7x7
# stem and its max-pool) hold most of the latency: the subject of depth pruning.
RESNET_ARGS = dict(in_chans=1, num_classes=10, channels=(32, 64, 128, 256), stem_type="deep", stem_width=16)
VIT_ARGS = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3)
UNET_ARGS = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=32,
    num_class_embeds=NUM_CLASSES + 1,
)
DIT_ARGS = dict(
    num_attention_heads=4,
    attention_head_dim=24,
    in_channels=1,
    out_channels=1,
    num_layers=6,
    sample_size=16,
    patch_size=2,
    num_embeds_ada_norm=NUM_CLASSES,
)


# ----------------------------------------------------------------------------- shared helpers


def seed_all(seed: int | None = None) -> torch.Generator:
    seed = SEED if seed is None else seed  # read at call time: --seed changes it
    torch.manual_seed(seed)
    np.random.seed(seed)
    return torch.Generator().manual_seed(seed)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def random_affine(x: Tensor, shift_px: float, degrees: float, scale: float, gen: torch.Generator) -> Tensor:
    """Random small shift / rotation / scale per image; the background (-1) fills the border."""
    n, _, h, _ = x.shape
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(degrees)
    s = 1.0 + (torch.rand(n, generator=gen) * 2 - 1) * scale
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2.0 * shift_px / h)  # in [-1, 1] grid units
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (N, H, W, 2)
    return F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------- classifiers


def build_classifier(which: str) -> nn.Module:
    import timm

    if which == "cnn":
        return timm.create_model("resnet18", **CNN_ARGS)
    if which == "resnet":  # deeper (3-4-6-3 blocks): room for depth pruning at 30-50% latency
        return timm.create_model("resnet34", **RESNET_ARGS)
    return timm.create_model("vit_tiny_patch16_224", **VIT_ARGS)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(512)])
    return (pred == y).float().mean().item()


def train_classifier(model: nn.Module, epochs: int, lr: float, aug: dict, batch: int = 64) -> float:
    """AdamW + cosine schedule + label smoothing on augmented train images; returns the last loss."""
    gen = seed_all()
    x, y = digits_tensors("train")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(x) / batch)
    total, step, loss = epochs * steps_per_epoch, 0, torch.tensor(0.0)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            set_lr(opt, cosine_lr(step, total, lr, warmup=steps_per_epoch))
            xb = random_affine(x[idx], gen=gen, **aug)
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if epoch % 10 == 9 or epoch == epochs - 1:
            print(f"  epoch {epoch + 1}/{epochs} loss {loss.item():.4f}", flush=True)
    return loss.item()


def save_timm(model: nn.Module, folder: Path) -> None:
    """model.safetensors + timm hub-style config.json, loadable with 'local-dir:<folder>'."""
    from timm.models import save_for_hf

    data_config = dict(
        input_size=(1, 16, 16), interpolation="bilinear", mean=(0.5,), std=(0.5,), crop_pct=1.0
    )
    save_for_hf(model, str(folder), safe_serialization=True, data_config=data_config)
    tidy_timm_config(folder / "config.json")


def tidy_timm_config(path: Path) -> None:
    """save_for_hf copies the ImageNet tag, URL and papers of the architecture's default weights;
    these weights are ours, so say so."""
    cfg = json.loads(path.read_text())
    pcfg = cfg["pretrained_cfg"]
    for key in ("paper_ids", "paper_name", "origin_url", "hf_hub_id", "url"):
        pcfg.pop(key, None)
    pcfg.update(tag="dipgo_digits16", origin_url="scripts/train_reference.py (dipgo)", license="apache-2.0")
    write_json(path, cfg)


def run_classifier(which: str, out: Path, epochs: int, lr: float, aug: dict) -> dict:
    seed_all()
    model = build_classifier(which)
    t0 = time.time()
    last_loss = train_classifier(model, epochs, lr, aug)
    train_s = time.time() - t0
    model.eval()
    folder = out / f"digits_{which}"
    folder.mkdir(parents=True, exist_ok=True)
    save_timm(model, folder)
    x_test, y_test = digits_tensors("test")
    metrics = {
        "model": f"digits_{which}",
        "architecture": model.pretrained_cfg.get("architecture"),
        "test_accuracy": round(accuracy(model, x_test, y_test), 4),
        "train_accuracy": round(accuracy(model, *digits_tensors("train")), 4),
        "final_train_loss": round(last_loss, 4),
        "params": n_params(model),
        "macs_per_image": model_macs(model, torch.zeros(1, 1, 16, 16)),
        "train_seconds": round(train_s, 1),
        "epochs": epochs,
        "lr": lr,
        "augmentation": aug,
        "input": "1x16x16 in [-1, 1] (dipgo.models.digits.digits_tensors)",
    }
    write_json(folder / "metrics.json", metrics)
    return metrics


# ----------------------------------------------------------------------------- denoisers


def build_denoiser(which: str) -> nn.Module:
    from diffusers import DiTTransformer2DModel, UNet2DModel

    if which == "unet":
        return UNet2DModel(**UNET_ARGS)
    return DiTTransformer2DModel(**DIT_ARGS)


def set_label_dropout(model: nn.Module, prob: float) -> None:
    """diffusers' DiT has one LabelEmbedding per block, each dropping labels on its own in train
    mode; we switch that off and drop labels once per sample ourselves (label NULL_LABEL)."""
    from diffusers.models.embeddings import LabelEmbedding

    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = prob


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, step: int, decay: float) -> None:
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - d)


def denoiser_batch(x: Tensor, y: Tensor, noise_sched, gen: torch.Generator, batch: int) -> tuple:
    idx = torch.randint(0, len(x), (batch,), generator=gen)
    x0, labels = x[idx], y[idx].clone()
    labels[torch.rand(batch, generator=gen) < 0.1] = NULL_LABEL  # 10% label dropout for CFG
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, TRAIN_TIMESTEPS, (batch,), generator=gen)
    return noise_sched.add_noise(x0, noise, t), t, labels, noise


def train_denoiser(model: nn.Module, steps: int, lr: float, batch: int) -> tuple[nn.Module, float]:
    """Epsilon-prediction DDPM training with EMA; returns (EMA model, mean loss of the last 100 steps)."""
    from diffusers import DDPMScheduler

    gen = seed_all()
    noise_sched = DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule=BETA_SCHEDULE)
    x, y = digits_tensors("train")
    set_label_dropout(model, 0.0)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    model.train()
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, lr, warmup=100))
        xt, t, labels, noise = denoiser_batch(x, y, noise_sched, gen, batch)
        cond = labels if class_conditional(model) else None
        loss = F.mse_loss(model(xt, t, class_labels=cond, return_dict=False)[0], noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, step, decay=0.999)
        losses.append(loss.item())
        if step % 100 == 99:
            print(f"  step {step + 1}/{steps} loss {np.mean(losses[-100:]):.4f}", flush=True)
    set_label_dropout(ema, 0.1)  # back to the constructor's value, as a fresh load would have
    return ema, float(np.mean(losses[-100:]))


def ddim_scheduler():
    """Sampling scheduler saved with each denoiser; same betas as training."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS,
        beta_schedule=BETA_SCHEDULE,
        clip_sample=True,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D), (M, D).

    tr(sqrt(Ca Cb)) is computed as the sum of sqrt(eigenvalues) of the symmetric PSD matrix
    sqrt(Ca) Cb sqrt(Ca), which has the same spectrum and needs no general sqrtm.
    """
    a64, b64 = a.double(), b.double()
    mu_a, mu_b = a64.mean(0), b64.mean(0)
    cov_a, cov_b = torch.cov(a64.T), torch.cov(b64.T)  # (D, D)
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    tr_covmean = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2.0 * tr_covmean)


def sample_quality(
    model: nn.Module, scheduler, classifier: nn.Module, guidance: float
) -> tuple[dict, Tensor]:
    """Classifier accuracy and Frechet distance (vs real test images) of 50 samples per class."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(EVAL_PER_CLASS)  # (500,)
    gen = torch.Generator().manual_seed(SEED)
    t0 = time.time()
    samples = sample_digits(
        model,
        scheduler,
        labels,
        guidance_scale=guidance,
        num_steps=EVAL_STEPS,
        null_label=NULL_LABEL,
        generator=gen,
    )
    sample_s = time.time() - t0
    pred = torch.cat([classifier(c).argmax(1) for c in samples.split(512)])
    conditional = class_conditional(model)
    x_test, _ = digits_tensors("test")
    fd = frechet_distance(
        digits_classifier_features(classifier, samples), digits_classifier_features(classifier, x_test)
    )
    stats = {
        "guidance_scale": guidance,
        # an unconditional model draws digits of its own choosing: how evenly it covers the classes instead
        **({"classifier_accuracy": round((pred == labels).float().mean().item(), 4)} if conditional else
           {"class_histogram": torch.bincount(pred, minlength=NUM_CLASSES).tolist()}),
        "frechet_distance_vs_test": round(fd, 3),
        "sampling_seconds": round(sample_s, 1),
    }
    return stats, samples


def real_floor(classifier: nn.Module) -> float:
    """Frechet distance between real train and real test images: the best a generator can hope for."""
    feats = [digits_classifier_features(classifier, digits_tensors(s)[0]) for s in ("train", "test")]
    return round(frechet_distance(*feats), 3)


def save_grid(samples: Tensor, path: Path) -> None:
    """A row per class, 10 samples per row, upscaled 4x (nearest) so digits are visible."""
    from torchvision.utils import save_image

    per_class = samples.view(NUM_CLASSES, EVAL_PER_CLASS, 1, 16, 16)[:, :10].reshape(-1, 1, 16, 16)
    big = F.interpolate(to_unit_range(per_class), scale_factor=4, mode="nearest")
    save_image(big, str(path), nrow=10, padding=2, pad_value=0.5)


def run_denoiser(which: str, out: Path, steps: int, lr: float, batch: int, guidances: list[float]) -> dict:
    """Train, save (model + DDIM scheduler config), then judge the saved model's samples."""
    seed_all()
    model = build_denoiser(which)
    t0 = time.time()
    ema, last_loss = train_denoiser(model, steps, lr, batch)
    train_s = time.time() - t0
    folder = out / f"digits_{which}{SUFFIX}"
    ema.save_pretrained(str(folder / ("unet" if which == "unet" else "transformer")), safe_serialization=True)
    ddim_scheduler().save_config(str(folder / "scheduler"))
    x1, t1, c1 = torch.zeros(1, 1, 16, 16), torch.tensor([500]), torch.tensor([3])
    metrics = {
        "model": f"digits_{which}{SUFFIX}",
        "seed": SEED,
        "class": type(ema).__name__,
        "final_train_loss": round(last_loss, 4),
        "train_seconds": round(train_s, 1),
        "train_steps": steps,
        "batch_size": batch,
        "lr": lr,
        "ema_decay": 0.999,
        "params": n_params(ema),
        "macs_per_forward": model_macs(ema, x1, t1, class_labels=c1 if class_conditional(ema) else None),
        "class_conditional": class_conditional(ema),
        "beta_schedule": BETA_SCHEDULE,
        "null_label": NULL_LABEL if class_conditional(ema) else None,
        "sampler": f"DDIM {EVAL_STEPS} steps, eta 0",
        "default_guidance_scale": DEFAULT_GUIDANCE if class_conditional(ema) else 1.0,
        "eval_samples": NUM_CLASSES * EVAL_PER_CLASS,
        "judge": "digits_cnn (penultimate features for the Frechet distance)",
        "sample_quality": {},
    }
    write_json(folder / "metrics.json", metrics)
    return evaluate_denoiser(which, out, guidances)


def evaluate_denoiser(which: str, out: Path, guidances: list[float]) -> dict:
    """Sample quality of the saved denoiser in --out at each guidance scale, merged into metrics.json;
    samples.png shows the default guidance scale (or the first one evaluated if none is there yet)."""
    folder = out / f"digits_{which}{SUFFIX}"
    loaded = load_model(str(folder))
    classifier = _cnn_from(out)
    metrics = loaded.extra["metrics"]
    for g in guidances:
        stats, samples = sample_quality(loaded.model, loaded.scheduler, classifier, g)
        metrics["sample_quality"][f"guidance_{g:g}"] = stats
        print(f"  guidance {g}: {stats}", flush=True)
        if g == DEFAULT_GUIDANCE or not (folder / "samples.png").exists():
            save_grid(samples, folder / "samples.png")
    metrics["sample_quality"] = dict(sorted(metrics["sample_quality"].items()))
    metrics["frechet_distance_real_train_vs_test"] = real_floor(classifier)
    write_json(folder / "metrics.json", metrics)
    return metrics


def _cnn_from(out: Path) -> nn.Module:
    """The judge CNN from --out (so a run into a scratch folder judges with its own CNN)."""
    return load_model(str(out / "digits_cnn")).model


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", choices=["unet", "dit", "cnn", "resnet", "vit", "all"], default="all")
    p.add_argument("--out", type=Path, default=Path("models"))
    p.add_argument("--cnn-epochs", type=int, default=40)
    p.add_argument("--resnet-epochs", type=int, default=40)
    p.add_argument("--vit-epochs", type=int, default=60)
    p.add_argument("--unet-steps", type=int, default=1200)
    p.add_argument("--dit-steps", type=int, default=1600)
    p.add_argument("--batch", type=int, default=64, help="denoiser batch size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--guidance", type=float, nargs="+", default=[DEFAULT_GUIDANCE], help="guidance scales to evaluate"
    )
    p.add_argument(
        "--eval-only", action="store_true", help="only re-judge saved denoisers (unet/dit) in --out"
    )
    # a variant denoiser that dipgo's recipes were never tuned on (docs/RESULTS.md, "a model dipgo
    # never saw"): another seed, noise schedule and UNet width, written to digits_<which><suffix>/
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--beta-schedule", default=BETA_SCHEDULE, choices=["squaredcos_cap_v2", "linear", "scaled_linear"])
    p.add_argument("--unet-channels", type=int, nargs=3, default=list(UNET_ARGS["block_out_channels"]))
    p.add_argument("--suffix", default="", help="folder suffix, e.g. _hidden -> digits_unet_hidden/")
    p.add_argument("--unconditional", action="store_true",
                   help="train the UNet without class labels (evaluate it with --guidance 1)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global SEED, BETA_SCHEDULE, SUFFIX
    SEED, BETA_SCHEDULE, SUFFIX = args.seed, args.beta_schedule, args.suffix
    UNET_ARGS["block_out_channels"] = tuple(args.unet_channels)
    if args.unconditional:
        if args.which != "unet" or any(g != 1.0 for g in args.guidance):
            print("error: --unconditional trains the UNet only (--which unet) and samples it with --guidance 1.",
                  file=sys.stderr)
            return 2
        UNET_ARGS["num_class_embeds"] = None
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    todo = ["cnn", "resnet", "vit", "unet", "dit"] if args.which == "all" else [args.which]
    if (
        any(w in ("unet", "dit") for w in todo)
        and "cnn" not in todo
        and not (args.out / "digits_cnn").is_dir()
    ):
        print(
            f"error: {args.out / 'digits_cnn'} is missing; train the judge first with --which cnn.",
            file=sys.stderr,
        )
        return 2
    runs = {
        "cnn": lambda: run_classifier(
            "cnn", args.out, args.cnn_epochs, 3e-3, dict(shift_px=1.0, degrees=8, scale=0.05)
        ),
        "resnet": lambda: run_classifier(
            "resnet", args.out, args.resnet_epochs, 3e-3, dict(shift_px=1.0, degrees=8, scale=0.05)
        ),
        "vit": lambda: run_classifier(
            "vit", args.out, args.vit_epochs, 2e-3, dict(shift_px=1.5, degrees=10, scale=0.08)
        ),
        "unet": lambda: run_denoiser("unet", args.out, args.unet_steps, 2e-3, args.batch, args.guidance),
        "dit": lambda: run_denoiser("dit", args.out, args.dit_steps, 1e-3, args.batch, args.guidance),
    }
    if args.eval_only:
        todo = [w for w in todo if w in ("unet", "dit")]
        runs = {w: (lambda w=w: evaluate_denoiser(w, args.out, args.guidance)) for w in todo}
    for which in todo:
        print(f"== {which}", flush=True)
        print(json.dumps(runs[which](), indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
