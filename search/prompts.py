"""Calibration data for text-to-image denoisers: noise + text embeddings of plain English prompts.

A Stable Diffusion UNet is conditioned on the hidden states of the pipeline's CLIP text
encoder(s), so its calibration items carry those instead of class labels. The embeddings are
computed once, when the pool is built, the way diffusers' pipelines compute them:

* SD-1.x / 2.x (one encoder): the encoder's last hidden state ``(T, D)``; the negative (the
  unconditional half of classifier-free guidance) is the embedding of the empty prompt.
* SDXL (``addition_embed_type="text_time"``, two encoders): the penultimate hidden states of both
  encoders concatenated ``(T, D1 + D2)``, the pooled projection of the last encoder as
  ``text_embeds`` and the size micro-conditioning ``time_ids = (H, W, 0, 0, H, W)`` in pixels;
  the negative is all zeros when the pipeline says ``force_zeros_for_empty_prompt`` (SDXL base
  does), else the empty prompt's embeddings.

The built-in prompts are split by position: every 4th is held out for the report's evaluation
batch, the rest calibrate the search, so the report measures the plan on prompts it never saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from dipgo.search.data import _generator

if TYPE_CHECKING:
    from dipgo.models.registry import LoadedModel

SPLITS = ("calibration", "evaluation", "all")
EVAL_EVERY = 4  # prompt i is held out for evaluation when i % EVAL_EVERY == EVAL_EVERY - 1

# Written for dipgo: varied subjects, styles and compositions, one image each.
PROMPTS: tuple[str, ...] = (
    "a red fox sitting in fresh snow at sunrise",
    "a bowl of ramen with a soft boiled egg, top view",
    "an old lighthouse on a rocky coast during a storm",
    "a watercolor painting of a quiet village street in spring",
    "a golden retriever puppy playing with a tennis ball on grass",
    "a futuristic city skyline at night with flying cars",
    "a cup of coffee on a wooden table next to an open book",
    "a portrait of an elderly fisherman with a grey beard, soft light",
    "a field of sunflowers under a clear blue sky",
    "a small wooden cabin in a pine forest covered in snow",
    "a bicycle leaning against a yellow wall in an italian town",
    "an astronaut riding a horse on the moon, digital art",
    "a plate of fresh sushi on a black slate board",
    "a mountain lake reflecting snowy peaks at dawn",
    "a cat sleeping on a windowsill next to a potted plant",
    "a steam locomotive crossing a stone bridge in autumn",
    "a pencil sketch of a hummingbird drinking from a flower",
    "a busy night market with lanterns and food stalls",
    "a glass of orange juice with ice cubes, studio photo",
    "a medieval castle on a hill surrounded by fog",
    "a child flying a kite on a windy beach",
    "a close-up of a dew drop on a green leaf",
    "an oil painting of a sailing ship on rough seas",
    "a modern living room with large windows and a grey sofa",
    "a hot air balloon floating over a desert canyon",
    "a stack of pancakes with blueberries and maple syrup",
    "a snowy owl perched on a branch at twilight",
    "a neon sign reading open in the window of a diner",
    "a herd of elephants walking across the savanna at sunset",
    "a bouquet of tulips in a glass vase on a kitchen table",
    "a cyberpunk street with rain and reflections on the pavement",
    "a tiny robot watering a plant, 3d render",
    "a waterfall in a lush tropical jungle",
    "a vintage red car parked in front of a gas station",
    "a chessboard with pieces in the middle of a game, shallow depth of field",
    "a koala hugging a eucalyptus tree",
    "a lighthouse keeper reading by candlelight, oil painting",
    "a wheat field with a farmhouse and a red barn",
    "a jellyfish glowing in the dark ocean",
    "a slice of chocolate cake with raspberries on a white plate",
    "a crowded train station in the morning, black and white photo",
    "a dragon made of clouds flying over mountains",
    "a pair of old leather boots on a wooden porch",
    "a colorful coral reef with tropical fish",
    "a snowman wearing a scarf and a top hat in a garden",
    "a japanese garden with a red bridge and a koi pond",
    "a violin resting on sheet music, warm light",
    "a polar bear walking on sea ice under the northern lights",
    "a basket of apples and pears on a picnic blanket",
    "an abandoned greenhouse overgrown with plants",
    "a panda eating bamboo in a misty forest",
    "a street musician playing guitar under a bridge",
    "a bowl of tomato soup with basil and bread",
    "a space station orbiting a blue planet",
    "a horse galloping along a beach at sunset",
    "a library with tall wooden shelves and a ladder",
    "a macro photo of a honeybee on a lavender flower",
    "a paper boat floating on a puddle after rain",
    "a desert road stretching to the horizon with a lone cactus",
    "a fantasy forest with glowing mushrooms at night",
    "a firefighter holding a hose in front of a burning building",
    "a plate of spaghetti with meatballs and parmesan",
    "an aerial view of a winding river through green hills",
    "a parrot with bright green and red feathers on a branch",
    "a snow-covered street with warm lights in the shop windows",
    "a toy train set running around a christmas tree",
    "a sea turtle swimming above a sandy sea floor",
    "a woman in a yellow raincoat holding an umbrella in the city",
    "a rustic bread loaf on a cutting board with flour",
    "a wind turbine farm on rolling hills at dusk",
    "a pixel art castle with a moat and a drawbridge",
    "a deer standing in a misty meadow at dawn",
    "a classroom with a chalkboard full of equations",
    "a bonsai tree in a ceramic pot on a white background",
    "a thunderstorm over a prairie with lightning",
    "a penguin family standing on an iceberg",
    "a market stall full of colorful spices",
    "a vintage typewriter with a sheet of paper",
    "a canoe on a calm lake surrounded by autumn trees",
    "an ink drawing of a tiger walking through tall grass",
    "a lemon tree with ripe lemons in a terracotta pot",
    "a rocket launching into a clear morning sky",
    "a fluffy white cloud shaped like a rabbit",
    "a cozy reading nook with blankets and fairy lights",
    "a fishing village with colorful houses by the harbor",
    "a mechanical watch with its gears visible, macro photo",
    "a wolf howling on a ridge under a full moon",
    "a tray of freshly baked cookies cooling on a rack",
    "a stone path through a bamboo forest",
    "a surfer riding a large wave, action shot",
    "a still life of pears and a jug in the style of cezanne",
    "a butterfly with blue wings resting on a daisy",
    "a grand piano in an empty concert hall",
    "a snowy mountain village with a church steeple",
    "a goldfish in a round glass bowl on a desk",
    "a sunset over the ocean seen from a sailboat",
)


def load_prompts(path: str | Path | None = None) -> list[str]:
    """The prompts of ``path`` (one per line, blank lines and ``#`` comments skipped) or the built-in list."""
    if path is None:
        return list(PROMPTS)
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"data.prompts_file={str(path)!r} is not a file; give a text file with one prompt per line, or null for the built-in prompts")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def split_prompts(prompts: Sequence[str], split: str) -> list[str]:
    """``calibration`` (3 of every 4 prompts), ``evaluation`` (every 4th, held out) or ``all``."""
    if split not in SPLITS:
        raise ValueError(f"unknown prompt split {split!r}; accepted: {', '.join(SPLITS)}")
    if split == "all":
        return list(prompts)
    held_out = split == "evaluation"
    chosen = [p for i, p in enumerate(prompts) if (i % EVAL_EVERY == EVAL_EVERY - 1) == held_out]
    if not chosen:
        raise ValueError(
            f"{len(prompts)} prompts leave no {split} prompts (every {EVAL_EVERY}th is held out for the report); "
            f"give at least {EVAL_EVERY}"
        )
    return chosen


# ----------------------------------------------------------------------------- text encoding


def _uses_text_time(unet: Any) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def _pairs(encoders: dict[str, Any]) -> list[tuple[Any, Any]]:
    """``(tokenizer, text_encoder)`` pairs in pipeline order (SDXL: both, SD: the first)."""
    pairs = []
    for suffix in ("", "_2"):
        tok, enc = encoders.get(f"tokenizer{suffix}"), encoders.get(f"text_encoder{suffix}")
        if tok is not None and enc is not None:
            pairs.append((tok, enc))
    return pairs


@torch.no_grad()
def _encode(pairs: list[tuple[Any, Any]], prompts: list[str], text_time: bool, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(hidden (N, T, D), pooled (N, P) or None)`` of ``prompts``, as the SD / SDXL pipelines do."""
    hidden, pooled = [], None
    for tokenizer, encoder in pairs:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        if not text_time:  # SD-1.x/2.x: last hidden state (attention mask only if the encoder wants one)
            mask = ids.attention_mask.to(device) if getattr(encoder.config, "use_attention_mask", False) else None
            hidden.append(encoder(ids.input_ids.to(device), attention_mask=mask)[0])  # (N, T, D)
            break
        out = encoder(ids.input_ids.to(device), output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: the pooled, projected text embedding
            pooled = out[0]  # (N, P)
        hidden.append(out.hidden_states[-2])  # SDXL always takes the penultimate layer
    return torch.cat(hidden, dim=-1).float().cpu(), None if pooled is None else pooled.float().cpu()


def _encode_chunked(pairs: list[tuple[Any, Any]], prompts: list[str], text_time: bool, chunk: int = 32
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode on the GPU when there is one (encoders go back to the CPU afterwards)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    homes = [next(enc.parameters()).device for _, enc in pairs]
    for _, enc in pairs:
        enc.to(device)
    try:
        parts = [_encode(pairs, prompts[i : i + chunk], text_time, device) for i in range(0, len(prompts), chunk)]
    finally:
        for (_, enc), home in zip(pairs, homes):
            enc.to(home)
    hidden = torch.cat([h for h, _ in parts])
    pooled = None if parts[0][1] is None else torch.cat([p for _, p in parts])
    return hidden, pooled


def _time_ids(unet: Any, vae_scale_factor: int, pooled_dim: int) -> torch.Tensor:
    """SDXL's micro-conditioning for the default resolution: original size, crop (0, 0), target size."""
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    h, w = h * vae_scale_factor, w * vae_scale_factor  # pixels
    ids = [h, w, 0, 0, h, w]
    expected = unet.config.projection_class_embeddings_input_dim
    got = unet.config.addition_time_embed_dim * len(ids) + pooled_dim
    if expected != got:
        raise ValueError(
            f"the UNet expects {expected} added-conditioning features but the text encoder's pooled projection ({pooled_dim}) "
            f"plus {len(ids)} time ids give {got}; the text encoders do not belong to this UNet"
        )
    return torch.tensor(ids, dtype=torch.float32)  # (6,)


class PromptPool(Dataset):
    """A fixed pool of noises and prompt embeddings for a text-conditioned denoiser.

    Item ``i`` (prompt ``i % len(prompts)``, noise seeded by ``(seed, i)`` as in ``NoisePool``)::

        {"index": (), "noise": (C, H, W), "encoder_hidden_states": (T, D),
         "negative_encoder_hidden_states": (T, D),
         # SDXL only:
         "added_cond_kwargs": {"text_embeds": (P,), "time_ids": (6,)},
         "negative_added_cond_kwargs": {"text_embeds": (P,), "time_ids": (6,)}}

    Build it with :func:`prompt_pool` from a loaded pipeline; the constructor takes the encoders
    directly so tests and scripts can pass their own.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        encoders: dict[str, Any],
        unet: Any,
        size: int,
        seed: int,
        *,
        vae_scale_factor: int = 8,
        zero_negative: bool = False,
    ):
        if not prompts:
            raise ValueError("PromptPool needs at least one prompt")
        pairs = _pairs(encoders)
        text_time = _uses_text_time(unet)
        if not pairs or (text_time and len(pairs) < 2):
            need = "tokenizer + text_encoder and tokenizer_2 + text_encoder_2" if text_time else "a tokenizer + text_encoder"
            raise ValueError(f"data.kind=prompts needs the pipeline's {need}; got {', '.join(sorted(encoders)) or 'none'}")
        other = [type(enc).__name__ for _, enc in pairs if not type(enc).__name__.startswith("CLIPText")]
        if other:  # T5-conditioned pipelines (PixArt, SD3, Flux) also need masks and other extras
            raise ValueError(f"data.kind=prompts supports CLIP text encoders (Stable Diffusion 1.x/2.x/XL), not {', '.join(other)}")
        from dipgo.models.io import sample_spec

        self.size, self.seed = size, seed
        self.shape = sample_spec(unet)[0]  # (C, H, W)
        self.prompts = list(prompts)[: min(size, len(prompts))]
        hidden, pooled = _encode_chunked(pairs, self.prompts + [""], text_time)
        self.hidden, neg_hidden = hidden[:-1], hidden[-1]  # (N, T, D), (T, D)
        self.neg_hidden = torch.zeros_like(neg_hidden) if zero_negative else neg_hidden
        self.pooled = self.neg_pooled = self.time_ids = None
        if text_time:
            if pooled is None:
                raise ValueError("an SDXL-style UNet (text_time) needs a text encoder with a projection (CLIPTextModelWithProjection)")
            self.pooled, neg_pooled = pooled[:-1], pooled[-1]  # (N, P), (P,)
            self.neg_pooled = torch.zeros_like(neg_pooled) if zero_negative else neg_pooled
            self.time_ids = _time_ids(unet, vae_scale_factor, pooled.shape[-1])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        p = index % len(self.prompts)
        item: dict[str, Any] = {
            "index": torch.tensor(index),
            "noise": torch.randn(self.shape, generator=_generator(self.seed, 17, index)),  # (C, H, W)
            "encoder_hidden_states": self.hidden[p],  # (T, D)
            "negative_encoder_hidden_states": self.neg_hidden,  # (T, D)
        }
        if self.pooled is not None:
            item["added_cond_kwargs"] = {"text_embeds": self.pooled[p], "time_ids": self.time_ids}
            item["negative_added_cond_kwargs"] = {"text_embeds": self.neg_pooled, "time_ids": self.time_ids}
        return item


def _vae_scale_factor(parts: Any) -> int:
    """Pixels per latent (8 for SD's VAE), from the VAE's config without loading its weights."""
    if parts is None or not parts.has("vae"):
        return 8
    channels = parts.config("vae").get("block_out_channels")
    return 2 ** (len(channels) - 1) if channels else 8


def prompt_pool(loaded: LoadedModel, size: int, seed: int, *, split: str = "calibration",
                prompts_file: str | None = None) -> PromptPool:
    """The :class:`PromptPool` of a loaded text-to-image pipeline's denoiser, on one prompt split."""
    from dipgo.models.registry import text_encoders

    encoders = text_encoders(loaded)
    if encoders is None:
        raise ValueError(
            f"data.kind=prompts needs a diffusers pipeline with text encoders, but {loaded.source} has none "
            "(give the pipeline folder or hub id, not the unet folder alone)"
        )
    parts = loaded.extra.get("pipeline")
    # SDXL pipelines default to zeros for the empty negative prompt; SD-1.x/2.x encode ""
    default_zeros = _uses_text_time(loaded.model)
    zero_negative = bool(parts.options.get("force_zeros_for_empty_prompt", default_zeros)) if parts is not None else default_zeros
    chosen = split_prompts(load_prompts(prompts_file), split)
    return PromptPool(chosen, encoders, loaded.model, size, seed,
                      vae_scale_factor=_vae_scale_factor(parts), zero_negative=zero_negative)
