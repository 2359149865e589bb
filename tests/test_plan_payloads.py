"""Typed plan payloads: each kind's builder input as a dataclass, stored as the same JSON as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dipgo.errors import PlanError
from dipgo.postprocess.plan import BlockPayload, JointPayload, MaskPayload, Plan, ReusePayload

# plan.json files as dipgo wrote them before the payloads existed (trimmed to the typed keys + provenance)
OLD_PLANS = {
    "reuse": {"kind": "reuse", "model": "UNet2DModel", "blocks": ["a", "b"], "compute": [[True, True], [False, True]],
              "target": 0.5, "cost_ratio": 0.75, "num_steps": 2,
              "meta": {"granularity": "block", "mode": "auto", "modes": ["output", "residual"], "scheduler": "ddim",
                       "seed": 0}, "version": 1},
    "block": {"kind": "block", "model": "BertModel", "blocks": ["l.0", "l.1"], "compute": [[True, False]],
              "target": 0.5, "cost_ratio": 0.5, "num_steps": None,
              "meta": {"block_signatures": {"l.0": ["BertLayer", 10, 0], "l.1": ["BertLayer", 10, 0]},
                       "selection": "dipgo"}, "version": 1},
    "mask": {"kind": "mask", "model": "BertModel", "blocks": ["q", "k"], "compute": [[False, True]], "target": 0.5,
             "cost_ratio": 0.5, "num_steps": None,
             "meta": {"density": [0.25, 1.0], "pattern": "unstructured", "saliency": "wanda"}, "version": 1},
    "joint": {"kind": "joint", "model": "DiT", "blocks": ["t.0"], "compute": [[True], [False]], "target": 0.3,
              "cost_ratio": 0.3, "num_steps": 2,
              "meta": {"kinds": ["reuse", "mask"], "mask": {"pattern": "unstructured", "layers": ["t.0.ff", "t.0.attn"],
                                                             "density": [0.5, 0.9], "layer_macs": [2.0, 1.0]},
                       "granularity": "block", "mode": "auto", "modes": ["residual"]}, "version": 1},
}


@pytest.mark.parametrize("kind", list(OLD_PLANS))
def test_old_plan_files_load_and_save_byte_identical(kind: str, tmp_path: Path) -> None:
    src = tmp_path / "old.json"
    src.write_text(json.dumps(OLD_PLANS[kind], indent=2) + "\n")
    plan = Plan.load(src)
    plan.save(tmp_path / "new.json")
    assert (tmp_path / "new.json").read_text() == src.read_text()


@pytest.mark.parametrize("kind", ["reuse", "block", "mask"])
def test_payload_round_trips_to_the_same_meta_keys(kind: str) -> None:
    meta = OLD_PLANS[kind]["meta"]
    payload = Plan.from_dict(json.loads(json.dumps(OLD_PLANS[kind]))).payload
    assert type(payload) is {"reuse": ReusePayload, "block": BlockPayload, "mask": MaskPayload}[kind]
    assert {**meta, **payload.to_meta()} == meta  # serialised to exactly the keys and values it came from


def test_payload_fields() -> None:
    reuse = Plan.from_dict(OLD_PLANS["reuse"]).payload
    assert reuse == ReusePayload("block", "auto", ["output", "residual"])
    mask = Plan.from_dict(OLD_PLANS["mask"]).payload
    assert mask.pattern == "unstructured" and mask.pruned(["q", "k"]) == {"q": 0.25}
    joint = Plan.from_dict(OLD_PLANS["joint"]).payload
    assert isinstance(joint, JointPayload) and joint.kinds == ["reuse", "mask"]
    assert joint.reuse == ReusePayload("block", "auto", ["residual"])
    assert joint.mask == MaskPayload("unstructured", [0.5, 0.9]) and joint.mask_layers == ["t.0.ff", "t.0.attn"]
    block_joint = JointPayload.from_meta({"kinds": ["block"]})
    assert block_joint.reuse is None and block_joint.mask is None


def test_a_mask_plan_without_its_payload_is_refused() -> None:
    data = json.loads(json.dumps(OLD_PLANS["mask"]))
    del data["meta"]["pattern"]
    with pytest.raises(PlanError, match="meta.pattern and meta.density"):
        _ = Plan.from_dict(data).payload
    with pytest.raises(PlanError, match="2 densities for 3 layers"):
        MaskPayload("unstructured", [0.5, 1.0]).pruned(["a", "b", "c"])
