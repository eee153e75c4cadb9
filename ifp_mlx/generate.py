"""Streamed generation with mlx-lm's decode loop, plus the statistics users see.

The loop, sampling, KV cache and UTF-8-safe streaming detokenizer are
mlx-lm's (``stream_generate``); this module only builds the prompt, times the
phases and collects the numbers printed after a reply.
"""

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .load import LoadedModel


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

    def summary(self) -> str:
        parts = [
            f"prompt {self.prompt_tokens} tok {self.prompt_tps:.1f} tok/s",
            f"generated {self.generation_tokens} tok {self.generation_tps:.1f} tok/s",
            f"ttft {self.time_to_first_token * 1000:.0f} ms",
        ]
        if self.phases:
            parts[-1] += " (" + ", ".join(f"{k} {v * 1000:.0f}" for k, v in self.phases.items()) + ")"
        parts.append(f"peak {self.peak_memory_gb:.2f} GB")
        return " | ".join(parts)


def prompt_tokens(
    tokenizer: TokenizerWrapper, prompt: str, system: Optional[str] = None, chat_template: bool = True
) -> list[int]:
    """Token ids of the prompt, through the chat template when there is one."""
    if chat_template and tokenizer.chat_template is not None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    text = f"{system}\n\n{prompt}" if system else prompt
    return tokenizer.encode(text)


def stream(
    loaded: LoadedModel,
    tokens: list[int],
    config: GenerationConfig,
    stats: GenerationStats,
    prompt_cache: Optional[list] = None,
) -> Iterator[str]:
    """Yield text segments of the reply; fill ``stats`` as it goes."""
    if config.seed is not None:
        mx.random.seed(config.seed)
    sampler = make_sampler(config.temp, config.top_p)
    mx.reset_peak_memory()
    start = time.perf_counter()
    response = None
    for response in stream_generate(
        loaded.model, loaded.tokenizer, mx.array(tokens), max_tokens=config.max_tokens,
        sampler=sampler, prompt_cache=prompt_cache,
    ):
        if stats.generation_tokens == 0:
            stats.time_to_first_token = time.perf_counter() - start
        stats.generation_tokens = response.generation_tokens
        yield response.text
    if response is not None:
        stats.prompt_tokens = response.prompt_tokens
        stats.prompt_tps = response.prompt_tps
        stats.generation_tps = response.generation_tps
        stats.peak_memory_gb = response.peak_memory
        stats.finish_reason = response.finish_reason
