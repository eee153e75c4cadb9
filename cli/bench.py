"""`ifp bench`: speed figures measured as ratios inside one run."""

from typing import Optional

import typer

from .app import app, resolve

@app.command()
def bench(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model folder or named model"),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", help="prompt length in tokens"),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", help="tokens to generate per run"),
    rounds: int = typer.Option(5, "--rounds", help="alternating rounds (median reported)"),
) -> None:
    """Measure dense generation against mlx-lm's stream_generate on the same weights.

    Example: ifp bench --prompt-tokens 256 --max-tokens 64 --rounds 5
    """
    import json

    from ifp_mlx.bench import dense_vs_mlx_lm, synthetic_prompt
    from ifp_mlx.load import read_config
    from mlx_lm.utils import load_tokenizer

    path = resolve(model)
    read_config(path)
    tokens = synthetic_prompt(load_tokenizer(path), prompt_tokens)
    result = dense_vs_mlx_lm(str(path), tokens, max_tokens=max_tokens, rounds=rounds)
    print(json.dumps({"model": str(path), "prompt_tokens": len(tokens), "max_tokens": max_tokens, **result}, indent=2))
