"""Block SubNet export: reload with timm / transformers alone, same output as the removed model;
plans for another architecture and families a config cannot describe are refused in one sentence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from torch import nn

from dipgo.errors import PlanError, UnsupportedModelError
from dipgo.postprocess.block_subnet import (
    SUBNET_FILE,
    SUPERNET_ONLY_COVERAGE,
    TIMM_EXPORT_COVERAGE,
    export_block_subnet,
    load_block_subnet,
    make_block_plan,
    remove_blocks,
)
from dipgo.postprocess.plan import Plan
from dipgo.supernets.block import TIMM_COVERAGE, apply_block_gates
from tests.conftest import close, default_closed, tiny_timm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
COVERAGE = dict(TIMM_COVERAGE)
# Families whose blocks differ by position inside a stage (SE on every other RepViT block,
# EdgeNeXt's global blocks last, Twins alternating local/global attention, Swin alternating
# shifted windows): their plans close blocks whose removal leaves every kept block where timm
# builds the same kind of block.
EXPORT_CLOSED: dict[str, list[str]] = {
    "repvit_m0_9": ["stages.1.blocks.1", "stages.3.blocks.1"],
    "edgenext_xx_small": ["stages.1.blocks.0", "stages.3.blocks.0"],
    "twins_svt_small": ["blocks.1.2", "blocks.3.2"],
    "swin_tiny_patch4_window7_224": ["layers.0.blocks.1", "layers.1.blocks.1"],
    "swinv2_tiny_window8_256": ["layers.0.blocks.1", "layers.1.blocks.1"],
}


def gated_plan(model: nn.Module, example: dict[str, torch.Tensor], closed: list[str] | None = None) -> Plan:
    """A plan closing ``closed`` (default: a middle and the last block), made from a SuperNet."""
    supernet = apply_block_gates(model, example)
    blocks = supernet.blocks
    plan = make_block_plan(supernet, close(blocks, closed or default_closed(blocks)))
    supernet.remove()
    return plan


def plain_modules(model: nn.Module, library: str) -> bool:
    return all(type(m).__module__.startswith((f"{library}.", "torch.")) for m in model.modules())


def test_export_coverage_is_wide() -> None:
    assert len(TIMM_EXPORT_COVERAGE) >= 20
    assert {a for a, _ in TIMM_EXPORT_COVERAGE} | set(SUPERNET_ONLY_COVERAGE) == set(COVERAGE)


@pytest.mark.parametrize("arch,kwargs", TIMM_EXPORT_COVERAGE, ids=[a for a, _ in TIMM_EXPORT_COVERAGE])
def test_timm_export_reloads_without_dipgo(arch: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    model, example = tiny_timm(arch, kwargs)
    plan = gated_plan(model, example, EXPORT_CLOSED.get(arch))
    removed = remove_blocks(model, plan).eval()
    out = export_block_subnet(model, plan, tmp_path / "subnet", {"library": "timm", "architecture": arch})

    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert type(reloaded) is type(model) and plain_modules(reloaded, "timm")
    with torch.no_grad():
        assert torch.allclose(reloaded(example["images"]), removed(example["images"]), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in model.parameters())

    summary = json.loads((out / SUBNET_FILE).read_text())
    assert summary["library"] == "timm" and summary["architecture"] == arch
    assert summary["removed_blocks"] == [b for b, k in zip(plan.blocks, plan.compute[0]) if not k]
    assert Plan.load(out / "plan.json") == plan
    assert type(load_block_subnet(out)) is type(model)


def test_removal_renumbers_blocks_and_config_records_new_depth(tmp_path: Path) -> None:
    model, example = tiny_timm("vit_tiny_patch16_224", COVERAGE["vit_tiny_patch16_224"])
    plan = gated_plan(model, example, ["blocks.1"])
    removed = remove_blocks(model, plan)
    assert [n for n, _ in removed.blocks.named_children()] == ["0", "1", "2"]
    assert torch.equal(removed.blocks[1].attn.qkv.weight, model.blocks[2].attn.qkv.weight)
    out = export_block_subnet(model, plan, tmp_path / "vit", {"library": "timm"})
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["model_args"]["depth"] == 3
    assert json.loads((out / SUBNET_FILE).read_text())["renamed"] == {
        "blocks.0": "blocks.0", "blocks.2": "blocks.1", "blocks.3": "blocks.2"}


def test_regnet_stage_children_are_renumbered() -> None:
    model, example = tiny_timm("regnetx_002", COVERAGE["regnetx_002"])
    plan = gated_plan(model, example, ["s3.b2"])
    removed = remove_blocks(model, plan)
    assert [n for n, _ in removed.s3.named_children()] == ["b1", "b2", "b3"]
    assert torch.equal(removed.s3.b2.conv1.conv.weight, model.s3.b3.conv1.conv.weight)


@pytest.mark.parametrize("arch", SUPERNET_ONLY_COVERAGE)
def test_families_without_depth_kwarg_refuse_export(arch: str, tmp_path: Path) -> None:
    model, example = tiny_timm(arch, COVERAGE[arch])
    plan = gated_plan(model, example)
    out = tmp_path / "subnet"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    family = type(model).__name__  # EfficientNet, MobileNetV3, RegNet, GhostNet, MetaFormer, MlpMixer
    with pytest.raises(UnsupportedModelError, match=f"cannot export a block SubNet of timm's {family}"):
        export_block_subnet(model, plan, out, {"library": "timm"})
    assert [p.name for p in out.iterdir()] == ["earlier.txt"]  # a refused export leaves the folder as it was
    remove_blocks(model, plan)  # removal in Python still works


def test_swin_block_moved_to_an_unshifted_position_is_refused(tmp_path: Path) -> None:
    model, example = tiny_timm("swin_tiny_patch4_window7_224", COVERAGE["swin_tiny_patch4_window7_224"])
    plan = gated_plan(model, example, ["layers.0.blocks.0"])
    with pytest.raises(PlanError, match=r"layers\.0\.blocks\.0 with .*shift_size.*not interchangeable"):
        export_block_subnet(model, plan, tmp_path / "swin", {"library": "timm"})
    assert not (tmp_path / "swin").exists()


def test_plan_for_another_architecture_is_refused_at_first_mismatch() -> None:
    small, example = tiny_timm("resnet18", COVERAGE["resnet18"])
    plan = gated_plan(small, example)
    deeper, _ = tiny_timm("resnet34", COVERAGE["resnet18"])  # same class, 3 blocks in layer1
    with pytest.raises(PlanError, match=r"plan block 'layer1\.1' does not match .*\['BasicBlock', \d+, 2\]"):
        remove_blocks(deeper, plan)
    bare = Plan(**{**plan.to_dict(), "meta": {}})  # a plan made without signatures
    with pytest.raises(PlanError, match=r"plan block 'layer2\.1' \(number 1\) does not match .*'layer1\.2'"):
        remove_blocks(deeper, bare)
    missing = Plan(**{**bare.to_dict(), "blocks": ["layer1.1", "layer9.1", "layer3.1", "layer4.1"]})
    with pytest.raises(PlanError, match=r"plan block 'layer9\.1' does not exist in this ResNet"):
        remove_blocks(small, missing)


def test_plan_for_another_model_class_or_kind_is_refused(tmp_path: Path) -> None:
    resnet, example = tiny_timm("resnet18", COVERAGE["resnet18"])
    plan = gated_plan(resnet, example)
    convnext, _ = tiny_timm("convnext_atto", COVERAGE["convnext_atto"])
    with pytest.raises(PlanError, match="searched on a ResNet, not on this ConvNeXt"):
        export_block_subnet(convnext, plan, tmp_path / "x", {"library": "timm"})
    reuse = Plan(**{**plan.to_dict(), "kind": "mask"})
    with pytest.raises(PlanError, match="'mask' plan"):
        remove_blocks(resnet, reuse)


def test_bert_export_reloads_with_automodel(tmp_path: Path) -> None:
    from transformers import AutoModel, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    model = BertModel(config).eval()
    batch = {"input_ids": torch.randint(0, 50, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}

    def hidden(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return m(**b).last_hidden_state

    supernet = apply_block_gates(model, batch, output_fn=hidden)
    plan = make_block_plan(supernet, [True, False, True, True])
    removed = remove_blocks(model, plan)
    out = export_block_subnet(model, plan, tmp_path / "bert", {"library": "transformers"})
    reloaded = AutoModel.from_pretrained(out).eval()
    assert type(reloaded) is BertModel and plain_modules(reloaded, "transformers")
    assert reloaded.config.num_hidden_layers == 3
    with torch.no_grad():
        assert torch.allclose(hidden(reloaded, batch), hidden(removed, batch), atol=1e-5)
        assert torch.allclose(hidden(load_block_subnet(out), batch), supernet.gated(
            batch, torch.tensor([1.0, 0.0, 1.0, 1.0]))["output"], atol=1e-5)


def test_shipped_digits_classifier_exports_and_reloads_in_a_fresh_process(tmp_path: Path) -> None:
    """The reference ResNet loaded from its timm folder, exported with the source the search
    records (architecture, model_args, pretrained_cfg from its config.json), reloads in a Python
    that never imports dipgo, keeping the 1x16x16 preprocessing config."""
    folder = REPO / "models" / "digits_cnn"
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    cfg = json.loads((folder / "config.json").read_text())
    source = {"library": "timm", "architecture": cfg["architecture"], "model_args": cfg["model_args"],
              "pretrained_cfg": cfg["pretrained_cfg"]}
    example = {"images": torch.randn(2, 1, 16, 16)}
    plan = gated_plan(model, example, ["layer1.1", "layer3.1"])
    out = export_block_subnet(model, plan, tmp_path / "digits", source)
    torch.save(example["images"], tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(remove_blocks(model, plan).eval()(example["images"]), tmp_path / "y.pt")
    script = (
        "import sys, timm, torch\n"
        f"m = timm.create_model('local-dir:{out}', pretrained=True).eval()\n"
        f"x, y = torch.load('{tmp_path / 'x.pt'}'), torch.load('{tmp_path / 'y.pt'}')\n"
        "assert torch.allclose(m(x), y, atol=1e-5), 'output differs'\n"
        "assert m.pretrained_cfg['input_size'] == (1, 16, 16), m.pretrained_cfg['input_size']\n"
        "assert not [k for k in sys.modules if k.startswith('dipgo')], 'dipgo was imported'\n"
        "print(type(m).__module__, [len(getattr(m, f'layer{i}')) for i in range(1, 5)])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": ""}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-5:] == ["timm.models.resnet", "[1,", "2,", "1,", "2]"]
