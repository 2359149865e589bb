"""The ``rowblock`` sparsity pattern: the same block count in every block-row (balanced kernel work)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dipgo.postprocess.mask_plan import extract_mask_plan
from dipgo.postprocess.mask_subnet import (
    export_mask_subnet,
    kernel_block,
    load_mask_subnet,
    prune_with_plan,
    to_kernels,
)
from dipgo.supernets.mask import (
    PATTERNS,
    MaskGateConfig,
    PatternError,
    apply_mask_gates,
    density_mask,
    parse_pattern,
    rank_scores,
    rowblock_count,
)

WIDTHS = (64, 128, 64, 32)


def _fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["x"])


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(WIDTHS[:-1], WIDTHS[1:]):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1]).eval()


def _batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(WIDTHS[0], WIDTHS[0], generator=gen)
    return [{"x": torch.randn(32, WIDTHS[0], generator=gen) @ mix} for _ in range(n)]


def _supernet(pattern: str, model: nn.Module | None = None):
    batches = _batches()
    model = model if model is not None else _mlp()
    sn = apply_mask_gates(model, batches[0], _fn, MaskGateConfig(pattern=pattern, exclude=()), calibration=batches)
    return sn, batches


def _row_counts(mask: torch.Tensor, b: int) -> torch.Tensor:
    """Kept blocks per block-row of an element mask."""
    o, i = mask.shape
    return mask.reshape(o // b, b, i // b, b).any(dim=3).any(dim=1).sum(dim=1)


def test_rowblock_patterns_parse() -> None:
    assert {"rowblock16", "rowblock32"} <= set(PATTERNS)
    for b in (16, 32, 64):
        p = parse_pattern(f"rowblock{b}")
        assert (p.kind, p.block, p.blocked, p.fixed_density) == ("rowblock", b, True, None)
    with pytest.raises(PatternError, match="rowblock16, rowblock32"):
        parse_pattern("rowblock8")


@pytest.mark.parametrize("b", [16, 32])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.62, 0.9])
def test_every_block_row_keeps_the_same_count(b: int, density: float) -> None:
    torch.manual_seed(0)
    score = torch.rand(128, 256) * torch.rand(1, 256)  # column-skewed: a global ranking would unbalance the rows
    mask = density_mask(score, density, parse_pattern(f"rowblock{b}"))
    k = rowblock_count(density, 256, b)
    assert k == min(max(round(density * 256 / b), 1), 256 // b)
    counts = _row_counts(mask, b)
    assert (counts == k).all()
    # whole blocks: a kept block is kept entirely
    assert int(mask.sum()) == k * b * b * (128 // b)
    # the density is the count's: k of the 256 / b blocks of every block-row
    assert float(mask.float().mean()) == pytest.approx(k * b / 256)
    if round(density * 256 / b) >= 1:  # the rounded count: within half a block of the density
        assert abs(float(mask.float().mean()) - density) <= 0.5 * b / 256 + 1e-9
    else:  # too low for one block per row: the floor of one block
        assert k == 1
    # the kept blocks are each row's most salient ones
    bs = score.reshape(128 // b, b, 256 // b, b).sum(dim=(1, 3))
    kept = mask.reshape(128 // b, b, 256 // b, b).any(3).any(1)
    assert (bs.masked_fill(~kept, -1).max(1).values >= bs.masked_fill(kept, 1e9).min(1).values).all()
    assert (bs.masked_fill(~kept, 1e9).min(1).values >= bs.masked_fill(kept, -1).max(1).values).all()


@pytest.mark.parametrize("b", [16, 32])
def test_threshold_bridge_matches_the_hard_mask(b: int) -> None:
    torch.manual_seed(0)
    score = torch.rand(64, 128)
    p = parse_pattern(f"rowblock{b}")
    u = rank_scores(score, p)
    cols = 128 // b
    for k in range(1, cols + 1):  # at the plan's quantised densities the threshold keeps exactly k per row
        assert torch.equal(u >= 1 - k / cols, density_mask(score, k / cols, p))
    for d in (0.2, 0.33, 0.41, 0.7):  # between them it keeps ~d overall, k or k+1 blocks per row
        hard = u >= 1 - d
        assert abs(float(hard.float().mean()) - d) <= 1 / ((64 // b) * cols) + 1e-6
        counts = _row_counts(hard, b)
        assert int(counts.max() - counts.min()) <= 1


@pytest.mark.parametrize("pattern", ["rowblock16", "rowblock32"])
def test_soft_mask_gradient_in_density(pattern: str) -> None:
    sn, batches = _supernet(pattern)
    for path in sn.layers:
        for d0 in (0.3, 0.5, 0.55):
            d = torch.tensor(d0, requires_grad=True)
            sn.soft_mask(path, d).sum().backward()
            assert d.grad is not None and float(d.grad) > 0
    gates = torch.tensor([0.5, 0.4, 0.6], requires_grad=True)
    out = sn.gated(batches[0], gates)["output"]
    F.mse_loss(out, sn.reference(batches[0])["output"]).backward()
    assert gates.grad is not None and gates.grad.abs().sum() > 0
    sn.remove()


@pytest.mark.parametrize("pattern", ["rowblock16", "rowblock32"])
def test_plan_density_is_what_the_mask_keeps(pattern: str) -> None:
    sn, _ = _supernet(pattern)
    p = sn.pattern
    plan = extract_mask_plan(torch.tensor([0.7, 0.3, 0.5]), sn, 0.45)
    sn.remove()
    costs = [s.cost for s in sn.slots]
    kept = 0.0
    for path, d, c in zip(plan.blocks, plan.meta["density"], costs):
        mask = density_mask(sn.saliency[path], d, p)
        in_f = mask.shape[1]
        assert (_row_counts(mask, p.block) == round(d * in_f / p.block)).all()
        assert float(mask.float().mean()) == pytest.approx(d, abs=1e-6)  # plans store 6 decimals
        kept += float(mask.float().mean()) * c
    assert kept / sum(costs) == pytest.approx(plan.cost_ratio, abs=1e-9)
    step = max(c / (w.shape[1] // p.block) for c, w in ((c, sn.saliency[q]) for q, c in zip(sn.layers, costs)))
    assert abs(plan.cost_ratio - 0.45) <= step / sum(costs)  # within one block column of the largest layer
    assert kernel_block(plan) == (p.block, p.block)


def test_refused_shapes_give_one_sentence() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16)).eval()
    batch = {"x": torch.randn(8, 64)}
    sn = apply_mask_gates(model, batch, _fn, MaskGateConfig(pattern="rowblock32", exclude=()))
    assert set(sn.refused) == {"2", "4"}
    assert sn.refused["2"] == "layer 2 (Linear, weight 48x64): pattern rowblock32 needs both dims divisible by 32; left dense"
    assert sn.refused["4"] == "layer 4 (Linear, weight 16x48): block 32x32 is larger than the weight; left dense"
    assert sn.fixed_density("2") == 1.0 and sn.fixed_density("0") is None
    sn.remove()
    conv = nn.Sequential(nn.Conv2d(16, 32, 1)).eval()
    sn = apply_mask_gates(conv, {"x": torch.randn(2, 16, 4, 4)}, _fn, MaskGateConfig(pattern="rowblock16", exclude=()))
    assert sn.refused["0"].endswith("block patterns run on the Linear kernel only; left dense")
    assert sn.refused["0"].count(".") == 0  # one sentence
    sn.remove()
    with pytest.raises(PatternError, match="strict_pattern=true refuses the run"):
        apply_mask_gates(model, batch, _fn, MaskGateConfig(pattern="rowblock32", strict_pattern=True, exclude=()))


@pytest.mark.parametrize("pattern", ["rowblock16", "rowblock32"])
def test_kernel_subnet_matches_masked_model_and_round_trips(pattern: str, tmp_path: Path) -> None:
    sn, batches = _supernet(pattern)
    b = sn.pattern.block
    plan = extract_mask_plan(torch.tensor([0.5, 0.3, 0.6]), sn, 0.4)
    sn.remove()
    pruned, masks = prune_with_plan(sn.model, plan, sn.saliency, batches, _fn, distill_steps=2)
    for path, d in zip(plan.blocks, plan.meta["density"]):
        m = masks[path]
        assert float(m.float().mean()) == pytest.approx(d)
        assert (_row_counts(m, b) == _row_counts(m, b)[0]).all()
        w = pruned.get_submodule(path).weight
        assert torch.all(w[~m] == 0)
    kern = copy.deepcopy(pruned)
    report = to_kernels(kern, masks, kernel_block(plan), force=True)
    assert all(r["converted"] for r in report.values())
    for path in masks:  # balanced: every block row of the kernel layout holds the same block count
        row_ptr = kern.get_submodule(path).row_ptr
        assert len(set(row_ptr.diff().tolist())) == 1
    x = batches[0]["x"]
    assert torch.allclose(kern(x), pruned(x), atol=1e-4, rtol=1e-4)
    export_mask_subnet(kern, plan, tmp_path / "sub")
    loaded = load_mask_subnet(tmp_path / "sub", model=_mlp())
    assert torch.equal(loaded(x), kern(x))


@pytest.mark.parametrize("pattern", ["block16", "rowblock16", "unstructured"])
def test_six_decimal_plan_densities_keep_the_planned_units(pattern: str) -> None:
    """A density stored as round(k / n, 6) must still keep k units (blocks, block columns, weights)."""
    torch.manual_seed(0)
    score = torch.rand(96, 144)
    p = parse_pattern(pattern)
    n = {"block": (96 // 16) * (144 // 16), "rowblock": 144 // 16, "unstructured": 96 * 144}[p.kind]
    unit = score.numel() / n if p.kind != "rowblock" else 96 * 16
    for k in range(1, n, max(n // 40, 1)):
        mask = density_mask(score, round(k / n, 6), p)
        assert int(mask.sum()) == k * unit, (k, n)
