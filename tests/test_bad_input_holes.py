"""Holes a bad-input fuzz found: a recipe name that climbs out of runs_root, a reuse target below
the SuperNet's floor refused only after training, and `dipgo report` on an empty folder. Each is
now refused with one sentence, exit code 2, and nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from dipgo.errors import ConfigError
from dipgo.search.compose import compose_config
from dipgo.search.progress import FirstStepEstimate, describe_search, format_duration
from dipgo.search.run import claim_run_dir
from tests.conftest import tiny_search_overrides


def _dipgo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dipgo", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*"))


@pytest.mark.parametrize("name", ["../../../../escape_dipgo", "a/b", "..", ".", "/abs", "x/../../y", "a\\b", ""])
def test_recipe_name_must_be_a_plain_name(name: str) -> None:
    with pytest.raises(ConfigError, match="must be a plain name"):
        compose_config([f"recipe_name={name}" if name else "recipe_name=''"])


@pytest.mark.parametrize("name", ["digits_unet_reuse", "my-unet.v2", "Run_3"])
def test_plain_recipe_names_are_accepted(name: str) -> None:
    cfg, _ = compose_config([f"recipe_name={name}"])
    assert cfg.recipe_name == name


def test_claim_run_dir_refuses_an_escaping_name_that_skipped_composition(tmp_path: Path) -> None:
    """A config edited after composition (the Python API) is checked again where the folder is made."""
    cfg = OmegaConf.create({"run_dir": None, "runs_root": str(tmp_path / "runs"), "recipe_name": "../escape"})
    with pytest.raises(ConfigError, match="must be a plain name"):
        claim_run_dir(cfg)
    assert _all_files(tmp_path) == []


def test_escaping_recipe_name_writes_nothing_anywhere(tmp_path: Path) -> None:
    """The fuzz's case through the CLI: refused before anything exists, inside or outside runs_root."""
    work = tmp_path / "a" / "b" / "c" / "d"
    work.mkdir(parents=True)
    result = _dipgo("search", "recipe=digits_unet_reuse", "recipe_name=../../../../escape_dipgo", "runs_root=runs",
                    "logger.wandb=false", cwd=work)
    assert result.returncode == 2, result.stderr
    assert "recipe_name='../../../../escape_dipgo' must be a plain name" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert _all_files(tmp_path) == sorted([tmp_path / "a", tmp_path / "a/b", tmp_path / "a/b/c", work])


def test_reuse_target_below_the_floor_is_refused_before_training(tiny_unet_dir: Path, tmp_path: Path) -> None:
    """4 sampling steps: reusing every block after step 0 still keeps more than a quarter of the
    MACs, so target 0.1 is unreachable; known when the SuperNet is built, before any folder."""
    runs = tmp_path / "runs"
    overrides = tiny_search_overrides(tiny_unet_dir, runs, **{"search.target": 0.1})
    result = _dipgo("search", *overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "is below the smallest reachable cost" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not runs.exists() or _all_files(runs) == [], "a refused search must leave no run folder or checkpoint"


def test_report_on_an_empty_folder_says_what_is_missing(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _dipgo("report", str(empty), cwd=tmp_path)
    assert result.returncode == 2
    assert "is an empty folder" in result.stderr and "report.json" in result.stderr
    assert "no such file or folder" not in result.stderr


def test_report_on_unfinished_runs_points_to_resume(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r" / "20260101-000000"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    result = _dipgo("report", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 2
    assert "no finished run" in result.stderr and f"resume={run}" in result.stderr


# --- what the search says before and at the start of training ---------------------------------


def test_describe_search_names_model_steps_target_and_sampler() -> None:
    cfg = OmegaConf.create({
        "recipe_name": "digits_unet_reuse", "model": {"name": "digits_unet"},
        "supernet": {"kind": "reuse", "cost": "macs", "num_steps": 50, "scheduler": "ddim"},
        "search": {"target": 0.25, "refine": {"enabled": True}},
        "trainer": {"max_steps": 100}, "data": {"batch_size": 4},
    })
    loaded = SimpleNamespace(model=SimpleNamespace(), kind="diffusion_unet")
    supernet = SimpleNamespace(slots=[SimpleNamespace(kind="reuse")] * 294)
    text = describe_search(cfg, loaded, supernet)
    for part in ("digits_unet_reuse", "294 reuse gates", "SimpleNamespace (digits_unet)", "50-step ddim",
                 "100 pruner steps of batch 4", "0.25 kept MACs", "refined"):
        assert part in text, (part, text)


def test_first_step_estimate_extrapolates_the_steps_after_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first step (cache building) is left out; the estimate covers the steps still to run."""
    clock = iter([0.0, 10.0, 10.0, 12.0, 12.0, 14.0, 14.0, 16.0])  # step times 10 s, then 2 s, 2 s
    monkeypatch.setattr("dipgo.search.progress.time.perf_counter", lambda: next(clock))
    lines: list[str] = []
    callback = FirstStepEstimate(estimate_after=3, printer=lines.append)
    trainer = SimpleNamespace(max_steps=100, global_step=0)
    for step in range(4):
        callback.on_train_batch_start(trainer)
        trainer.global_step = step + 1
        callback.on_train_batch_end(trainer)
    assert len(lines) == 1, lines
    assert "2.00 s per pruner step" in lines[0] and "remaining 97 of 100" in lines[0]
    assert format_duration(2.0 * 97) in lines[0]


def test_format_duration() -> None:
    assert format_duration(42.4) == "42 s"
    assert format_duration(75.2) == "1 min 15 s"
    assert format_duration(600) == "10 min 0 s"
