"""`ifp chat`: a multi-turn conversation in the terminal, one mask per conversation."""

from pathlib import Path
from typing import Optional

import typer

from ..text import check_utf8
from .app import app, err, resolve
from .generate import check_memory, check_sampling, check_text

# The KV a conversation of several turns holds, for the fit check: the
# model's whole context would refuse models that chat runs well.
CONVERSATION_TOKENS = 4096


@app.command()
def chat(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model folder or named model (default smollm2-135m)"),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="most tokens per reply"),
    temp: float = typer.Option(0.0, "--temp", help="sampling temperature (0: greedy)"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling threshold"),
    seed: Optional[int] = typer.Option(None, "--seed", help="random seed (sampling and the random selector)"),
    system: Optional[str] = typer.Option(None, "--system", help="system message"),
    keep: Optional[float] = typer.Option(None, "--keep", help="fraction of FFN channels kept per layer, 0 < R <= 1"),
    k: Optional[int] = typer.Option(None, "--k", help="FFN channels kept per layer (rounded up to a multiple of 8)"),
    selector: Optional[str] = typer.Option(None, "--selector", "-s", help="predictor | activations | static | dense | random (default with --keep: predictor if the model has one, else activations)"),
    mask: Optional[Path] = typer.Option(None, "--mask", help="mask file for --selector static (from ifp calibrate / ifp masks --save)"),
    predictor: Optional[Path] = typer.Option(None, "--predictor", help="predictor folder for --selector predictor"),
    task: Optional[str] = typer.Option(None, "--task", help="choose the conversation's mask from this instruction (else: from the first user turn)"),
    low_memory: bool = typer.Option(False, "--low-memory", help="keep the FFN bank on disk: read only the selected channels (pruning only)"),
) -> None:
    """Chat with a pruned (or dense) model: streamed replies, a statistics line after each, /help for commands.

    The mask is chosen from the first user turn (or --task) and kept for the
    conversation, so each turn reuses the KV cache of the turns before it.
    Reads lines from stdin when it is not a terminal (for scripts).

    Example: ifp chat --keep 0.5 --system "You are a concise assistant."
    """
    check_sampling(max_tokens, temp, top_p, seed)
    if task is not None:
        check_text(task, "--task")
    if system is not None:
        check_utf8(system, "--system")

    # imported after the checks, which then answer at once: these imports take seconds
    from ..chat.repl import run
    from ..chat.session import ChatSession, Settings
    from ..chat.view import Terminal
    from ..engine.stats import GenerationConfig
    from ..model.load import load

    path = resolve(model)
    check_memory(path, selector, keep, k, mask, predictor, low_memory, max_tokens + CONVERSATION_TOKENS)
    loaded = load(path, dense=False, low_memory=low_memory)
    settings = Settings(
        selector=selector, keep=keep, k=k, mask=mask, predictor=predictor, seed=seed, system=system,
        low_memory=low_memory, generation=GenerationConfig(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed),
    )
    session = ChatSession(loaded, settings)
    if task is not None:
        session.set_task(task)
    raise typer.Exit(run(session, Terminal(err)))
