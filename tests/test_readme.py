"""The README's Python example runs as written (in a scratch folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_example() -> None:
    assert _python_blocks(), "README lost its Python API example"


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for block in _python_blocks():
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    images = namespace["images"]
    assert tuple(images.shape) == (8, 1, 16, 16)
    assert (tmp_path / "runs" / "digits_unet_reuse").is_dir()
    assert len(namespace["reloaded"].blocks) == 3  # the depth example: 3 of 6 ViT blocks exported
    guided = namespace["x"]  # the hand-written CFG loop with handle.step(i)
    assert tuple(guided.shape) == (8, 1, 16, 16) and bool(torch.isfinite(guided).all())
    assert not (guided == namespace["batch"]["noise"]).all()
