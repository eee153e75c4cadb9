"""Will it fit? The memory a run needs, estimated from the model folder before loading.

Loading a model that does not fit ends in swapping or, on a Mac, in Metal
refusing buffers halfway through a reply. So the CLI asks here first and
refuses with one line that says what would fit. The budget is the machine's
available memory (Linux: ``MemAvailable``; macOS: the smaller of physical
memory and Metal's recommended working set), or ``IFP_MEMORY_BUDGET`` (bytes, or
with a K/M/G suffix) when set.
"""

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import IFPError

MARGIN = 1.10  # allocator slack and the Python side, on top of the arrays
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass
class Need:
    """Bytes a run needs, by part."""

    weights: int  # everything but the FFN
    ffn: int  # the bank, the dense FFN, or the compact submodel, as the mode holds them
    kv: int
    mode: str

    @property
    def total(self) -> int:
        return int((self.weights + self.ffn + self.kv) * MARGIN)


def need(path: Path, config: dict, keep: Optional[float], low_memory: bool, context_tokens: int) -> Need:
    """What a run of the model folder needs: ``keep`` None means dense."""
    ifp = config["ifp"]
    weights = (path / ifp["weights"]).stat().st_size
    bank = (path / ifp["bank"]["file"]).stat().st_size
    layer = bank // ifp["bank"]["num_layers"]
    kv = kv_bytes(config, context_tokens)
    if keep is None:
        return Need(weights, bank + layer, kv, "dense")
    compact = int(bank * keep)
    if low_memory:
        return Need(weights, compact + layer, kv, "--low-memory")
    return Need(weights, bank + compact + layer, kv, "bank in memory")


def kv_bytes(config: dict, tokens: int) -> int:
    """Keys and values of every layer for ``tokens`` positions (float32 on the CPU, else float16)."""
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads", 1)
    head_dim = config.get("head_dim") or config["hidden_size"] // config.get("num_attention_heads", 1)
    item = 2 if sys.platform == "darwin" else 4
    return 2 * config["num_hidden_layers"] * heads * head_dim * tokens * item


def budget() -> tuple[int, str]:
    """The bytes a run may use, and where that figure comes from."""
    value = os.environ.get("IFP_MEMORY_BUDGET")
    if value:
        return parse_bytes(value), "IFP_MEMORY_BUDGET"
    if sys.platform == "darwin":
        import mlx.core as mx

        info = mx.metal.device_info() if mx.metal.is_available() else {}
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return min(total, info.get("max_recommended_working_set_size", total)), "Metal's recommended working set"
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        match = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo.read_text(), re.M)
        if match:
            return int(match.group(1)) * 1024, "available memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"


def parse_bytes(text: str) -> int:
    """``"1500000"``, ``"512M"``, ``"2G"`` or ``"1.5GB"`` as bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)i?B?\s*", text.upper())
    try:
        return int(float(match.group(1)) * UNITS[match.group(2)])
    except (AttributeError, ValueError):
        raise IFPError(f"IFP_MEMORY_BUDGET={text!r} is not a size (write bytes, or e.g. 512M, 2G)") from None


def check_fit(path: Path, config: dict, keep: Optional[float], low_memory: bool, context_tokens: int) -> Need:
    """Refuse (one line, naming what would fit) a run that needs more than the budget."""
    wanted = need(path, config, keep, low_memory, context_tokens)
    limit, source = budget()
    if wanted.total <= limit:
        return wanted
    options = []
    if not low_memory:
        low = need(path, config, keep if keep is not None else 0.5, True, context_tokens)
        if low.total <= limit:
            options.append(f"--low-memory{'' if keep is not None else ' --keep 0.5'} ({gb(low.total)})")
    for smaller in (0.5, 0.33, 0.25):
        if keep is not None and smaller < keep:
            fits = need(path, config, smaller, low_memory, context_tokens)
            if fits.total <= limit:
                options.append(f"--keep {smaller} ({gb(fits.total)})")
                break
    if not config.get("quantization"):
        options.append("a 4-bit copy from `ifp convert SRC OUT -q`")
    raise IFPError(
        f"this model needs about {gb(wanted.total)} ({wanted.mode}) but {gb(limit)} is the budget ({source}); "
        f"what would fit: {' or '.join(options) or 'nothing with this model: choose a smaller one'}"
    )


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
