"""`ifp masks`: the channels each prompt keeps, and how much the prompts' masks overlap."""

from pathlib import Path
from typing import Optional

import typer

from ..errors import IFPError
from .app import app, err, resolve

SHOWN = 8  # indices printed per layer without --full


@app.command()
def masks(
    prompts: Optional[list[str]] = typer.Argument(None, help="prompts to select for"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model folder or named model (default smollm2-135m)"),
    selector: Optional[str] = typer.Option(None, "--selector", "-s", help="predictor | activations | static | random (default: predictor if the model has one, else activations)"),
    keep: Optional[float] = typer.Option(None, "--keep", help="fraction of FFN channels kept per layer (default: the predictor's, else 0.5)"),
    k: Optional[int] = typer.Option(None, "--k", help="FFN channels kept per layer (rounded up to a multiple of 8)"),
    predictor: Optional[Path] = typer.Option(None, "--predictor", help="predictor folder for --selector predictor"),
    mask: Optional[Path] = typer.Option(None, "--mask", help="mask file for --selector static"),
    task: Optional[str] = typer.Option(None, "--task", help="per-task mode: also select for this instruction; --save writes its mask"),
    save: Optional[Path] = typer.Option(None, "--save", help="write a mask file (the first prompt's, or the task's with --task)"),
    full: bool = typer.Option(False, "--full", help="print every kept channel, not the first few"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of the random selector"),
    system: Optional[str] = typer.Option(None, "--system", help="system message"),
    no_chat_template: bool = typer.Option(False, "--no-chat-template", help="feed the prompts as raw text"),
) -> None:
    """Print the FFN channels each prompt keeps per layer and the pairwise mask overlap.

    Overlap is |A ∩ B| / k averaged over layers (1.0: identical masks). With --save the
    mask feeds `ifp generate --selector static --mask FILE`.

    Example: ifp masks "Write a Python sort" "Solve 3x + 5 = 11" --selector predictor --keep 0.5
    """
    from ..engine.prompts import prompt_tokens
    from ..model.load import load
    from ..model.masks import mask_overlap, save_mask
    from ..select.choose import choose

    named = ([("task", task)] if task is not None else []) + [(str(i + 1), p) for i, p in enumerate(prompts or [])]
    if not named:
        raise IFPError("give at least one PROMPT (or --task)")
    loaded = load(resolve(model), dense=False)
    if selector == "dense":
        raise IFPError("--selector dense keeps every channel: choose a pruning selector")
    choice = choose(loaded, selector, keep, k, mask, predictor, seed or 0, prune=True)
    chosen, k_value = choice.selector, choice.k
    selections = []
    for name, text in named:
        tokens = prompt_tokens(loaded.tokenizer, text, system, chat_template=not no_chat_template)
        indices = chosen.select(tokens, k_value).indices
        selections.append(indices)
        _print_selection(name, text, len(tokens), indices, loaded.d_ff, full)
    _print_overlap([name for name, _ in named], selections, lambda a, b: mask_overlap(a, b, loaded.d_ff))
    if save is not None:
        name, text = named[0]
        info = {"selector": chosen.name, "k": k_value, "task" if name == "task" else "prompt": text}
        path = save_mask(save, selections[0], loaded.config, info)
        err.print(f"wrote {path}: the {'task' if name == 'task' else 'first prompt'}'s mask, k {k_value}/{loaded.d_ff} per layer", highlight=False)


def _print_selection(name: str, text: str, num_tokens: int, indices, d_ff: int, full: bool) -> None:
    import numpy as np

    rows = np.array(indices)
    label = "task" if name == "task" else f"prompt {name}"
    preview = text if len(text) <= 60 else text[:57] + "..."
    print(f"{label} ({num_tokens} tokens): {preview}")
    print(f"  k {rows.shape[1]}/{d_ff} per layer")
    for layer, row in enumerate(rows):
        shown = row if full or len(row) <= SHOWN else row[:SHOWN]
        more = "" if len(shown) == len(row) else " ..."
        print(f"  layer {layer:>3}: {' '.join(str(int(i)) for i in shown)}{more}")


def _print_overlap(names: list[str], selections: list, overlap) -> None:
    print("overlap (|A ∩ B| / k, mean over layers):")
    width = max(6, *(len(n) + 1 for n in names))
    print(" " * width + "".join(f"{n:>{width}}" for n in names))
    for name, a in zip(names, selections):
        print(f"{name:>{width}}" + "".join(f"{overlap(a, b):>{width}.3f}" for b in selections))
