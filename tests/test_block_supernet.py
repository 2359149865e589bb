"""The ``block`` gate kind: discovery, the gated SuperNet and physical removal, over timm families.

Every architecture in ``TIMM_COVERAGE`` is built tiny (random weights, 32x32 inputs): all gates
open must give the original output, closed gates must give exactly what the physically removed
model gives, and the removed model's counted MACs must drop by the removed blocks' counted share.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from dipgo.errors import UnsupportedModelError
from dipgo.measure.macs import model_macs
from dipgo.postprocess.block_subnet import make_block_plan, remove_blocks
from dipgo.supernets.block import (
    TIMM_COVERAGE,
    BlockSuperNet,
    apply_block_gates,
    find_blocks,
    register_block_finder,
)
from dipgo.supernets.gates import SuperNet
from tests.conftest import close, default_closed, tiny_timm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def frozen_macs(model: nn.Module, x: torch.Tensor) -> float:
    model.requires_grad_(False)  # the FLOP counter's module tracker trips on leaf inputs needing grad
    return model_macs(model, x)


@pytest.mark.parametrize("arch,kwargs", TIMM_COVERAGE, ids=[a for a, _ in TIMM_COVERAGE])
def test_supernet_matches_physical_removal(arch: str, kwargs: dict[str, Any]) -> None:
    model, example = tiny_timm(arch, kwargs)
    x = example["images"]
    with torch.no_grad():
        original = model(x)
    supernet = apply_block_gates(model, example)
    assert isinstance(supernet, SuperNet)
    n = len(supernet.blocks)
    assert n >= 2 and find_blocks(model) == supernet.blocks  # structural + synthetic probe agrees
    assert all(s.kind == "block" and s.name == s.block and s.step is None and s.cost > 0 for s in supernet.slots)

    assert torch.allclose(supernet.gated(example, torch.ones(n))["output"], original, atol=1e-5)
    assert torch.allclose(supernet.reference(example)["output"], original, atol=1e-5)

    keep = close(supernet.blocks, default_closed(supernet.blocks))
    gated = supernet.gated(example, torch.tensor(keep, dtype=torch.float32))["output"]
    assert not torch.allclose(gated, original, atol=1e-6), "closing blocks must change the output"
    removed = remove_blocks(model, make_block_plan(supernet, keep)).eval()
    assert not any(m._forward_hooks for m in removed.modules())  # the copy carries no gates
    with torch.no_grad():
        assert torch.allclose(removed(x), gated, rtol=1e-4, atol=1e-5)

    closed_macs = sum(s.cost for s, k in zip(supernet.slots, keep) if not k)
    assert frozen_macs(removed, x) == pytest.approx(supernet.full_cost() - closed_macs, rel=0.02)
    assert supernet.remove() is model
    with torch.no_grad():
        assert torch.allclose(model(x), original, atol=1e-5)


def test_bert_encoder_layers_are_gated_and_removed() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    model = BertModel(config).eval()
    batch = {"input_ids": torch.randint(0, 50, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}

    def hidden(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state

    supernet = apply_block_gates(model, batch, output_fn=hidden)
    assert supernet.blocks == [f"encoder.layer.{i}" for i in range(4)] == find_blocks(model)
    assert torch.equal(supernet.gated(batch, torch.ones(4))["output"], supernet.reference(batch)["output"])
    keep = [True, False, True, False]
    gated = supernet.gated(batch, torch.tensor(keep, dtype=torch.float32))["output"]
    removed = remove_blocks(model, make_block_plan(supernet, keep))
    assert removed.config.num_hidden_layers == 2 and len(removed.encoder.layer) == 2
    assert model.config.num_hidden_layers == 4  # the original is untouched
    with torch.no_grad():
        assert torch.allclose(hidden(removed, batch), gated, atol=1e-5)
    assert frozen_macs(removed, batch["input_ids"]) <= supernet.full_cost() * 2  # batch of 2


def test_unsupported_model_names_class_and_attributes() -> None:
    with pytest.raises(UnsupportedModelError, match=r"Linear .*layer1\.\.layerN.*stages\.i\.blocks.*encoder\.layer"):
        find_blocks(nn.Linear(4, 4))
    linear = nn.Linear(4, 4)
    with pytest.raises(UnsupportedModelError, match="Linear"):
        apply_block_gates(linear, {"images": torch.randn(1, 4)})
    assert linear.weight.requires_grad  # a refused wrap leaves the model as it was


def test_default_output_fn_names_the_batch_keys_it_needs() -> None:
    model, _ = tiny_timm("resnet18", dict(TIMM_COVERAGE)["resnet18"])
    with pytest.raises(ValueError, match=r"batch\['images'\].*input_ids: pass output_fn"):
        apply_block_gates(model, {"input_ids": torch.ones(1, 4, dtype=torch.long)})


def test_gradient_reaches_every_gate_and_cost_is_differentiable() -> None:
    model, example = tiny_timm("vit_tiny_patch16_224", dict(TIMM_COVERAGE)["vit_tiny_patch16_224"])
    supernet = apply_block_gates(model, example)
    gates = torch.full((len(supernet.blocks),), 0.5, requires_grad=True)
    supernet.gated(example, gates)["output"].square().sum().backward()
    assert gates.grad is not None and bool((gates.grad != 0).all())
    assert not any(p.requires_grad for p in model.parameters())  # frozen: the pruner owns the parameters

    gates = torch.full((len(supernet.blocks),), 0.25, requires_grad=True)
    cost = supernet.expected_cost(gates)
    cost.backward()
    costs = torch.tensor([s.cost for s in supernet.slots])
    assert cost.item() == pytest.approx(1 - 0.75 * costs.sum().item() / supernet.full_cost())
    assert torch.allclose(gates.grad, costs / supernet.full_cost())
    assert supernet.expected_cost(torch.ones(len(costs))).item() == pytest.approx(1.0)


def test_set_costs_replaces_slot_costs_and_full_cost() -> None:
    model, example = tiny_timm("resnet18", dict(TIMM_COVERAGE)["resnet18"])
    supernet = apply_block_gates(model, example)
    latency = [0.5, 1.0, 1.5, 2.0]
    supernet.set_costs(latency, 10.0)
    assert [s.cost for s in supernet.slots] == latency and supernet.full_cost() == 10.0
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert supernet.expected_cost(keep).item() == pytest.approx(1 - 3.0 / 10.0)
    with pytest.raises(ValueError, match="expected 4 block costs"):
        supernet.set_costs([1.0], 10.0)


def test_gates_of_wrong_shape_and_double_wrapping_are_refused() -> None:
    model, example = tiny_timm("resnet18", dict(TIMM_COVERAGE)["resnet18"])
    supernet = apply_block_gates(model, example)
    with pytest.raises(ValueError, match=r"gates must have shape \(4,\)"):
        supernet.gated(example, torch.ones(3))
    with pytest.raises(RuntimeError, match="already has block gates"):
        apply_block_gates(model, example)
    supernet.remove()
    assert isinstance(apply_block_gates(model, example), BlockSuperNet)


def test_shape_changing_blocks_are_excluded() -> None:
    model, example = tiny_timm("resnet50", dict(TIMM_COVERAGE)["resnet50"])
    blocks = apply_block_gates(model, example).blocks
    assert not any(b.endswith(".0") for b in blocks)  # every stage's first block projects its shortcut
    assert blocks == [f"layer{s}.{i}" for s, d in zip(range(1, 5), (3, 4, 6, 3)) for i in range(1, d)]


class _Tower(nn.Module):
    """A layout no pattern knows: residual blocks under ``trunk``, plus a widening layer."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4), "widen": nn.Linear(4, 8)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.trunk["a"](x)
        x = self.trunk["b"](x)
        return self.trunk["widen"](x)


def test_registered_finder_and_shape_probe() -> None:
    register_block_finder(_Tower)(lambda m: ["trunk.a", "trunk.b", "trunk.widen"])
    model = _Tower()
    example = {"images": torch.randn(2, 4)}
    assert find_blocks(model, example) == ["trunk.a", "trunk.b"]  # the widening layer changes the shape
    supernet = apply_block_gates(model, example)
    assert [s.cost for s in supernet.slots] == [16.0, 16.0] and supernet.full_cost() == 64.0  # per element
