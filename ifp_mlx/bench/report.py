"""``ifp bench``'s results as markdown tables, a JSON file and a plot.

Everything renders from the JSON-ready results (:func:`.suite.run_bench`), so a
saved ``--json`` file renders the same tables again. The tables print whole in
80 columns: per prompt length, one table of speeds, one of the time to first
token split into its phases, one of memory; the notes are wrapped to 80.
"""

import json
import textwrap
from typing import Optional, Sequence

from ..files import atomic_file

WIDTH = 80
MISSING = "-"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table padded to aligned columns (numbers right-aligned)."""
    widths = [max(len(c) for c in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str], left: bool) -> str:
        padded = [c.ljust(w) if (left or i == 0) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i else ":" + "-" * (w + 1) for i, w in enumerate(widths)) + "|"
    return [line(headers, left=True), rule] + [line(r, left=False) for r in rows]


def number(value: Optional[float]) -> str:
    """Three significant figures or so, never scientific notation."""
    if value is None:
        return MISSING
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def mean_std(mean: Optional[float], std: Optional[float]) -> str:
    """``mean ± std`` with the std to the mean's decimals."""
    if mean is None:
        return MISSING
    text = number(mean)
    decimals = len(text.split(".")[1]) if "." in text else 0
    return f"{text} ± {std:.{decimals}f}"


def ms(seconds: Optional[float]) -> str:
    return MISSING if seconds is None else f"{seconds * 1000:.0f}"


def gigabytes(value: Optional[float]) -> str:
    return MISSING if value is None else f"{value:.2f}"


def count(n: int) -> str:
    """A parameter count as 135M or 1.24B."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def speed_table(tests: list[dict]) -> list[str]:
    rows = [
        [t["row"], mean_std(t["mean"]["prompt_tps"], t["std"]["prompt_tps"]),
         mean_std(t["mean"]["generation_tps"], t["std"]["generation_tps"]),
         f"{t['decode_speedup']:.2f}x", f"{t['ideal_speedup']:.2f}x"]
        for t in tests
    ]
    return markdown_table(["test", "prompt tok/s", "gen tok/s", "speed-up", "ideal"], rows)


def first_token_table(tests: list[dict]) -> list[str]:
    rows = []
    for t in tests:
        phases = t["mean"]["phases_s"]
        gather = phases.get("gather", phases.get("read"))
        share = t["mean"].get("select_share")
        rows.append([
            t["row"], ms(t["mean"]["time_to_first_token_s"]), ms(phases.get("select")), ms(gather),
            ms(phases.get("prefill")), ms(phases.get("first token")),
            MISSING if share is None else f"{100 * share:.1f}%",
        ])
    return markdown_table(["test", "ttft", "select", "gather", "prefill", "first", "select%"], rows)


def memory_table(tests: list[dict]) -> list[str]:
    rows = [
        [t["row"], str(t["k"]), count(t["active_parameters"]), gigabytes(t["peak_memory_gb"]), gigabytes(t["peak_rss_gb"]),
         number(None if t["mean"]["read_bytes"] is None else t["mean"]["read_bytes"] / 1e6), ms(t["mean"]["read_seconds"])]
        for t in tests
    ]
    return markdown_table(["test", "k", "active", "MLX GB", "RSS GB", "read MB", "read ms"], rows)


def wrap(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, break_on_hyphens=False)


def render(results: dict) -> str:
    """The markdown report: a header, then three tables per prompt length."""
    model, settings = results["model"], results["settings"]
    quant = model["quantization"]
    fmt = f"{quant['bits']}-bit" if quant else model["dtype"]
    lines = wrap(
        f"ifp bench: {model['name']} ({model['model_type']}, {count(model['parameters'])} params, {fmt}, "
        f"d_ff {model['d_ff']}, {model['layers']} layers); {settings['repetitions']} repetitions of "
        f"{settings['max_tokens']} generated tokens after a warm-up; mean ± std."
    )
    lines += [""] + wrap(
        "Rows: dense (every channel); mlx-lm: its stream_generate on the same weights; "
        "SELECTOR KEEP: pruned, the bank in memory; ... disk: --low-memory, the bank on disk. "
        "prompt tok/s: the prompt over the time to first token (ttft). "
        "speed-up: decode tok/s over the dense row's; ideal: the dense model's bytes read per "
        "decoded token over this row's. Times in ms; gather is the disk read for disk rows; "
        "select% is select's share of ttft. MLX GB: MLX's peak in a reply; "
        f"RSS GB: {rss_note(results['machine'])}."
    )
    if settings.get("alternate"):
        lines += [""] + wrap("--alternate: the rows took turns, one reply each per round, all held at once, "
                             "so memory is not per row and is left out: run without --alternate for it.")
    for p in settings["prompt_tokens"]:
        tests = [t for t in results["tests"] if t["prompt_tokens"] == p]
        lines += ["", f"**Prompt {p} tokens: speed**", ""] + speed_table(tests)
        lines += ["", f"**Prompt {p} tokens: time to first token (ms)**", ""] + first_token_table(tests)
        lines += ["", f"**Prompt {p} tokens: memory**", ""] + memory_table(tests)
    return "\n".join(lines) + "\n"


def rss_note(machine: dict) -> str:
    if machine.get("peak_rss", "").startswith("VmHWM"):
        return "the process's peak resident memory during the test (VmHWM, reset per test)"
    return "the process's peak resident memory so far (ru_maxrss; it cannot be reset per test here)"


def write_json(results: dict, path: str) -> None:
    """The results as JSON, written atomically (a failed run leaves no half file)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")


def plot(results: dict, path: str) -> None:
    """tok/s and memory against keep, one line per selector (dashed: on disk), per prompt length.

    The dense row is every line's point at keep 1.0; mlx-lm is a dotted level.
    Memory is left out when the rows alternated (it is not per row then).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = results["settings"]["prompt_tokens"]
    panels = [("prompt tok/s", lambda t: t["mean"]["prompt_tps"]), ("generation tok/s", lambda t: t["mean"]["generation_tps"])]
    if all(t["peak_rss_gb"] is not None for t in results["tests"]):  # not with --alternate
        panels.append(("peak RSS GB", lambda t: t["peak_rss_gb"]))
    fig, axes = plt.subplots(len(lengths), len(panels), figsize=(4.2 * len(panels), 3.2 * len(lengths)), squeeze=False)
    selectors = sorted({t["selector"] for t in results["tests"] if t["kind"] == "pruned"})
    colors = {name: f"C{i}" for i, name in enumerate(selectors)}
    for axes_row, p in zip(axes, lengths):
        tests = [t for t in results["tests"] if t["prompt_tokens"] == p]
        dense = next(t for t in tests if t["kind"] == "dense")
        reference = next((t for t in tests if t["kind"] == "mlx-lm"), None)
        lines = sorted({(t["selector"], t["low_memory"]) for t in tests if t["kind"] == "pruned"})
        for ax, (label, value) in zip(axes_row, panels):
            for selector, low in lines:
                points = [(t["keep"], value(t)) for t in tests if (t["selector"], t["low_memory"]) == (selector, low)]
                xs, ys = zip(*sorted(points + [(1.0, value(dense))]))
                ax.plot(xs, ys, "--o" if low else "-o", color=colors[selector], label=f"{selector}{' disk' if low else ''}")
            if reference is not None:
                ax.axhline(value(reference), color="grey", linestyle=":", label="mlx-lm")
            ax.plot([1.0], [value(dense)], "ks", label="dense")
            ax.set_xlabel("keep")
            ax.set_ylabel(label)
            ax.set_title(f"prompt {p} tokens")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"ifp bench: {results['model']['name']}")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
