"""What the chat shows: the terminal's four kinds of output, the statistics, the mask picture.

Replies and what a command was asked to show go to stdout; the statistics
line, notices and errors go to stderr, so a script that pipes a conversation
in gets only the replies on stdout, as with ``ifp generate``.
"""

import sys
from math import ceil
from typing import Optional, TextIO

import numpy as np
from rich.console import Console
from rich.text import Text

from ..engine.stats import GenerationStats

WIDTH = 80  # the picture fits a default terminal
SHADES = " ░▒▓█"  # share of a block kept: none, up to 1/4, 1/2, 3/4, more
CHANNELS_PER_CELL = 64


class Terminal:
    """Where each kind of output goes (stdout for replies and asked-for output, stderr for the rest)."""

    def __init__(self, err: Console, out: Optional[TextIO] = None):
        self.err = err
        self.out = out or sys.stdout

    def write(self, text: str) -> None:
        """Streamed reply text, shown as it arrives."""
        self.out.write(text)
        self.out.flush()

    def show(self, line: str = "") -> None:
        self.write(line + "\n")

    def note(self, line: str) -> None:
        self.err.print(line, style="dim", highlight=False, markup=False, soft_wrap=True)

    def error(self, line: str) -> None:
        self.err.print(Text.assemble(("error:", "red"), " ", line), highlight=False, soft_wrap=True)


def stats_line(stats: GenerationStats, stopped: bool = False) -> str:
    """One line after a reply: speed, where the time to the first token went, what came from the cache."""
    parts = [
        f"{stats.generation_tokens} tok {stats.generation_tps:.1f} tok/s" + (" (stopped)" if stopped else ""),
        f"ttft {stats.time_to_first_token * 1000:.0f} ms" + (f" ({phases(stats)})" if stats.phases else ""),
        f"prompt {stats.prompt_tokens} tok, {stats.cached_tokens} cached",
    ]
    if stats.read is not None:
        parts.append(f"read {stats.read.bytes / 1e6:.0f} MB")
    parts.append(f"peak {stats.peak_memory_gb:.2f} GB")
    if stats.submodel is not None:
        info = stats.submodel
        parts.append(f"{info.selector} k {info.k}/{info.total_channels}")
    return " | ".join(parts)


def phases(stats: GenerationStats) -> str:
    return ", ".join(f"{name} {seconds * 1000:.0f}" for name, seconds in stats.phases.items())


def stats_report(stats: GenerationStats, stopped: bool = False) -> list[str]:
    """``/stats``: everything the last reply measured, one topic a line."""
    finish = "stopped (Ctrl+C)" if stopped else stats.finish_reason or "-"
    cached = f" ({stats.cached_tokens} from the conversation's cache)"
    lines = [
        f"prompt       {stats.prompt_tokens} tokens{cached}, {stats.prompt_tps:.1f} tok/s processed",
        f"generated    {stats.generation_tokens} tokens, {stats.generation_tps:.1f} tok/s, finished: {finish}",
        f"first token  {stats.time_to_first_token * 1000:.0f} ms" + (f": {phases(stats)} ms" if stats.phases else ""),
    ]
    if stats.read is not None:
        lines.append(f"disk         {stats.read.bytes / 1e6:.1f} MB in {stats.read.reads} reads, {stats.read.seconds * 1000:.0f} ms")
    lines.append(f"memory       peak {stats.peak_memory_gb:.2f} GB (process rss peak {stats.peak_rss_gb:.2f} GB)")
    if stats.submodel is not None:
        lines.append(f"submodel     {stats.submodel.describe()}")
    return lines


def mask_picture(indices: np.ndarray, d_ff: int, width: int = WIDTH) -> list[str]:
    """One line per layer: a bar whose cells are blocks of channels, shaded by the share kept, then the count.

    Cells hold 64 channels, or a multiple of 64 when the FFN is too wide for
    the line, so any model's picture fits ``width`` columns.
    """
    layers = indices.shape[0]
    label, count = len(str(layers - 1)), len(f"{d_ff}")
    room = width - label - count - 4  # the two bar edges and two spaces
    block = CHANNELS_PER_CELL * ceil(d_ff / (room * CHANNELS_PER_CELL))  # a whole number of 64s
    cells = ceil(d_ff / block)
    sizes = np.minimum(block, d_ff - block * np.arange(cells))
    lines = [f"cells of {block} channels, kept: '{SHADES[0]}' none  {SHADES[1]} <=1/4  {SHADES[2]} <=1/2  {SHADES[3]} <=3/4  {SHADES[4]} more"]
    for layer, row in enumerate(np.asarray(indices)):
        share = np.bincount(row.astype(np.int64) // block, minlength=cells)[:cells] / sizes
        bar = "".join(shade(s) for s in share)
        lines.append(f"{layer:>{label}} |{bar}| {len(row):>{count}}")
    return lines


def shade(share: float) -> str:
    """The character for a block of which ``share`` is kept (any kept channel shows)."""
    return SHADES[0] if share <= 0 else SHADES[min(4, max(1, ceil(share * 4)))]
