"""`ifp bench`: speed figures measured as ratios inside one run (docs/BENCHMARKS.md)."""

import json
from typing import Optional

import typer

from .app import app, log, resolve


@app.command()
def bench(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model folder or named model (dense mode)"),
    prompt_tokens: Optional[int] = typer.Option(
        None, "--prompt-tokens", help="prompt length in tokens [default: 128; 512 with --compact, for the gather share]"
    ),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", help="tokens to generate per run"),
    rounds: int = typer.Option(5, "--rounds", help="alternating rounds (median reported)"),
    compact: bool = typer.Option(
        False, "--compact", help="compact submodel vs a dense model of FFN width k, on a random-weight llama"
    ),
    hidden: int = typer.Option(1024, "--hidden", help="--compact: hidden size of the random model"),
    d_ff: int = typer.Option(4096, "--d-ff", help="--compact: FFN width of the random model"),
    layers: int = typer.Option(8, "--layers", help="--compact: layers of the random model"),
    vocab: int = typer.Option(2048, "--vocab", help="--compact: vocabulary size of the random model"),
    keep: Optional[list[float]] = typer.Option(None, "--keep", help="--compact: keep ratio, repeatable [default: 0.5, 0.33]"),
    decode_prompt_tokens: int = typer.Option(32, "--decode-prompt-tokens", help="--compact: prompt length of the decode runs"),
) -> None:
    """Measure speed as ratios of contenders alternated in one run; prints JSON.

    Default: ifp's dense generation against mlx-lm's stream_generate on the same weights.
    With --compact: decode with the gathered submodel against a dense model whose FFN
    width is k, and the gather's share of the time to first token.

    Examples: ifp bench --prompt-tokens 128 --max-tokens 64 --rounds 7
              ifp bench --compact --keep 0.5 --keep 0.33 --rounds 5
    """
    if compact:
        from ..bench.ratios import compact_benchmark

        result = compact_benchmark(
            hidden=hidden, d_ff=d_ff, layers=layers, keeps=tuple(keep or (0.5, 0.33)),
            prompt_tokens=prompt_tokens or 512, decode_prompt_tokens=decode_prompt_tokens,
            max_tokens=max_tokens, rounds=rounds, vocab=vocab, log=log,
        )
        print(json.dumps(result, indent=2))
        return
    from mlx_lm.utils import load_tokenizer

    from ..bench.ratios import dense_vs_mlx_lm, synthetic_prompt
    from ..model.load import read_config

    path = resolve(model)
    read_config(path)
    tokens = synthetic_prompt(load_tokenizer(path), prompt_tokens or 128)
    result = dense_vs_mlx_lm(str(path), tokens, max_tokens=max_tokens, rounds=rounds)
    print(json.dumps({"model": str(path), "prompt_tokens": len(tokens), "max_tokens": max_tokens, **result}, indent=2))
