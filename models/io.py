"""How dipgo feeds each model family and reads its output, on the ground floor.

The search (calibration pools, the SuperNets' output functions), the SubNet builders and the
report all need the same answers: what input a timm classifier expects and the digits images
resized to it, the logits or mean-pooled sentence embedding a model's output is judged by, the
sample shape and class count of a diffusers denoiser. They are facts about the models, so they
live beside the model loaders rather than in one gate kind's task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dipgo.models.digits import digits_tensors

OutputFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def classifier_input_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` a timm classifier expects, from its pretrained config (digits default 1x16x16)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = cfg.get("input_size", (1, 16, 16))
    return int(c), int(h), int(w)


def digits_images(model: nn.Module, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits images resized / channel-repeated to the classifier's input, and their labels."""
    c, h, w = classifier_input_shape(model)
    x, y = digits_tensors(split, size=16)
    if (h, w) != (16, 16):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.repeat(1, c, 1, 1) if c != 1 else x, y


def classifier_output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits ``(B, classes)``."""
    return model(batch["images"])


def encoder_output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Attention-mask mean-pooled last hidden state ``(B, H)`` (sentence-transformers pooling)."""
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, H)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def output_fn_for(kind: str) -> OutputFn:
    """The output a classifier (logits) or an encoder (pooled embedding) is judged by."""
    return classifier_output if kind == "classifier" else encoder_output


@torch.no_grad()
def outputs(model: nn.Module, kind: str, data: dict[str, torch.Tensor], chunk: int = 128) -> torch.Tensor:
    """Logits or pooled embeddings of the whole evaluation set, in chunks."""
    fn = output_fn_for(kind)
    keys = [k for k in data if k != "labels"]
    n = len(data[keys[0]])
    return torch.cat([fn(model, {k: data[k][i : i + chunk] for k in keys}) for i in range(0, n, chunk)]).float()


def null_class_for(model: nn.Module) -> int | None:
    """Index of the "no class" label used for the unconditional half of CFG, or ``None``.

    DiT's label embedding keeps its own null row at ``num_classes`` (``num_embeds_ada_norm``);
    a class-conditional UNet trained with a dropped label uses the convention
    ``num_class_embeds = K + 1`` with label ``K`` as the null class.
    """
    config = getattr(model, "config", {})
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    if get("norm_type", None) == "ada_norm_zero" and get("num_embeds_ada_norm", None):
        return int(get("num_embeds_ada_norm"))
    if get("num_class_embeds", None):
        return int(get("num_class_embeds")) - 1
    return None


def sample_spec(model: nn.Module) -> tuple[tuple[int, int, int], int | None]:
    """``((C, H, W), num_classes)`` of a diffusers denoiser, read from its config.

    ``num_classes`` excludes the null label used for classifier-free guidance: a UNet2DModel
    with ``num_class_embeds=11`` has 10 classes; a DiT with ``num_embeds_ada_norm=10`` has 10.
    """
    size = model.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    # the null label sits right after the real classes, so its index is the class count
    return (model.config.in_channels, h, w), null_class_for(model)


def text_conditioned(model: nn.Module) -> bool:
    """Cross-attention denoisers (UNet2DConditionModel, PixArt) need text embeddings, not labels."""
    return getattr(model.config, "cross_attention_dim", None) is not None

