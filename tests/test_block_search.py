"""The block gate kind end to end: config -> search -> plan -> removed, exported, reloaded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from dipgo.errors import PlanError
from dipgo.postprocess.block_plan import baseline_block_plan, fill_budget, kept_ratio, weight_norm_importance
from dipgo.postprocess.plan import Plan
from dipgo.search.compose import compose_config
from dipgo.search.run import run_search
from tests.conftest import tiny_bert_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_timm_folder(root: Path, arch: str = "resnet34", **kwargs: object) -> Path:
    """A random-weight timm classifier saved in timm's hub layout (loads with 'local-dir:')."""
    from timm.models import save_for_hf

    torch.manual_seed(0)
    args = dict(in_chans=1, num_classes=10, **kwargs)
    model = timm.create_model(arch, **args)
    folder = root / arch
    save_for_hf(model, str(folder), safe_serialization=True,
                data_config=dict(input_size=(1, 16, 16), interpolation="bilinear", mean=(0.5,), std=(0.5,), crop_pct=1.0))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_args"] = args
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def block_overrides(model: Path, runs_root: Path, **extra: object) -> list[str]:
    base = {
        "model.name": str(model),
        "supernet": "block",
        "data": "images",
        "recipe_name": "tiny_block",
        "runs_root": str(runs_root),
        "trainer.max_steps": 6,
        "trainer.enable_progress_bar": False,
        "trainer.log_every_n_steps": 1,
        "data.batch_size": 4,
        "data.pool_size": 8,
        "data.steps_per_epoch": 3,
        "search.target": 0.9,
        "search.distortion.mse": 0.0,
        "search.distortion.kl": 1.0,
        "report.num_samples": 16,
        "report.latency_runs": 1,
        "report.latency_warmup": 0,
        "report.latency_batch": 4,
        "report.baselines": "[weight_norm,drop_last,random]",
        "logger.wandb": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# ----------------------------------------------------------------------------- plan extraction


class _Slot:
    def __init__(self, cost: float):
        self.cost = cost


class _FakeSuperNet:
    def __init__(self, costs: list[float], full: float):
        self.slots, self.blocks, self._full = [_Slot(c) for c in costs], [str(i) for i in range(len(costs))], full
        self.model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in costs])

    def full_cost(self) -> float:
        return self._full


def test_fill_budget_closes_least_important_then_reopens_within_budget() -> None:
    costs, full = [10.0, 10.0, 30.0, 10.0], 100.0
    keep = fill_budget([0.1, 0.9, 0.2, 0.3], costs, full, target=0.75)
    # 0.1 (10) then 0.2 (30) closed -> 0.6; the 30 cannot re-open (0.9), the 10 can (0.7 <= 0.75)
    assert keep == [True, True, False, True]
    assert kept_ratio(keep, costs, full) == pytest.approx(0.7)
    keep = fill_budget([0.1, 0.9, 0.2, 0.3], costs, full, target=0.95)
    assert keep == [False, True, True, True]


def test_unreachable_target_names_the_floor() -> None:
    with pytest.raises(PlanError, match="smallest reachable target is 0.700"):
        fill_budget([0.5, 0.5], [10.0, 20.0], 100.0, target=0.5)


def test_baselines_order_blocks_by_their_criterion() -> None:
    sn = _FakeSuperNet([10.0] * 4, 100.0)
    drop_last = baseline_block_plan("drop_last", sn, target=0.8)
    assert drop_last.compute[0] == [True, True, False, False]
    with torch.no_grad():
        sn.model[1].weight.mul_(0.01)  # the smallest weights
    assert min(range(4), key=weight_norm_importance(sn.model, sn.blocks).__getitem__) == 1
    assert baseline_block_plan("weight_norm", sn, target=0.9).compute[0] == [True, False, True, True]
    with pytest.raises(ValueError, match="unknown block baseline"):
        baseline_block_plan("magic", sn, target=0.9)


# ----------------------------------------------------------------------------- end to end


def test_block_search_on_a_timm_classifier_exports_a_smaller_timm_model(tmp_path: Path) -> None:
    folder = tiny_timm_folder(tmp_path, channels=(8, 8, 16, 16), stem_width=8)
    cfg, _ = compose_config(block_overrides(folder, tmp_path / "runs"))
    result = run_search(cfg, quiet=True)
    plan = Plan.load(result.run_dir / "plan.json")
    assert plan.kind == "block" and plan.cost_ratio <= 0.9 and plan.num_closed > 0
    names = [v["name"] for v in result.report["variants"]]
    assert names == ["full", "dipgo", "weight_norm", "drop_last", "random"]
    dipgo = result.report["variants"][1]
    assert dipgo["macs_ratio"] == pytest.approx(plan.cost_ratio, abs=1e-6)  # counted on the removed model
    assert 0.0 <= dipgo["accuracy"] <= 1.0 and dipgo["agreement"] <= 1.0
    reloaded = timm.create_model(f"local-dir:{result.report['subnet_dir']}", pretrained=True).eval()
    assert type(reloaded).__module__.startswith("timm.")
    assert sum(len(getattr(reloaded, f"layer{i}")) for i in range(1, 5)) == 16 - plan.num_closed
    assert (result.run_dir / "plots" / "keep_probs.png").is_file()
    assert any("removed by dipgo" in line for line in result.summary)


def test_latency_target_measures_a_table_once_and_caches_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIPGO_CACHE", str(tmp_path / "cache"))
    folder = tiny_timm_folder(tmp_path, channels=(8, 8, 16, 16), stem_width=8)
    overrides = block_overrides(folder, tmp_path / "runs", **{"supernet.cost": "latency", "search.target": 0.95})
    first = run_search(compose_config(overrides)[0], quiet=True)
    table = first.report["latency_table"]
    assert table["cached"] is False and set(table["block_s"]) == set(first.plan.blocks)
    assert all(t > 0 for t in table["block_s"].values()) and table["full_s"] > max(table["block_s"].values())
    assert len(list((tmp_path / "cache" / "latency").glob("*.json"))) == 1
    second = run_search(compose_config(overrides)[0], quiet=True)
    assert second.report["latency_table"]["cached"] is True
    assert second.report["latency_table"]["block_s"] == table["block_s"]
    assert first.plan.cost_ratio <= 0.95


def test_unreachable_block_target_is_refused_before_a_run_dir_exists(tmp_path: Path) -> None:
    folder = tiny_timm_folder(tmp_path, arch="resnet18", channels=(8, 8, 16, 16), stem_width=8)
    cfg, _ = compose_config(block_overrides(folder, tmp_path / "runs", **{"search.target": 0.1}))
    with pytest.raises(PlanError, match="smallest reachable target"):
        run_search(cfg, quiet=True)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.yaml"))


def test_block_search_on_a_text_encoder_exports_fewer_layers_with_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    folder = tiny_bert_folder(tmp_path)
    overrides = block_overrides(folder, tmp_path / "runs", **{
        "data": "text", "data.max_length": 16, "search.target": 0.6,
        "search.distortion.kl": 0.0, "search.distortion.cosine": 1.0,
    })
    result = run_search(compose_config(overrides)[0], quiet=True)
    assert result.plan.blocks == [f"encoder.layer.{i}" for i in range(4)]
    dipgo = result.report["variants"][1]
    assert -1.0 <= dipgo["cosine"] <= 1.0 and result.report["fidelity_metric"] == "cosine"
    out = Path(result.report["subnet_dir"])
    model = AutoModel.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 4 - result.plan.num_closed
    tok = AutoTokenizer.from_pretrained(str(out))
    assert model(**tok(["a sentence"], return_tensors="pt")).last_hidden_state.shape[-1] == 32


def test_block_kind_on_a_denoiser_is_refused(tmp_path: Path, tiny_unet_dir: Path) -> None:
    from dipgo.errors import UnsupportedModelError

    cfg, _ = compose_config(block_overrides(tiny_unet_dir, tmp_path / "runs", **{"model.subfolder": "unet"}))
    with pytest.raises(UnsupportedModelError, match="needs a classifier"):
        run_search(cfg, quiet=True)


def test_text_corpus_splits_are_disjoint_and_stable() -> None:
    from dipgo.models.text import text_corpus

    train, test = text_corpus("train"), text_corpus("test")
    assert len(train) > 1000 and len(test) > 200
    assert not set(train) & set(test)
    assert text_corpus("test") == test
    with pytest.raises(ValueError, match="accepted: train, test, all"):
        text_corpus("validation")


def test_refine_block_keep_reaches_the_best_swap_within_budget() -> None:
    from dipgo.postprocess.block_plan import refine_block_keep

    costs, full = [10.0, 10.0, 10.0, 10.0], 100.0
    harm = [0.5, 0.1, 0.3, 0.2]  # distortion from removing each block: block 1 is the one to lose

    def score(keep: list[bool]) -> float:
        return sum(h for h, k in zip(harm, keep) if not k)

    seeds = {"learned": [True, True, True, False], "drop_last": [True, True, True, False]}
    keep, info = refine_block_keep(seeds, [0.9, 0.2, 0.8, 0.7], costs, full, target=0.9, score=score)
    assert keep == [True, False, True, True]
    assert info["final_score"] == pytest.approx(0.1) and info["accepted_moves"] == 1
    assert kept_ratio(keep, costs, full) <= 0.9
    capped, info = refine_block_keep(seeds, [0.9, 0.2, 0.8, 0.7], costs, full, target=0.9, score=score, max_evals=2)
    assert info["evaluations"] <= 3 and score(capped) <= 0.2


def test_fade_goes_linearly_to_zero_then_stays() -> None:
    from dipgo.search.finetune import fade

    assert [fade(s, 10, 0.5) for s in (0, 1, 5, 9)] == [1.0, 0.8, 0.0, 0.0]


def test_finetune_distils_the_subnet_and_exports_the_tuned_weights(tmp_path: Path) -> None:
    from dipgo.postprocess.block_subnet import load_block_subnet, remove_blocks

    folder = tiny_timm_folder(tmp_path, channels=(8, 8, 16, 16), stem_width=8)
    overrides = block_overrides(folder, tmp_path / "runs", **{
        "search.finetune.enabled": True, "search.finetune.steps": 4, "search.finetune.batch_size": 4,
        "search.finetune.lr": 1e-3})
    result = run_search(compose_config(overrides)[0], quiet=True)
    names = [v["name"] for v in result.report["variants"]]
    assert "dipgo+finetune" in names
    original = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    exported = load_block_subnet(result.report["subnet_dir"])
    x = torch.randn(2, 1, 16, 16)
    untuned = remove_blocks(original, result.plan).eval()
    assert not torch.allclose(exported(x), untuned(x))  # the weights moved: the tuned SubNet was exported
    assert (result.run_dir / "logs" / "finetune" / "metrics.csv").is_file()


def test_cli_report_bench_export_on_a_block_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dipgo.cli import main

    folder = tiny_timm_folder(tmp_path, channels=(8, 8, 16, 16), stem_width=8)
    result = run_search(compose_config(block_overrides(folder, tmp_path / "runs"))[0], quiet=True)
    assert main(["report", str(result.run_dir)]) == 0
    assert "removed by dipgo" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "agg")]) == 0
    assert "| accuracy |" in (tmp_path / "agg" / "pareto.md").read_text().splitlines()[0]
    bench = tmp_path / "bench.json"
    assert main(["bench", str(result.run_dir), "--runs", "1", "--warmup", "0", "--batch", "2", "--out", str(bench)]) == 0
    assert json.loads(bench.read_text())["removed"] == [b for b, k in zip(result.plan.blocks, result.plan.compute[0]) if not k]
    assert main(["export", str(result.run_dir), "--out", str(tmp_path / "exported")]) == 0
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'exported'}", pretrained=True).eval()
    shipped = timm.create_model(f"local-dir:{result.report['subnet_dir']}", pretrained=True).eval()
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(reloaded(x), shipped(x))
