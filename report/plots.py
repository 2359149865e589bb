"""The figures every report shares. Each function writes one PNG and returns its path.

Figures are built as bare ``matplotlib.figure.Figure`` objects rendered by the Agg canvas, never
through pyplot: no display is needed (servers, CI), the caller's global backend is left alone,
and nothing is registered in pyplot's figure manager, so a report drawing hundreds of figures
leaks none.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.utils import make_grid

_DPI = 120
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _figure(rows: int = 1, cols: int = 1, figsize: tuple[float, float] = (6, 4)) -> tuple[Figure, np.ndarray]:
    """A pyplot-free Agg figure and its ``(rows, cols)`` array of axes."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    fig.clear()
    return path


def _as_numpy(x: np.ndarray | Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=float)


def gate_heatmap(
    compute: np.ndarray | Tensor,
    blocks: list[str],
    path: str | Path,
    title: str = "Blocks computed (dark) vs reused (light) per step",
) -> Path:
    """Heatmap of a reuse plan: steps on y, blocks on x, ``compute (S, B)`` keep prob or 0/1.

    White-to-blue with fixed limits [0, 1], so a hard plan reads as blue = computed, white =
    reused, and soft probabilities sit in between. The right axis shows each step's kept fraction.
    """
    grid = _as_numpy(compute)
    if grid.ndim != 2 or grid.shape[1] != len(blocks):
        raise ValueError(f"compute must be (steps, {len(blocks)} blocks), got {grid.shape}")
    steps, n_blocks = grid.shape
    fig, axes = _figure(figsize=(min(2 + 0.35 * n_blocks, 16), min(1.5 + 0.25 * steps, 14)))
    ax = axes[0, 0]
    im = ax.imshow(grid, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(n_blocks), blocks, rotation=90, fontsize=7)
    ax.set_yticks(range(0, steps, max(1, math.ceil(steps / 20))))
    ax.set_xlabel("block")
    ax.set_ylabel("step")
    ax.set_title(title)
    _annotate_kept_fraction(ax, grid.mean(axis=1))
    fig.colorbar(im, ax=ax, label="P(compute)", pad=0.14, fraction=0.04)
    return _save(fig, path)


def _annotate_kept_fraction(ax: Axes, kept: np.ndarray) -> None:
    """Per-step kept fraction as tick labels on a twin y axis (thinned past ~40 steps)."""
    side = ax.twinx()
    side.set_ylim(ax.get_ylim())
    every = max(1, math.ceil(len(kept) / 40))
    rows = range(0, len(kept), every)
    side.set_yticks(list(rows), [f"{kept[r]:.0%}" for r in rows], fontsize=6)
    side.set_ylabel("kept", fontsize=8)


def to_uint8_grid(images: Tensor, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """Tile a batch ``(B, 1|3, H, W)`` in ``[-1, 1]`` into one ``(H', W', 3)`` uint8 image.

    Always three channels (grey is repeated) so that imshow, PIL and ``wandb.Image`` take it as is.
    Values outside [-1, 1] are clipped rather than rescaled: rescaling per batch would hide a
    variant whose outputs drifted in brightness.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1|3, H, W), got {tuple(images.shape)}")
    unit = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).contiguous()
    grid = make_grid(unit, nrow=nrow, padding=padding, pad_value=1.0)  # (3, H', W')
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def sample_grid(
    images: dict[str, Tensor],
    path: str | Path,
    nrow: int = 8,
    title: str | None = None,
) -> Path:
    """One labelled panel per variant ("full", "dipgo", "12-step DDIM", ...), side by side.

    Pass the same noise to every variant so the panels are comparable image for image.
    """
    if not images:
        raise ValueError("images is empty: pass {variant name: (B, C, H, W) tensor}")
    grids = {name: to_uint8_grid(batch, nrow) for name, batch in images.items()}
    fig, axes = _figure(1, len(grids), figsize=(3.2 * len(grids), 3.6))
    for ax, (name, grid) in zip(axes[0], grids.items()):
        ax.imshow(grid, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def pareto_front(points: Sequence[dict]) -> list[bool]:
    """``True`` for points no other point beats: maximise both ``speedup`` and ``fidelity``.

    A point is dominated when another is at least as good on both axes and better on one; equal
    points do not dominate each other, so duplicates on the front are all kept.
    """
    xy = [(float(p["speedup"]), float(p["fidelity"])) for p in points]
    valid = [(x, y) for x, y in xy if not (math.isnan(x) or math.isnan(y))]

    def on_front(xi: float, yi: float) -> bool:
        if math.isnan(xi) or math.isnan(yi):
            return False  # an unmeasured point is never optimal
        return not any(x >= xi and y >= yi and (x > xi or y > yi) for x, y in valid)

    return [on_front(x, y) for x, y in xy]


def _cost_front(cost: Sequence[float], value: Sequence[float], higher_is_better: bool) -> list[bool]:
    """``True`` for points no other point beats at lower-or-equal cost (NaN values are never optimal)."""
    sign = 1.0 if higher_is_better else -1.0
    pts = [(float(c), sign * float(v)) for c, v in zip(cost, value)]
    ok = [(c, v) for c, v in pts if not (math.isnan(c) or math.isnan(v))]

    def on_front(c: float, v: float) -> bool:
        if math.isnan(c) or math.isnan(v):
            return False
        return not any(c2 <= c and v2 >= v and (c2 < c or v2 > v) for c2, v2 in ok)

    return [on_front(c, v) for c, v in pts]


def macs_pareto_plot(
    points: list[dict],
    path: str | Path,
    full_fd: float | None = None,
    title: str = "MACs vs fidelity",
    fd_slack: float = 1.1,
) -> Path:
    """Two panels, MACs (% of the full model) vs PSNR and MACs vs FD, Pareto fronts dashed.

    Each point is ``{"name", "group", "macs_ratio", "psnr", "fd"}`` (``fd`` may be missing).
    PSNR is better higher, FD lower; ``full_fd`` draws the full model's FD and the
    ``fd_slack`` band (a plan whose FD is above it is not a win, see the reuse verdict).
    Users compare methods at a cost, so cost is on x here, unlike :func:`pareto_plot`'s speedup.
    """
    if not points:
        raise ValueError("points is empty")
    fig, axes = _figure(1, 2, figsize=(11, 4.5))
    groups = list(dict.fromkeys(str(p["group"]) for p in points))
    x_all = np.asarray([100.0 * float(p["macs_ratio"]) for p in points])
    for ax, key, better_high, label in ((axes[0, 0], "psnr", True, "PSNR vs full model (dB), higher is better"),
                                        (axes[0, 1], "fd", False, "FD proxy, lower is better")):
        y_all = np.asarray([float(p[key]) if p.get(key) is not None else math.nan for p in points])
        y_all[~np.isfinite(y_all)] = math.nan
        for gi, group in enumerate(groups):
            idx = [i for i, p in enumerate(points) if str(p["group"]) == group]
            ax.scatter(x_all[idx], y_all[idx], marker=_MARKERS[gi % len(_MARKERS)], color=f"C{gi % 10}",
                       label=group, zorder=3)
        front = np.asarray(_cost_front(x_all, y_all, better_high))
        if front.any():
            order = np.argsort(x_all[front])
            ax.plot(x_all[front][order], y_all[front][order], "k--", lw=1, zorder=2, label="Pareto front")
        if key == "fd" and full_fd is not None and math.isfinite(full_fd):
            ax.axhline(full_fd, color="grey", lw=1, label="full model")
            ax.axhspan(full_fd, full_fd * fd_slack, color="grey", alpha=0.15, label=f"within {fd_slack - 1:.0%} of full")
        ax.set_xlabel("MACs (% of the full model)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    return _save(fig, path)


def _finite_fidelity(values: list[float]) -> tuple[np.ndarray, float | None]:
    """Replace ``inf`` (e.g. PSNR of the full model vs itself) by a level just above the finite
    points, so it stays on the plot; returns that level (or None) to label it."""
    y = np.asarray(values, dtype=float)
    finite = y[np.isfinite(y)]
    if np.isfinite(y).all():
        return y, None
    top = float(finite.max()) if finite.size else 1.0
    span = float(finite.max() - finite.min()) if finite.size > 1 else 1.0
    level = top + 0.1 * max(span, 1.0)
    return np.where(np.isposinf(y), level, y), level


def cost_curves(series: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, xlabel: str,
                ylabel: str, title: str) -> Path:
    """One line with markers per named series of ``(cost, value)`` points, sorted by cost: how
    several methods trade cost for quality (e.g. joint search vs each gate kind alone)."""
    fig, axes = _figure(figsize=(5.5, 3.8))
    ax = axes[0, 0]
    for name, points in series.items():
        pts = sorted((float(c), float(v)) for c, v in points)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def pareto_plot(
    points: list[dict],
    path: str | Path,
    fidelity_label: str = "PSNR (dB)",
    title: str = "Speed vs fidelity",
) -> Path:
    """Speedup (x) vs fidelity (y); one marker and colour per ``group``; Pareto front joined.

    Each point is ``{"name", "speedup", "fidelity", "group"}``. A fidelity of ``inf`` (identical
    to the reference) is drawn just above the others and labelled so.
    """
    if not points:
        raise ValueError("points is empty")
    x = np.asarray([float(p["speedup"]) for p in points])
    y, inf_level = _finite_fidelity([float(p["fidelity"]) for p in points])
    front = np.asarray(pareto_front(points))
    fig, axes = _figure(figsize=(6, 4.5))
    ax = axes[0, 0]
    groups = list(dict.fromkeys(str(p["group"]) for p in points))
    for gi, group in enumerate(groups):
        idx = [i for i, p in enumerate(points) if str(p["group"]) == group]
        ax.scatter(x[idx], y[idx], marker=_MARKERS[gi % len(_MARKERS)], color=f"C{gi}", label=group, zorder=3)
    order = np.argsort(x[front])
    ax.plot(x[front][order], y[front][order], "k--", lw=1, zorder=2, label="Pareto front")
    ax.scatter(x[front], y[front], s=160, facecolors="none", edgecolors="k", zorder=4)
    for i, p in enumerate(points):
        ax.annotate(str(p["name"]), (x[i], y[i]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    if inf_level is not None:
        ax.axhline(inf_level, color="grey", lw=0.5, ls=":")
        ax.text(
            ax.get_xlim()[1],
            inf_level,
            "identical to reference ",
            ha="right",
            va="bottom",
            fontsize=7,
            color="grey",
        )
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("speedup (x, measured)")
    ax.set_ylabel(fidelity_label)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _read_metrics(metrics_csv: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Columns of a Lightning CSVLogger file as ``{key: [(step, value), ...]}``.

    CSVLogger writes one row per logging call with empty cells for keys not logged then, and
    ``step``/``epoch`` as bookkeeping columns; we keep only the non-empty numeric cells.
    """
    series: dict[str, list[tuple[float, float]]] = {}
    with open(metrics_csv, newline="") as f:
        for row_idx, row in enumerate(csv.DictReader(f)):
            step = float(row["step"]) if row.get("step") else float(row_idx)
            for key, cell in row.items():
                if key in ("step", "epoch") or not cell:
                    continue
                try:
                    series.setdefault(key, []).append((step, float(cell)))
                except ValueError:
                    continue
    return series


def _default_groups(keys: list[str]) -> list[list[str]]:
    """One subplot per key, except that a ``...target...`` key joins the panel of its
    ``...cost...`` partner, so expected cost and its target are read against each other."""
    groups: list[list[str]] = []
    placed: set[str] = set()
    for key in keys:
        if key in placed:
            continue
        partner = key.replace("cost", "target")
        group = [key] + ([partner] if partner != key and partner in keys else [])
        placed.update(group)
        groups.append(group)
    return groups


def loss_curves(
    metrics_csv: str | Path,
    path: str | Path,
    keys: Sequence[str | Sequence[str]] | None = None,
) -> Path:
    """Training curves from a Lightning CSVLogger ``metrics.csv``: one subplot per key.

    ``keys`` picks what to draw; an entry that is a list of keys shares one subplot (e.g.
    ``["train/cost", "train/target"]``). By default every logged key is drawn, with each
    ``*target*`` key overlaid on its ``*cost*`` partner when both exist.
    """
    series = _read_metrics(metrics_csv)
    if keys is None:
        groups = _default_groups(list(series))
    else:
        groups = [[k] if isinstance(k, str) else list(k) for k in keys]
    missing = sorted({k for g in groups for k in g} - set(series))
    if missing or not groups:
        raise ValueError(f"keys not in {metrics_csv}: {missing}; logged keys: {sorted(series)}")
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = _figure(rows, cols, figsize=(4 * cols, 2.8 * rows))
    for ax, group in zip(axes.flat, groups):
        for key in group:
            steps, values = zip(*series[key])
            ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)
        ax.set_title(" vs ".join(group), fontsize=9)
        ax.set_xlabel("step")
        if len(group) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def _mac_unit(largest: float) -> tuple[float, str]:
    for scale, unit in ((1e9, "GMACs"), (1e6, "MMACs"), (1e3, "KMACs")):
        if largest >= scale:
            return scale, unit
    return 1.0, "MACs"


def cost_bars(
    per_block_macs: dict[str, float],
    path: str | Path,
    title: str = "MACs per block",
) -> Path:
    """Horizontal bars of MACs per block (in model order), each labelled with its share of the
    blocks' total: where the compute is, hence which gates the budget depends on."""
    if not per_block_macs:
        raise ValueError("per_block_macs is empty")
    names = list(per_block_macs)
    macs = np.asarray([float(per_block_macs[n]) for n in names])
    scale, unit = _mac_unit(float(macs.max()))
    total = float(macs.sum()) or 1.0
    fig, axes = _figure(figsize=(6, 1 + 0.28 * len(names)))
    ax = axes[0, 0]
    bars = ax.barh(range(len(names)), macs / scale, color="C0")
    ax.bar_label(bars, [f"{m / total:.0%}" for m in macs], fontsize=7, padding=2)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()  # first block on top, as in the model
    ax.set_xlabel(unit)
    ax.set_ylabel("block")
    ax.set_title(title)
    ax.margins(x=0.12)
    return _save(fig, path)


def block_keep_plot(
    blocks: list[str],
    keep_probs: list[float],
    kept: list[bool],
    costs: list[float],
    path: str | Path,
    title: str = "Learned keep probability per block (removed blocks hatched)",
) -> Path:
    """Bars of each block's keep probability, removed blocks hatched, with each block's cost
    share on the right: which blocks the pruner let go and what they were worth."""
    if not (len(blocks) == len(keep_probs) == len(kept) == len(costs)) or not blocks:
        raise ValueError("blocks, keep_probs, kept and costs must be non-empty and of equal length")
    total = float(sum(costs)) or 1.0
    fig, axes = _figure(figsize=(6, 1 + 0.3 * len(blocks)))
    ax = axes[0, 0]
    colors = ["C0" if k else "C3" for k in kept]
    bars = ax.barh(range(len(blocks)), keep_probs, color=colors)
    for bar, k in zip(bars, kept, strict=True):
        if not k:
            bar.set_hatch("//")
    ax.bar_label(bars, [f"{c / total:.0%} of cost" for c in costs], fontsize=7, padding=2)
    ax.set_yticks(range(len(blocks)), blocks, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.35)
    ax.set_xlabel("P(keep)")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def reuse_density_plot(
    grid: np.ndarray | Tensor, units: Sequence[str], layers: Sequence[str], densities: Sequence[float],
    path: str | Path, *, title: str,
) -> Path:
    """A joint reuse + mask plan: the reuse grid ``(steps, units)`` beside the per-layer kept
    densities (no mask part: the grid alone), so one figure shows where the budget went."""
    fig, axes = _figure(1, 2, figsize=(11, 4))
    ax_grid, ax_dens = axes[0]
    kept = _as_numpy(grid).astype(float).T  # (units, steps)
    ax_grid.imshow(kept, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
    ax_grid.set(title="reuse: computed (green) per step", xlabel="sampling step", ylabel="unit")
    ax_grid.set_yticks(range(len(units)), list(units), fontsize=6)
    if layers:
        ax_dens.bar(range(len(densities)), list(densities), color="tab:blue")
        ax_dens.set_xticks(range(len(layers)), [p.replace("transformer_blocks.", "b") for p in layers],
                           rotation=90, fontsize=5)
        ax_dens.set(title="mask: kept density per layer", ylim=(0, 1.02))
    else:
        ax_dens.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def block_density_plot(
    keep: Sequence[bool], blocks: Sequence[str], layers: Sequence[str], densities: Sequence[float],
    owner: Sequence[int], path: str | Path, *, title: str,
) -> Path:
    """A joint block + mask plan: per-layer kept densities, grey where the layer's block
    (``owner[i]``, -1 for none) is removed; without a mask part, the kept blocks."""
    fig, axes = _figure(1, 1, figsize=(10, 4))
    ax = axes[0, 0]
    if layers:
        colors = ["lightgrey" if b >= 0 and not keep[b] else "tab:blue" for b in owner]
        ax.bar(range(len(densities)), list(densities), color=colors)
        ax.set_xticks(range(len(layers)), list(layers), rotation=90, fontsize=5)
        ax.set(ylabel="kept density", ylim=(0, 1.05))
    else:
        ax.bar(range(len(blocks)), [1.0 if k else 0.0 for k in keep], color="tab:green")
        ax.set_xticks(range(len(blocks)), list(blocks), rotation=90, fontsize=6)
        ax.set(ylabel="kept (1) / removed (0)", ylim=(0, 1.05))
    ax.set_title(title, fontsize=8)
    return _save(fig, path)
