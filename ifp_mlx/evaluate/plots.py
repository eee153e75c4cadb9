"""PNG figures of a run (``--plot DIR``): accuracy and NLL against keep, and mask overlap per layer.

Each selector is a line over its keep ratios, starting from the dense model
at keep 1 (where every selector keeps every channel); one panel per task (or
NLL column). The heatmaps show, per selector and keep, each layer's mean mask
overlap for every pair of domains: the diagonal pairs (code x code) are
within a domain, the others across. matplotlib draws with the Agg backend:
no display is needed.
"""

import math
from pathlib import Path

import numpy as np

from ..errors import IFPError
from .report import Row, columns


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise IFPError("--plot needs matplotlib: pip install 'ifp-mlx[eval]' (or matplotlib)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves(rows: list[Row], attribute: str, column: str) -> dict[str, list[tuple[float, float]]]:
    """Per selector, (keep, value) points of one column, dense's keep-1 point first in every line."""
    dense = [(r.keep, getattr(r, attribute)[column]) for r in rows if r.selector == "dense" and column in getattr(r, attribute)]
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        value = getattr(row, attribute).get(column)
        if row.selector == "dense" or value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        lines.setdefault(row.selector, list(dense)).append((row.keep, value))
    if dense and not lines:
        lines["dense"] = dense
    return {name: sorted(points) for name, points in lines.items()}


def _against_keep(rows: list[Row], attribute: str, ylabel: str, path: Path) -> Path:
    plt = _pyplot()
    names = columns(rows, attribute)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, column in zip(axes[0], names):
        for selector, points in curves(rows, attribute, column).items():
            keeps, values = zip(*points)
            ax.plot(keeps, values, marker="o", label=selector)
        ax.set_title(column)
        if attribute == "accuracy":
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("keep (fraction of FFN channels)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def overlap_heatmaps(rows: list[Row], path: Path) -> Path:
    """One heatmap per pruned (selector, keep): domain pairs x layers, overlap 0..1."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    panels = [r for r in rows if r.overlaps]
    cols = min(3, len(panels))
    grid_rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(5.2 * cols, 0.5 + 2.6 * grid_rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    image = None
    for ax, row in zip(axes.flat, panels):
        pairs = sorted(row.overlaps, key=lambda p: (p[0] != p[1], p))  # within first
        data = np.stack([row.overlaps[p][0] for p in pairs])
        image = ax.imshow(data, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(pairs)), [a if a == b else f"{a} x {b}" for a, b in pairs], fontsize=7)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(row.name, fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="mask overlap |A∩B|/k")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(rows: list[Row], folder: Path) -> list[Path]:
    """The run's figures in ``folder``: accuracy.png, nll.png and overlap.png, each where there is data."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if columns(rows, "accuracy"):
        written.append(_against_keep(rows, "accuracy", "accuracy", folder / "accuracy.png"))
    if columns(rows, "nll"):
        written.append(_against_keep(rows, "nll", "NLL (lower is better)", folder / "nll.png"))
    if any(r.overlaps for r in rows):
        written.append(overlap_heatmaps(rows, folder / "overlap.png"))
    return written
