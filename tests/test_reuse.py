"""The reuse SuperNet on tiny random-weight diffusers denoisers.

What must hold: all gates open reproduces the plain model; hard 0/1 sampling (closed blocks really
skipped, cascade included) equals the soft SuperNet with the same gates; costs are consistent and
differentiable; wrapping is undone exactly.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel, UNet2DModel
from torch import nn

from dipgo.errors import UnsupportedModelError
from dipgo.measure.macs import model_macs
from dipgo.supernets.adapters import (
    ConsumerGraph,
    ReuseAdapter,
    ReuseUnit,
    get_reuse_adapter,
    register_reuse_adapter,
)
from dipgo.supernets.gates import SuperNet
from dipgo.supernets.reuse import ReuseConfig, apply_reuse, remove_reuse
from dipgo.supernets.sampling import make_model_fn, make_scheduler, sample

SCHEDULERS = ("ddim", "dpmsolver++", "euler")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Tiny models: intra-op threads only add contention (see conftest.one_torch_thread)."""


def tiny_unet(seed: int = 0) -> UNet2DModel:
    """Class-conditional (2 classes + null label 2), attention in the middle resolution."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=1,
        norm_num_groups=4, attention_head_dim=4, num_class_embeds=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )


def tiny_cond_unet(seed: int = 0, sdxl: bool = False) -> UNet2DConditionModel:
    """SD-style cross-attention UNet; ``sdxl`` adds the text_time embedding (added_cond_kwargs)."""
    torch.manual_seed(seed)
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=8 + 6 * 4) if sdxl else {}
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        **extra,
    )


def tiny_dit(seed: int = 0) -> DiTTransformer2DModel:
    """Two DiT blocks, learned sigma (out_channels = 2 * in_channels), 4 classes + null."""
    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=4)


def make_batch(kind: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind == "unet":
        return {"noise": torch.randn(2, 3, 8, 8, generator=g), "class_labels": torch.tensor([0, 1])}
    if kind == "dit":
        return {"noise": torch.randn(2, 4, 8, 8, generator=g), "class_labels": torch.tensor([1, 3])}
    batch = {"noise": torch.randn(2, 4, 8, 8, generator=g), "encoder_hidden_states": torch.randn(2, 3, 8, generator=g)}
    if kind == "sdxl":
        batch["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 8, generator=g),
                                      "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]] * 2)}
    return batch


BUILDERS = {"unet": tiny_unet, "cond": tiny_cond_unet, "sdxl": lambda: tiny_cond_unet(sdxl=True), "dit": tiny_dit}


def build(kind: str, **config):
    model = BUILDERS[kind]().eval()  # from_pretrained models are in eval mode too
    batch = make_batch(kind)
    cfg = ReuseConfig(**{"num_steps": 5, "guidance_scale": 3.0, **config})
    return model, apply_reuse(model, cfg, batch), batch


def random_grid(supernet, seed: int = 0, p: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(supernet.num_steps, len(supernet.block_names), generator=g) > p  # (S, B)
    grid[0] = True
    return grid


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("kind", ["unet", "cond", "dit"])
def test_all_open_equals_reference(kind: str, scheduler: str) -> None:
    model, sn, batch = build(kind, scheduler=scheduler)
    assert isinstance(sn, SuperNet)
    ref = sn.reference(batch)
    out = sn.gated(batch, torch.ones(len(sn.slots)))
    assert ref["output"].shape == batch["noise"].shape
    assert ref["eps"].shape == (5, *batch["noise"].shape)
    torch.testing.assert_close(out["output"], ref["output"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["eps"], ref["eps"], rtol=1e-5, atol=1e-5)
    # the reference is the plain model through the shared loop
    remove_reuse(model)
    with torch.no_grad():
        plain, _ = sample(make_model_fn(model), make_scheduler(scheduler), batch, 5, 3.0, null_class=sn.null_class)
    assert torch.equal(plain, ref["output"])


def test_sdxl_added_cond_kwargs_and_batch() -> None:
    _, sn, batch = build("sdxl", num_steps=4)
    ref = sn.reference(batch)
    torch.testing.assert_close(sn.gated(batch, torch.ones(len(sn.slots)))["output"], ref["output"])
    grid = random_grid(sn, 3)
    torch.testing.assert_close(sn.sample(batch, grid), sn.gated(batch, grid[1:].flatten().float())["output"])


def test_slots_are_step_major() -> None:
    _, sn, _ = build("unet")
    assert sn.grid_shape == (4, 7)
    assert sn.block_names == ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block",
                              "up_blocks.0", "up_blocks.1", "up_blocks.2"]
    assert sn.slots[0].name == "step01/down_blocks.0" and sn.slots[0].step == 1
    assert sn.slots[7 + 4].name == "step02/up_blocks.0" and sn.slots[11].kind == "reuse"
    grid = sn.gate_grid(torch.arange(28.0))
    assert grid.shape == (5, 7) and bool((grid[0] == 1).all()) and grid[2, 4] == 11


def test_unet_consumer_graph() -> None:
    """Skip tensors: conv_in + [d0, d0(down), d1, d1(down), d2]; each up block pops 2."""
    model = tiny_unet()
    adapter = get_reuse_adapter(model)
    graph = adapter.graph(model, adapter.units(model, "block", "auto"), "block")
    assert graph.consumers == ((1, 5, 6), (2, 4, 5), (3, 4), (4,), (5,), (6,), ())
    assert graph.always_needed == (False,) * 6 + (True,)


@pytest.mark.parametrize("kind,granularity", [("unet", "block"), ("cond", "block"), ("dit", "block"),
                                              ("unet", "layer"), ("cond", "layer"), ("dit", "layer")])
def test_hard_plan_equals_soft_gates(kind: str, granularity: str) -> None:
    _, sn, batch = build(kind, granularity=granularity, scheduler="dpmsolver++")
    if granularity == "layer":
        torch.testing.assert_close(sn.gated(batch, torch.ones(len(sn.slots)))["output"], sn.reference(batch)["output"])
    grid = random_grid(sn, 1)
    hard = sn.sample(batch, grid, return_dict=True)
    soft = sn.gated(batch, grid[1:].flatten().float())
    torch.testing.assert_close(hard["output"], soft["output"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hard["eps"], soft["eps"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hard["output"], sn.reference(batch)["output"])


def _count_executions(sn) -> dict[str, list[int]]:
    """Hooks on a child of every unit: they fire only when the unit's original forward runs."""
    counts = {name: [0] for name in sn.block_names}
    for unit in sn.units:
        # DiT calls transformer_blocks[0].norm1.emb from outside the block: hook attn1 there
        child = getattr(unit.module, "attn1", None) or next(m for m in unit.module.modules() if isinstance(m, nn.Conv2d))
        child.register_forward_pre_hook(lambda *_, c=counts[unit.name]: c.__setitem__(0, c[0] + 1))
    return counts


def test_reused_and_cascaded_blocks_are_not_executed() -> None:
    _, sn, batch = build("unet")
    counts = _count_executions(sn)
    grid = torch.ones(5, 7, dtype=torch.bool)
    grid[2, 4] = False  # up_blocks.0 reused at step 2 -> mid_block and down_blocks.2 feed nobody
    grid[3, 0] = False  # down_blocks.0 reused at step 3: its consumers still run
    sn.sample(batch, grid)
    got = {k: v[0] for k, v in counts.items()}
    assert got == {"down_blocks.0": 4, "down_blocks.1": 5, "down_blocks.2": 4, "mid_block": 4,
                   "up_blocks.0": 4, "up_blocks.1": 5, "up_blocks.2": 5}
    eff = sn.effective(grid)
    assert eff[2, 2] == 0 and eff[2, 3] == 0 and eff[2, 1] == 1


def test_dit_output_mode_chain_cascade() -> None:
    _, sn, batch = build("dit", mode="output")
    counts = _count_executions(sn)
    grid = torch.ones(5, 2, dtype=torch.bool)
    grid[1:, 1] = False  # last block reused -> the first one feeds nobody
    sn.sample(batch, grid)
    assert {k: v[0] for k, v in counts.items()} == {"transformer_blocks.0": 1, "transformer_blocks.1": 1}
    assert sn.plan_cost(grid) == pytest.approx((5 * sn.always_paid_macs + sum(sn.unit_macs)) / sn.full_cost())


def test_costs_consistent_and_differentiable() -> None:
    model, sn, batch = build("unet")
    one_call = model_macs(model, torch.randn(2, 3, 8, 8), timestep=torch.tensor([1, 1]),
                          class_labels=torch.tensor([0, 2]))  # both CFG halves of one sample
    assert sn.full_cost() == pytest.approx(5 * one_call)
    assert sum(s.cost for s in sn.slots[:7]) < one_call
    assert float(sn.expected_cost(torch.ones(len(sn.slots)))) == pytest.approx(1.0)
    for seed in range(3):
        grid = random_grid(sn, seed)
        expected = sn.expected_cost(grid[1:].flatten().float())
        assert float(expected) == pytest.approx(sn.plan_cost(grid), rel=1e-6)
        assert 0.0 < float(expected) <= 1.0
    gates = torch.full((len(sn.slots),), 0.7, requires_grad=True)
    sn.expected_cost(gates).backward()
    assert bool((gates.grad > 0).all())
    gates = torch.full((len(sn.slots),), 0.7, requires_grad=True)
    sn.gated(batch, gates)["output"].square().mean().backward()
    assert gates.grad.abs().sum() > 0


def test_checkpointing_and_truncation_keep_values_and_gradients() -> None:
    grads, outs = [], []
    for extra in ({}, {"checkpointing": True}):
        _, sn, batch = build("cond", num_steps=4, **extra)
        gates = torch.full((len(sn.slots),), 0.6, requires_grad=True)
        out = sn.gated(batch, gates)["output"]
        out.square().mean().backward()
        grads.append(gates.grad)
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[0], grads[1])
    _, sn, batch = build("cond", num_steps=4, truncate_steps=2)
    gates = torch.full((len(sn.slots),), 0.6, requires_grad=True)
    out = sn.gated(batch, gates)["output"]
    torch.testing.assert_close(out.detach(), outs[0])
    out.square().mean().backward()
    assert gates.grad.reshape(sn.grid_shape)[0].abs().sum() == 0  # step 1 is behind the cut at step 2
    assert gates.grad.abs().sum() > 0


def test_remove_restores_model_exactly() -> None:
    model = tiny_unet()
    model.train()
    x, t, y = torch.randn(1, 3, 8, 8), torch.tensor([10]), torch.tensor([1])
    before = model(x, t, class_labels=y).sample
    sn = apply_reuse(model, ReuseConfig(num_steps=3), make_batch("unet"))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert list(sn.model.parameters()) and not list(vars(sn).get("parameters", []))
    with pytest.raises(RuntimeError, match="already has reuse gates"):
        apply_reuse(model, ReuseConfig(num_steps=3), make_batch("unet"))
    remove_reuse(model)
    assert all(p.requires_grad for p in model.parameters()) and model.training
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(model(x, t, class_labels=y).sample, before)


def test_unsupported_model_and_bad_modes() -> None:
    with pytest.raises(UnsupportedModelError, match=r"Linear.*down_blocks.*transformer_blocks"):
        apply_reuse(nn.Linear(4, 4), ReuseConfig(num_steps=3), {"noise": torch.randn(1, 4)})
    with pytest.raises(ValueError, match="residual"):
        build("unet", mode="residual")
    with pytest.raises(ValueError, match="granularity"):
        build("unet", granularity="channel")
    with pytest.raises(ValueError, match="num_steps"):
        ReuseConfig(num_steps=1)


def test_generic_transformer_path_pixart() -> None:
    """PixArt is not registered: found through ``transformer_blocks``; text CFG with a given negative."""
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                     caption_channels=12, use_additional_conditions=False).eval()
    batch = {"noise": torch.randn(2, 4, 8, 8), "encoder_hidden_states": torch.randn(2, 3, 12),
             "negative_encoder_hidden_states": torch.randn(2, 3, 12),
             "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    sn = apply_reuse(model, ReuseConfig(num_steps=4, guidance_scale=2.0), batch)
    assert sn.block_names == ["transformer_blocks.0", "transformer_blocks.1"] and sn.modes == ["residual"] * 2
    torch.testing.assert_close(sn.gated(batch, torch.ones(len(sn.slots)))["output"], sn.reference(batch)["output"])
    grid = torch.ones(4, 2, dtype=torch.bool)
    grid[2:, 0] = False
    torch.testing.assert_close(sn.sample(batch, grid), sn.gated(batch, grid[1:].flatten().float())["output"])


def test_lazy_package_exports() -> None:
    import dipgo.postprocess as post
    import dipgo.supernets as supernets

    assert supernets.apply_reuse is apply_reuse and supernets.UnsupportedModelError is UnsupportedModelError
    assert callable(post.install_plan) and callable(post.extract_reuse_plan)


class ToyDenoiser(nn.Module):
    """A denoiser whose blocks sit under a name the generic discovery does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Conv2d(3, 3, 3, padding=1) for _ in range(2)])

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True) -> tuple:
        h = sample
        for layer in self.layers:
            h = h + layer(h)
        return (h,)


@register_reuse_adapter(ToyDenoiser)
class ToyAdapter(ReuseAdapter):
    def units(self, model: nn.Module, granularity: str, mode: str) -> list[ReuseUnit]:
        return [ReuseUnit(f"layers.{i}", layer, "output") for i, layer in enumerate(model.layers)]

    def graph(self, model: nn.Module, units: list[ReuseUnit], granularity: str) -> ConsumerGraph:
        return ConsumerGraph.independent(len(units))


def test_registered_adapter() -> None:
    torch.manual_seed(0)
    model = ToyDenoiser()
    batch = {"noise": torch.randn(2, 3, 4, 4)}
    sn = apply_reuse(model, ReuseConfig(num_steps=3), batch)
    assert isinstance(get_reuse_adapter(model), ToyAdapter) and sn.block_names == ["layers.0", "layers.1"]
    assert all(s.cost == 3 * 3 * 9 * 16 for s in sn.slots)  # Conv2d 3->3, 3x3 kernel, 4x4 output
    torch.testing.assert_close(sn.gated(batch, torch.ones(4))["output"], sn.reference(batch)["output"])
    assert get_reuse_adapter(tiny_unet()).__class__.__name__ == "UNetAdapter"
