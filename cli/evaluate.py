"""`ifp eval`: response NLL per domain for each selector, and mask overlap."""

import json
from pathlib import Path
from typing import Optional

import typer

from .app import app, byte_progress, err, print_columns, resolve


@app.command("eval")
def evaluate_command(
    files: list[Path] = typer.Argument(..., help="held-out jsonl files (id, domain, prompt, response), e.g. from `ifp data build`"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model folder or named model"),
    keep: float = typer.Option(0.5, "--keep", help="fraction of FFN channels kept per layer"),
    selectors: Optional[str] = typer.Option(
        None, "--selectors", help="comma-separated selectors [default: dense,static,activations,random, and predictor if the model has one]"
    ),
    mask: Optional[Path] = typer.Option(None, "--mask", help="mask file for the static selector (else one calibrated on the built-in text)"),
    predictor: Optional[Path] = typer.Option(None, "--predictor", help="predictor folder for the predictor selector"),
    limit: Optional[int] = typer.Option(None, "--limit", help="examples per domain"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the results as JSON"),
) -> None:
    """Mean response NLL per domain under each selector (lower is better), and mask overlap.

    Example: ifp eval data/code.heldout.jsonl data/math.heldout.jsonl --keep 0.5 --selectors dense,static,predictor --mask static.safetensors
    """
    from ..engine.engine import Engine
    from ..evaluate.nll import evaluate, overlap_by_domain, read_examples
    from ..files import atomic_file
    from ..model.load import load
    from ..select.choose import choose
    from ..select.predictor import has_predictor

    examples = read_examples(files, limit)
    loaded = load(resolve(model), dense=False)
    if selectors is None:
        selectors = "dense,static,activations,random" + (",predictor" if predictor or has_predictor(loaded) else "")
    engines = {}
    for name in [s.strip() for s in selectors.split(",") if s.strip()]:
        choice = choose(
            loaded, name, None if name == "dense" else keep, mask=mask if name == "static" else None,
            predictor=predictor if name == "predictor" else None,
        )
        engines[name] = Engine.for_choice(loaded, choice)
    with byte_progress("evaluating") as progress:
        task = progress.add_task("evaluating", total=None)
        results = evaluate(loaded, examples, engines, lambda d, t: progress.update(task, completed=d, total=t))
    domains = sorted({e.domain for e in examples})
    rows = []
    report = {"keep": keep, "examples": len(examples), "selectors": {}}
    for name, result in results.items():
        within, across = overlap_by_domain(result.masks, loaded.d_ff) if result.masks else (float("nan"), float("nan"))
        means = {d: result.mean_nll(d) for d in domains}
        rows.append((name, *(f"{means[d]:.3f}" for d in domains), f"{within:.3f}", f"{across:.3f}"))
        report["selectors"][name] = {"nll": means, "overlap_within": within, "overlap_across": across}
    print_columns(("selector", *domains, "within", "across"), rows, title=f"response NLL per token, keep {keep}")
    err.print("within/across: mean pairwise mask overlap inside a domain and between domains", highlight=False)
    if json_out:
        with atomic_file(json_out) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
