"""Generation settings and the statistics users see after a reply."""

import re
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..model.bank_file import ReadStats


@dataclass
class SubmodelInfo:
    k: int
    total_channels: int
    requested_k: Optional[int]
    active_parameters: int
    total_parameters: int
    gathered: bool  # False when the submodel came from the cache (or is dense)
    gathers: int = 0  # gathers this engine has done so far
    selector: str = "dense"  # the name of the selector that chose the channels

    def describe(self) -> str:
        if self.k == self.total_channels:
            return f"dense ({self.total_parameters / 1e6:.0f}M params)"
        rounded = f" (asked {self.requested_k}, rounded up to a multiple of 8)" if self.requested_k not in (None, self.k) else ""
        source = "gathered" if self.gathered else "cached submodel"
        return (
            f"{self.selector}: k {self.k}/{self.total_channels} per layer{rounded}, "
            f"{self.active_parameters / 1e6:.0f}M/{self.total_parameters / 1e6:.0f}M params active, "
            f"{source}, gathers {self.gathers}"
        )


@dataclass
class GenerationConfig:
    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    time_to_first_token: float = 0.0
    peak_memory_gb: float = 0.0
    finish_reason: Optional[str] = None
    phases: dict = field(default_factory=dict)  # seconds spent before the first token, by phase
    submodel: Optional[SubmodelInfo] = None
    read: Optional[ReadStats] = None  # --low-memory: the records read from disk for this reply
    cached_tokens: int = 0  # prompt tokens whose KV came from a cache (a conversation's earlier turns)
    token_ids: list = field(default_factory=list)  # the generated tokens
    selection: Optional[Any] = None  # the Selection the reply was generated with
    cache: Optional[list] = None  # its KV cache after the reply (for the next turn)

    @property
    def peak_rss_gb(self) -> float:
        """The process's peak resident memory so far (all of it: weights, caches, Python)."""
        return peak_rss() / 1e9

    def summary(self) -> str:
        parts = [
            f"prompt {self.prompt_tokens} tok" + (f" ({self.cached_tokens} cached)" if self.cached_tokens else "")
            + f" {self.prompt_tps:.1f} tok/s",
            f"generated {self.generation_tokens} tok {self.generation_tps:.1f} tok/s",
            f"ttft {self.time_to_first_token * 1000:.0f} ms",
        ]
        if self.phases:
            parts[-1] += " (" + ", ".join(f"{k} {v * 1000:.0f}" for k, v in self.phases.items()) + ")"
        if self.read is not None:
            parts.append(f"read {self.read.bytes / 1e6:.0f} MB from disk in {self.read.seconds * 1000:.0f} ms")
        parts.append(f"peak {self.peak_memory_gb:.2f} GB (rss {self.peak_rss_gb:.2f} GB)")
        if self.submodel is not None:
            parts.append(self.submodel.describe())
        return " | ".join(parts)


def peak_rss() -> int:
    """Peak resident bytes of this process: Linux's VmHWM (reset by exec, unlike
    ru_maxrss, which a child keeps from the parent it forked from), else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.is_file():
        match = re.search(r"^VmHWM:\s+(\d+) kB", status.read_text(), re.M)
        if match:
            return int(match.group(1)) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
