"""`ifp generate`: select, gather and stream a reply."""

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from ..errors import IFPError
from ..text import check_utf8, decode_utf8
from .app import app, err, resolve

if TYPE_CHECKING:
    from ..model.load import LoadedModel

CONTEXT_HINT = "; shorten it, lower --max-tokens, or pass --truncate to keep its end"


@app.command()
def generate(
    prompts: list[str] = typer.Argument(..., help="one or more prompts; - reads one from stdin"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model folder or named model (default smollm2-135m)"),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="most tokens to generate"),
    temp: float = typer.Option(0.0, "--temp", help="sampling temperature (0: greedy)"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling threshold"),
    seed: Optional[int] = typer.Option(None, "--seed", help="random seed (sampling and the random selector)"),
    system: Optional[str] = typer.Option(None, "--system", help="system message"),
    no_chat_template: bool = typer.Option(False, "--no-chat-template", help="feed the prompt as raw text"),
    truncate: bool = typer.Option(False, "--truncate", help="drop the start of a prompt too long for the model's context (else: an error)"),
    keep: Optional[float] = typer.Option(None, "--keep", help="fraction of FFN channels kept per layer, 0 < R <= 1"),
    k: Optional[int] = typer.Option(None, "--k", help="FFN channels kept per layer (rounded up to a multiple of 8)"),
    selector: Optional[str] = typer.Option(None, "--selector", "-s", help="predictor | activations | static | dense | random (default with --keep: predictor if the model has one, else activations)"),
    mask: Optional[Path] = typer.Option(None, "--mask", help="mask file for --selector static (from ifp calibrate / ifp masks --save)"),
    predictor: Optional[Path] = typer.Option(None, "--predictor", help="predictor folder for --selector predictor"),
    task: Optional[str] = typer.Option(None, "--task", help="per-task mode: choose the mask once from this instruction"),
    low_memory: bool = typer.Option(False, "--low-memory", help="keep the FFN bank on disk: read only the selected channels (pruning only)"),
) -> None:
    """Stream a reply to each PROMPT with a pruned (or dense) submodel; statistics on stderr.

    Example: ifp generate "What is the capital of France?" --keep 0.5 --selector activations
    """
    check_sampling(max_tokens, temp, top_p, seed)
    texts = read_prompts(prompts)
    if task is not None:
        check_text(task, "--task")
    if system is not None:
        check_utf8(system, "--system")

    # imported after the checks, which then answer at once: these imports take seconds
    from ..engine.stats import GenerationConfig, GenerationStats
    from ..model.load import load

    path = resolve(model)
    check_memory(path, selector, keep, k, mask, predictor, low_memory, max_tokens + max(len(t) for t in texts))
    loaded = load(path, dense=False, low_memory=low_memory)
    chat = not no_chat_template
    token_lists = [
        fitted_tokens(loaded, text, max_tokens, system, chat, truncate, prompt_name(p, i, len(prompts)))
        for i, (p, text) in enumerate(zip(prompts, texts), 1)
    ]
    task_tokens = None if task is None else fitted_tokens(loaded, task, 0, system, chat, truncate, "--task")
    engine = build_engine(loaded, selector, keep, k, mask, predictor, seed)
    engine.warm_up()
    if task_tokens is not None:
        engine.set_task(task_tokens)
    config = GenerationConfig(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed)
    for tokens in token_lists:
        stats = GenerationStats()
        for segment in engine.generate(tokens, config, stats):
            sys.stdout.write(segment)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        err.print(f"[dim]{stats.summary()}[/dim]", highlight=False, soft_wrap=True)


def check_sampling(max_tokens: int, temp: float, top_p: float, seed: Optional[int]) -> None:
    """Refuse sampling options the engine cannot use, before loading anything.

    A NaN passes any comparison that is written to refuse (``temp < 0``), so
    each check is written to accept; a seed is MLX's unsigned 64-bit one.
    """
    if max_tokens < 1:
        raise IFPError(f"--max-tokens must be at least 1 (got {max_tokens})")
    if not (0 <= temp < math.inf and 0 < top_p <= 1):
        raise IFPError(f"--temp must be >= 0 and --top-p in (0, 1] (got {temp} and {top_p})")
    if seed is not None and not 0 <= seed < 2**64:
        raise IFPError(f"--seed must be in 0..2**64-1 (got {seed})")


def check_memory(path, selector, keep, k, mask, predictor, low_memory: bool, context_tokens: int) -> None:
    """Refuse a run that will not fit, before loading anything (ifp_mlx.engine.memory).

    ``context_tokens`` counts a prompt's characters, an upper bound on its
    tokens; no more than the model's context is ever processed (a longer
    prompt is refused or cut later), so a prompt of a million characters is
    not answered with a memory error for a KV of a million tokens.
    """
    from ..engine.memory import check_fit
    from ..engine.prompts import context_length
    from ..model.load import read_config
    from ..select.base import DEFAULT_KEEP, resolve_k
    from ..select.choose import prunes

    config = read_config(path)
    pruning = prunes(selector, keep, k, mask, predictor)
    if low_memory and not pruning:
        raise IFPError("--low-memory reads only the selected channels: it needs pruning (--keep R, or a --selector)")
    d_ff = config["ifp"]["bank"]["d_ff"]
    # resolve_k refuses a --keep or --k out of range (NaN too) before any arithmetic on it
    share = resolve_k(d_ff, keep, k) / d_ff if keep is not None or k is not None else DEFAULT_KEEP
    context_tokens = min(context_tokens, context_length(config) or context_tokens)
    check_fit(path, config, share if pruning else None, low_memory, context_tokens)


def prompt_name(arg: str, index: int, count: int) -> str:
    """How error lines name a prompt: by where it came from, and its place when there are several."""
    name = "the prompt on stdin" if arg == "-" else "the prompt"
    return f"{name} ({index} of {count})" if count > 1 else name


def read_prompts(prompts: list[str]) -> list[str]:
    """The prompt texts, ``-`` read from stdin, each checked to be non-empty UTF-8.

    Checked here because the tokenizer fails on both with a traceback that
    does not say which input was wrong.
    """
    texts = []
    for i, arg in enumerate(prompts, 1):
        name = prompt_name(arg, i, len(prompts))
        text = decode_utf8(sys.stdin.buffer.read(), "stdin") if arg == "-" else arg
        texts.append(check_text(text, name))
    return texts


def check_text(text: str, name: str) -> str:
    """The text, unless it holds bytes that are not UTF-8 (argv hands them on as surrogate
    escapes), or is empty or only whitespace: there is nothing to reply to."""
    text = check_utf8(text, name)
    if not text.strip():
        raise IFPError(f"{name} is empty: give some text to reply to")
    return text


def fitted_tokens(
    loaded: "LoadedModel", text: str, max_tokens: int, system: Optional[str], chat: bool, truncate: bool, name: str
) -> list[int]:
    """The prompt's tokens, refused (or with ``truncate`` cut from the front) if they overflow the context."""
    from ..engine.prompts import (
        check_context,
        check_length,
        context_length,
        fit_prompt,
        prompt_tokens,
    )

    context = context_length(loaded.config)
    if not truncate:
        check_length(loaded.tokenizer, text, max_tokens, context, what=name, hint=CONTEXT_HINT)
        tokens = prompt_tokens(loaded.tokenizer, text, system, chat_template=chat)
        check_context(tokens, max_tokens, context, what=name, hint=CONTEXT_HINT)
        return tokens
    tokens, dropped = fit_prompt(loaded.tokenizer, text, max_tokens, context, system, chat_template=chat, what=name)
    if dropped:
        reply = f" with {max_tokens} to generate" if max_tokens else ""
        err.print(
            f"warning: {name} is too long for the model's context of {context} tokens{reply}; "
            f"dropped its first {dropped} tokens, kept {len(tokens)} (--truncate)",
            highlight=False, soft_wrap=True,
        )
    return tokens


def build_engine(loaded, selector, keep, k, mask, predictor, seed):
    """The engine for the selection options (see ``ifp_mlx.select.choose``)."""
    from ifp_mlx.engine.engine import Engine
    from ifp_mlx.select.choose import choose

    return Engine.for_choice(loaded, choose(loaded, selector, keep, k, mask, predictor, seed or 0))
