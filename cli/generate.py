"""`ifp generate`: select, gather and stream a reply."""

import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import IFPError
from .app import app, err, resolve


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
    keep: Optional[float] = typer.Option(None, "--keep", help="fraction of FFN channels kept per layer, 0 < R <= 1"),
    k: Optional[int] = typer.Option(None, "--k", help="FFN channels kept per layer (rounded up to a multiple of 8)"),
    selector: Optional[str] = typer.Option(None, "--selector", "-s", help="predictor | activations | static | dense | random (default with --keep: predictor if the model has one, else activations)"),
    mask: Optional[Path] = typer.Option(None, "--mask", help="mask file for --selector static (from ifp calibrate / ifp masks --save)"),
    predictor: Optional[Path] = typer.Option(None, "--predictor", help="predictor folder for --selector predictor"),
    task: Optional[str] = typer.Option(None, "--task", help="per-task mode: choose the mask once from this instruction"),
) -> None:
    """Stream a reply to each PROMPT with a pruned (or dense) submodel; statistics on stderr.

    Example: ifp generate "What is the capital of France?" --keep 0.5 --selector activations
    """
    from ..engine.prompts import prompt_tokens
    from ..engine.stats import GenerationConfig, GenerationStats
    from ..model.load import load

    if max_tokens < 1:
        raise IFPError(f"--max-tokens must be at least 1 (got {max_tokens})")
    if temp < 0 or not 0 < top_p <= 1:
        raise IFPError("--temp must be >= 0 and --top-p in (0, 1]")
    prompts = [sys.stdin.read() if p == "-" else p for p in prompts]
    loaded = load(resolve(model), dense=False)
    engine = build_engine(loaded, selector, keep, k, mask, predictor, seed)
    engine.warm_up()
    if task is not None:
        engine.set_task(prompt_tokens(loaded.tokenizer, task, system, chat_template=not no_chat_template))
    config = GenerationConfig(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed)
    for prompt in prompts:
        tokens = prompt_tokens(loaded.tokenizer, prompt, system, chat_template=not no_chat_template)
        stats = GenerationStats()
        for segment in engine.generate(tokens, config, stats):
            sys.stdout.write(segment)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        err.print(f"[dim]{stats.summary()}[/dim]", highlight=False)


def build_engine(loaded, selector, keep, k, mask, predictor, seed):
    """The engine for the selection options (see ``ifp_mlx.select.choose``)."""
    from ifp_mlx.engine.engine import Engine
    from ifp_mlx.select.choose import choose

    return Engine.for_choice(loaded, choose(loaded, selector, keep, k, mask, predictor, seed or 0))
