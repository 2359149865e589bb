"""`dipgo report`, `dipgo bench` and `dipgo export` on a finished (tiny) search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dipgo.cli import main
from dipgo.search.compose import compose_config
from dipgo.search.run import RunResult, run_search
from tests.conftest import tiny_search_overrides


@pytest.fixture(scope="module")
def finished_run(tiny_unet_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    root = tmp_path_factory.mktemp("runs")
    cfg, _ = compose_config(tiny_search_overrides(tiny_unet_dir, root, **{"trainer.max_steps": 3}))
    return run_search(cfg, quiet=True)


def test_report_single_run(finished_run: RunResult, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(finished_run.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "dipgo" in out and "PSNR" in out and "-step ddim" in out and "gate_heatmap.png" in out


def test_report_folder_of_runs_marks_pareto(finished_run: RunResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = finished_run.run_dir.parent.parent
    assert main(["report", str(root), "--out", str(tmp_path)]) == 0
    table = (tmp_path / "pareto.md").read_text()
    assert "| variant |" in table.splitlines()[0]
    rows = json.loads((tmp_path / "pareto.json").read_text())
    assert any(r["pareto"] for r in rows) and {r["variant"] for r in rows} >= {"dipgo", "fewer_steps"}
    assert (tmp_path / "pareto.png").stat().st_size > 1000


def test_bench_writes_json(finished_run: RunResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", str(finished_run.run_dir), "--runs", "1", "--warmup", "0", "--batch", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["speedup"] > 0 and result["latency"]["full"]["runs"] == 1
    assert "speedup" in capsys.readouterr().out


def test_export_reloads_bit_identical(finished_run: RunResult, tmp_path: Path) -> None:
    from dipgo.postprocess.reuse_subnet import load_subnet
    from dipgo.search.data import eval_batch
    from dipgo.supernets.reuse import ReuseConfig, apply_reuse

    out = tmp_path / "subnet"
    assert main(["export", str(finished_run.run_dir), "--out", str(out)]) == 0
    subnet = load_subnet(out)
    batch = eval_batch((1, 8, 8), 3, 3, seed=5)
    batch.pop("index")
    first, second = subnet.sample(batch), subnet.sample(batch)
    assert torch.equal(first, second)
    # the reloaded SubNet equals the SuperNet sampled with the same hard plan
    cfg = json.loads((finished_run.run_dir / "plan.json").read_text())
    model = subnet.model
    meta = cfg["meta"]
    reuse_cfg = ReuseConfig(num_steps=cfg["num_steps"], granularity=meta["granularity"], mode=meta["mode"],
                            forecast_order=meta.get("forecast_order", 0), scheduler=subnet.scheduler,
                            scheduler_config=subnet.scheduler_config)
    supernet = apply_reuse(model, reuse_cfg, batch)
    try:
        expected = supernet.sample(batch, torch.tensor(cfg["compute"]))
    finally:
        supernet.remove()
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-5)
    # export never overwrites
    assert main(["export", str(finished_run.run_dir), "--out", str(out)]) == 2



def test_bench_refuses_plan_from_another_sampler(finished_run: RunResult, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    import yaml

    run_dir = tmp_path / "edited"
    shutil.copytree(finished_run.run_dir, run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["supernet"]["scheduler"] == "ddim"
    config["supernet"]["scheduler"] = "unipc"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "bench.json"
    assert main(["bench", str(run_dir), "--runs", "1", "--warmup", "0", "--batch", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "searched on the ddim sampler but unipc is used" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
