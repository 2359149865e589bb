"""The command line as a user runs it: help texts, and one-sentence errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dipgo.cli import main


def _dipgo(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dipgo", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_top_level_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("search", "bench", "report", "export"):
        assert command in out


def test_search_help_lists_recipes_and_groups(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    out = capsys.readouterr().out
    assert "digits_unet_reuse" in out and "digits_dit_reuse" in out
    for group in ("model", "supernet", "search", "data", "trainer", "logger"):
        assert f"  {group}" in out


def test_search_cfg_prints_composed_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "--cfg", "recipe=digits_dit_reuse", "search.target=0.4"]) == 0
    out = capsys.readouterr().out
    assert "name: digits_dit" in out and "target: 0.4" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["search", "recipe=does_not_exist"], "unknown recipe 'does_not_exist'"),
        (["search", "serch.target=0.3"], "unknown config key 'serch.target'"),
        (["search", "search.target=2"], "search.target must be in (0, 1]"),
        (["search", "search.target=-0.1"], "search.target must be in (0, 1]"),
        (["search", "model.name=./no/such/folder"], "No folder at './no/such/folder'"),
        (["search", "model.name=not_a_model"], "Unknown model 'not_a_model'"),
        (["search", "model=digits_cnn"], "needs a diffusion denoiser"),
        (["search", "report.fd_judge=inception"], "report.fd_judge"),
        (["bench", "no_such_run"], "is not a dipgo run directory"),
        (["report", "no_such_folder"], "no such file or folder"),
    ],
)
def test_bad_input_is_one_sentence_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    (tmp_path / "runs").mkdir()
    before = sorted((tmp_path / "runs").rglob("*"))
    extra = ["runs_root=runs"] if args[0] == "search" else []
    result = _dipgo(*args, *extra, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted((tmp_path / "runs").rglob("*")) == before, "a refused run must not create or touch run folders"
