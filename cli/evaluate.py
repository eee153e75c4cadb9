"""`ifp eval`: tasks x selectors x keep ratios, as tables, a resumable results file and figures."""

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .app import app, err, log, print_columns, resolve


class CellProgress:
    """A progress bar per cell on stderr (the evaluate package's Progress protocol)."""

    def __init__(self, progress: Progress):
        self.progress, self.task = progress, None

    def start(self, label: str, total: Optional[int]) -> None:
        self.task = self.progress.add_task(label, total=total)

    def total(self, total: int) -> None:
        self.progress.update(self.task, total=total, completed=0)

    def advance(self) -> None:
        self.progress.advance(self.task)


def _names(text: Optional[str]) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def _limits(text: Optional[str], tasks: list[str]) -> dict[str, Optional[int]]:
    """Items per task from ``--limit``: ``N`` for every task, ``task=N`` for one, or both (``20,humaneval=5``)."""
    from ..errors import IFPError

    default, limits = None, {}
    for entry in _names(text):
        name, _, value = entry.rpartition("=")
        if name and name not in tasks:
            raise IFPError(f"--limit names {name!r}, which is not a task of this run ({', '.join(tasks)})")
        try:
            number = int(value)
        except ValueError:
            number = 0
        if number < 1:
            raise IFPError(f"--limit takes N or TASK=N (N at least 1), separated by commas; got {entry!r}")
        if name:
            limits[name] = number
        else:
            default = number
    return {task: limits.get(task, default) for task in tasks}


def _keeps(text: str) -> list[float]:
    from ..errors import IFPError

    try:
        keeps = [float(k) for k in _names(text)]
    except ValueError:
        raise IFPError(f"--keep takes fractions separated by commas (e.g. 1.0,0.5,0.33), got {text!r}") from None
    if not keeps or any(not 0 < k <= 1 for k in keeps):
        raise IFPError(f"every --keep must be in (0, 1], got {text!r}")
    return keeps


def _settings(path: Path, max_tokens, seed, mask, predictor, files, lm_eval_include) -> dict:
    """What changes results besides the grid and the limits: a run resumes only with the same."""
    from dataclasses import asdict

    from ..evaluate.sandbox import Limits
    from ..model.load import read_config
    from ..model.masks import model_fingerprint

    return {
        "model": str(path), "fingerprint": model_fingerprint(read_config(path)), "max_tokens": max_tokens, "seed": seed,
        "mask": str(mask) if mask else None, "predictor": str(predictor) if predictor else None,
        "files": [str(f) for f in files or []], "lm_eval_include": str(lm_eval_include) if lm_eval_include else None,
        "sandbox_limits": asdict(Limits()),
    }


@app.command("eval")
def evaluate_command(
    files: Optional[list[Path]] = typer.Argument(None, help="held-out jsonl files (id, domain, prompt, response) for response NLL, e.g. from `ifp data build`"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model folder or named model"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="comma-separated built-in tasks: humaneval, math, mmlu-0shot, mmlu-5shot, or all"),
    lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="comma-separated lm-evaluation-harness tasks, run with ifp as the model"),
    lm_eval_include: Optional[Path] = typer.Option(None, "--lm-eval-include", help="folder of harness task yaml files (local data, no hub)"),
    keep: str = typer.Option("0.5", "--keep", help="comma-separated fractions of FFN channels kept per layer (dense always runs at 1)"),
    selectors: Optional[str] = typer.Option(
        None, "--selectors", help="comma-separated selectors, oracle included [default: dense,static,activations,random, and predictor if the model has one]"
    ),
    mask: Optional[Path] = typer.Option(None, "--mask", help="mask file for the static selector (else one calibrated on the built-in text)"),
    predictor: Optional[Path] = typer.Option(None, "--predictor", help="predictor folder for the predictor selector"),
    limit: Optional[str] = typer.Option(None, "--limit", help="items per task (per domain for jsonl files): N, TASK=N, or both, e.g. 20,humaneval=5"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="tokens generated per reply [default: humaneval 384, math 256, harness tasks their own]"),
    seed: int = typer.Option(0, "--seed", help="seed of the random selector and of the harness"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="results file: every raw result, rewritten after each cell"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --json FILE: finished cells are not rerun"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing --json FILE"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="folder for PNG figures: accuracy and NLL against keep, mask overlap per layer"),
) -> None:
    """Score selectors and keep ratios on real tasks: HumanEval pass@1 (code run in a sandbox),
    math exact match, MMLU by log-likelihood, response NLL of jsonl files, any lm-eval task.

    Example: ifp eval --tasks humaneval,math,mmlu-0shot --selectors dense,predictor,activations,oracle --keep 1.0,0.5,0.33 --limit 20 --json runs/eval.json --resume --plot runs/figures
    """
    from ..errors import IFPError
    from ..evaluate.results import EVAL_SELECTORS, TASKS, Results, grid

    task_names = list(TASKS) if tasks == "all" else _names(tasks)
    for name in task_names:
        if name not in TASKS:
            raise IFPError(f"unknown task {name!r}: choose from {', '.join(TASKS)}, or all")
    harness_names = _names(lm_eval)
    if not files and not task_names and not harness_names:
        raise IFPError("nothing to evaluate: give jsonl FILES, --tasks or --lm-eval")
    keeps = _keeps(keep)
    chosen = _names(selectors)
    for name in chosen:
        if name not in EVAL_SELECTORS:
            raise IFPError(f"unknown selector {name!r}: choose from {', '.join(EVAL_SELECTORS)}")
    if "oracle" in chosen and harness_names:
        raise IFPError("the oracle needs reference answers, which --lm-eval tasks do not give: drop one of them")
    names = (["nll"] if files else []) + task_names + [f"lm-eval:{name}" for name in harness_names]
    limits = _limits(limit, names)
    path = resolve(model)
    results = Results.start(json_out, _settings(path, max_tokens, seed, mask, predictor, files, lm_eval_include), resume, force)

    from ..evaluate.grid import SelectorOptions, TaskOptions, make_task, run_grid
    from ..evaluate.report import legacy_summary, summarize, summary_json
    from ..model.load import load
    from ..select.predictor import has_predictor

    loaded = load(path, dense=False)
    chosen = chosen or ["dense", "static", "activations", "random"] + (["predictor"] if predictor or has_predictor(loaded) else [])
    cells = grid(names, chosen, keeps)
    if not cells:
        raise IFPError("no cell to run: at keep 1 every selector is the dense model (add dense, or a keep below 1)")
    all_tasks = {}
    if files:
        from ..evaluate.heldout import HeldoutTask

        all_tasks["nll"] = HeldoutTask(files)
    all_tasks.update({name: make_task(name, TaskOptions(max_tokens=max_tokens)) for name in task_names})
    if harness_names:
        from ..evaluate.harness import HarnessTask

        all_tasks.update({f"lm-eval:{name}": HarnessTask(name, lm_eval_include, max_tokens, seed=seed) for name in harness_names})
    if "humaneval" in all_tasks:
        from ..evaluate.sandbox import sandbox_report

        results.extra["sandbox"] = sandbox_report()
        log(f"code sandbox: kernel layers {', '.join(results.extra['sandbox']['kernel_layers'])}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=err) as progress:
            run_grid(loaded, all_tasks, cells, results, limits, SelectorOptions(mask, predictor, seed), CellProgress(progress), log)
    except KeyboardInterrupt:
        if json_out:
            done = len(results.cells)
            err.print(f"interrupted: {done} finished cells are in {json_out}; rerun with --resume to continue", highlight=False)
        raise

    rows = summarize(results, cells, loaded.num_layers, loaded.d_ff)
    results.extra["summary"] = summary_json(rows)
    if names == ["nll"] and len(keeps) == 1:
        examples = next(c["metrics"]["n"] for c in results.cells.values() if c["task"] == "nll")
        results.extra.update(legacy_summary(rows, keeps[0], examples))
    results.save()
    _print_tables(rows, keeps)
    if plot:
        from ..evaluate.plots import write_plots

        for figure in write_plots(rows, plot):
            log(f"wrote {figure}")


def _print_tables(rows: list, keeps: list[float]) -> None:
    """Accuracy, then NLL with mask overlap (last, so its rows end stdout, as `ifp eval FILES` always printed)."""
    from ..evaluate.report import accuracy_table, nll_table

    show_keep = len(keeps) > 1
    headers, table = accuracy_table(rows, show_keep)
    if table:
        print_columns(headers, table, title="accuracy: humaneval pass@1, math exact match, mmlu by answer log-likelihood")
        print()
    headers, table = nll_table(rows, show_keep)
    if table:
        title = "NLL: per reference token (mmlu: of the correct letter)" if show_keep else f"response NLL per token, keep {keeps[0]:g}"
        print_columns(headers, table, title=title)
        err.print("within/across: mean pairwise mask overlap inside a domain and between domains", highlight=False)
