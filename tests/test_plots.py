"""Report figures: every function writes a real PNG; the Pareto front is right by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dipgo.report.plots import (
    cost_bars,
    gate_heatmap,
    loss_curves,
    macs_pareto_plot,
    pareto_front,
    pareto_plot,
    sample_grid,
    to_uint8_grid,
)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == _PNG_MAGIC


# Written the way Lightning's CSVLogger writes it: one row per log call, empty cells elsewhere.
_METRICS_CSV = """epoch,step,train/cost,train/distortion,train/loss,train/target,val/psnr
0,0,0.9,0.10,1.0,0.5,
0,1,0.8,0.12,0.9,0.5,
0,2,0.7,0.15,0.8,0.5,
0,2,,,,,21.5
0,3,0.6,0.16,0.7,0.5,
0,4,0.5,0.17,0.6,0.5,
0,4,,,,,20.9
"""


def test_gate_heatmap_hard_and_soft(tmp_path: Path) -> None:
    blocks = [f"down_blocks.{i}" for i in range(4)] + ["mid_block"]
    hard = (torch.rand(10, 5) > 0.5).float()
    _assert_png(gate_heatmap(hard, blocks, tmp_path / "hard.png"))
    _assert_png(gate_heatmap(np.random.rand(60, 5), blocks, tmp_path / "soft.png", title="probs"))
    with pytest.raises(ValueError):
        gate_heatmap(hard, blocks[:3], tmp_path / "bad.png")


def test_to_uint8_grid_shape_and_range() -> None:
    images = torch.linspace(-2, 2, 5 * 16).reshape(5, 1, 4, 4)
    grid = to_uint8_grid(images, nrow=3, padding=2)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 6 + 2, 3 * 6 + 2, 3)
    assert grid.min() == 0 and grid.max() == 255  # out-of-range values are clipped
    with pytest.raises(ValueError):
        to_uint8_grid(torch.zeros(2, 2, 4, 4))


def test_sample_grid(tmp_path: Path) -> None:
    images = {
        "full": torch.rand(16, 1, 16, 16) * 2 - 1,
        "dipgo": torch.rand(16, 1, 16, 16) * 2 - 1,
        "12-step DDIM": torch.rand(16, 3, 16, 16) * 2 - 1,
    }
    _assert_png(sample_grid(images, tmp_path / "grid.png", nrow=4, title="same noise"))


def test_pareto_front_by_hand() -> None:
    pts = [
        {"speedup": 1.0, "fidelity": 40.0},  # best fidelity: front
        {"speedup": 2.0, "fidelity": 30.0},  # front
        {"speedup": 1.5, "fidelity": 25.0},  # dominated by (2, 30)
        {"speedup": 3.0, "fidelity": 20.0},  # best speed: front
        {"speedup": 2.0, "fidelity": 30.0},  # duplicate of a front point: kept
        {"speedup": 3.0, "fidelity": 10.0},  # same speed, worse fidelity: dominated
    ]
    assert pareto_front(pts) == [True, True, False, True, True, False]
    assert pareto_front([]) == []
    assert pareto_front([{"speedup": 2.0, "fidelity": float("nan")}, {"speedup": 1.0, "fidelity": 5.0}]) == [
        False,
        True,
    ]


def test_pareto_plot_with_inf(tmp_path: Path) -> None:
    points = [
        {"name": "full", "speedup": 1.0, "fidelity": float("inf"), "group": "reference"},
        {"name": "dipgo-50%", "speedup": 1.9, "fidelity": 31.0, "group": "dipgo"},
        {"name": "dipgo-30%", "speedup": 2.8, "fidelity": 26.0, "group": "dipgo"},
        {"name": "DDIM-12", "speedup": 2.0, "fidelity": 24.0, "group": "fewer steps"},
    ]
    _assert_png(pareto_plot(points, tmp_path / "pareto.png"))


def test_loss_curves_default_and_grouped(tmp_path: Path) -> None:
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(_METRICS_CSV)
    _assert_png(loss_curves(csv_path, tmp_path / "curves.png"))
    keys = ["train/loss", ["train/cost", "train/target"], "val/psnr"]
    _assert_png(loss_curves(csv_path, tmp_path / "curves_sel.png", keys=keys))
    with pytest.raises(ValueError, match="nope"):
        loss_curves(csv_path, tmp_path / "bad.png", keys=["nope"])


def test_cost_bars(tmp_path: Path) -> None:
    macs = {"conv_in": 2e6, "down_blocks.0": 4.5e7, "mid_block": 3e7, "up_blocks.0": 9e7, "conv_out": 1e6}
    _assert_png(cost_bars(macs, tmp_path / "bars.png"))


def test_macs_pareto_plot_fronts(tmp_path: Path) -> None:
    from dipgo.report.plots import _cost_front

    # cheaper-or-equal and better: PSNR higher is better, FD lower is better
    assert _cost_front([0.2, 0.2, 0.3, 0.35], [40.0, 35.0, 38.0, 45.0], True) == [True, False, False, True]
    assert _cost_front([0.2, 0.25, 0.3], [1.5, 1.2, 1.3], False) == [True, True, False]
    assert _cost_front([0.2, 0.3], [float("nan"), 1.0], False) == [False, True]
    points = [
        {"name": "dipgo", "group": "dipgo", "macs_ratio": 0.2, "psnr": 42.0, "fd": 1.3},
        {"name": "taylorseer1", "group": "TaylorSeer", "macs_ratio": 0.2, "psnr": 38.0, "fd": 1.36},
        {"name": "fewer_steps", "group": "fewer steps", "macs_ratio": 0.24, "psnr": 34.0},  # no FD
    ]
    _assert_png(macs_pareto_plot(points, tmp_path / "macs.png", full_fd=1.32))
    with pytest.raises(ValueError):
        macs_pareto_plot([], tmp_path / "none.png")


def test_cost_curves_draws_each_series_and_skips_empty_ones(tmp_path: Path) -> None:
    from dipgo.report.plots import cost_curves

    out = cost_curves({"joint": [(0.3, 30.0), (0.2, 25.0)], "reuse": [(0.25, 27.0)], "mask": []},
                      tmp_path / "c.png", xlabel="kept MACs", ylabel="PSNR", title="t")
    assert out.stat().st_size > 1000
