"""Prompts, generation settings and the statistics users see after a reply.

The decode loop, sampling, KV cache and UTF-8-safe streaming detokenizer are
mlx-lm's (``stream_generate``), driven by ``ifp_mlx.engine.Engine``.
"""

from dataclasses import dataclass, field
from typing import Optional

from mlx_lm.tokenizer_utils import TokenizerWrapper


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
    submodel: Optional[object] = None  # engine.SubmodelInfo

    def summary(self) -> str:
        parts = [
            f"prompt {self.prompt_tokens} tok {self.prompt_tps:.1f} tok/s",
            f"generated {self.generation_tokens} tok {self.generation_tps:.1f} tok/s",
            f"ttft {self.time_to_first_token * 1000:.0f} ms",
        ]
        if self.phases:
            parts[-1] += " (" + ", ".join(f"{k} {v * 1000:.0f}" for k, v in self.phases.items()) + ")"
        parts.append(f"peak {self.peak_memory_gb:.2f} GB")
        if self.submodel is not None:
            parts.append(self.submodel.describe())
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
