"""Benchmarks whose figures go into docs/BENCHMARKS.md: ratios measured inside one run.

Absolute CPU timings are noisy (and other work shares the machine), so every
comparison alternates its contenders over several rounds and reports the
median of each; the figures that matter are ratios between contenders.

``ifp bench --compare`` runs them (the main ``ifp bench`` is ``suite``):

- ``dense_vs_mlx_lm``: ifp's dense generation against mlx-lm's
  ``stream_generate`` on the same weights (issue 2).
- ``compact_benchmark``: on a random-weight llama, the compact submodel's decode
  speed against a dense model whose FFN width is k, and the share of the time
  to first token that the gather takes (issue 3). Random weights are fine for
  speed, and they keep the benchmark self-contained: no download.
"""

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import stream_generate
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import _get_classes

from ..convert.random_model import build_random_model, random_llama_config
from ..engine.engine import Engine
from ..engine.stats import GenerationConfig, GenerationStats
from ..model.bank import DOWN, GATE, UP, Bank
from ..model.load import LoadedModel, load
from ..select.base import resolve_k
from ..select.choose import make_selector

T = TypeVar("T")


# --- measuring ----------------------------------------------------------------


def alternate(contenders: dict[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Run each contender once per round, after one warm-up each.

    Interleaving spreads slow spells of a shared machine over every contender
    instead of over whichever happened to run then; every other round runs in
    reverse order, so no contender always follows the same one.
    """
    results: dict[str, list[T]] = {name: [] for name in contenders}
    for run in contenders.values():
        run()
    for r in range(rounds):
        names = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in names:
            results[name].append(contenders[name]())
    return results


def median(runs: Sequence[GenerationStats], metric: Callable[[GenerationStats], float]) -> float:
    return statistics.median(metric(s) for s in runs)


def per_round(
    runs: Sequence[GenerationStats], baseline: Sequence[GenerationStats], metric: Callable[[GenerationStats], float]
) -> list[float]:
    """Ratio of two contenders in each round: its spread shows how noisy the run was."""
    return [round(metric(a) / metric(b), 3) for a, b in zip(runs, baseline)]


def prompt_tps(stats: GenerationStats) -> float:
    return stats.prompt_tps


def generation_tps(stats: GenerationStats) -> float:
    return stats.generation_tps


def phase(name: str) -> Callable[[GenerationStats], float]:
    """Seconds spent in one phase before the first token (see Engine.generate)."""
    return lambda stats: stats.phases[name]


def gather_share(stats: GenerationStats) -> float:
    """The gather's part of the time to first token."""
    return stats.phases["gather"] / stats.time_to_first_token


def run_engine(engine: Engine, tokens: list[int], max_tokens: int) -> GenerationStats:
    """One greedy reply through ifp's engine; its statistics."""
    stats = GenerationStats()
    for _ in engine.generate(tokens, GenerationConfig(max_tokens=max_tokens), stats):
        pass
    return stats


def run_stream(model: nn.Module, tokenizer: TokenizerWrapper, tokens: list[int], max_tokens: int) -> GenerationStats:
    """One greedy reply through mlx-lm's own ``stream_generate``."""
    stats = GenerationStats(prompt_tokens=len(tokens))
    mx.reset_peak_memory()
    start = time.perf_counter()
    response = None
    for response in stream_generate(model, tokenizer, mx.array(tokens), max_tokens=max_tokens):
        if stats.generation_tokens == 0:
            stats.time_to_first_token = time.perf_counter() - start
        stats.generation_tokens = response.generation_tokens
    stats.prompt_tps, stats.generation_tps = response.prompt_tps, response.generation_tps
    stats.peak_memory_gb = response.peak_memory
    return stats


# --- issue 2: dense ifp against mlx-lm -----------------------------------------


def mlx_lm_reference(loaded: LoadedModel) -> nn.Module:
    """The same weights in mlx-lm's own model with its own MLP modules.

    Built a layer at a time from the bank (the resident one, else read from the
    file), so building it never holds the whole bank beside its own copy.
    """
    model_class, args_class = _get_classes(loaded.config)
    reference = model_class(args_class.from_dict(loaded.config))
    weights = {k: v for k, v in tree_flatten(loaded.model.parameters()) if ".mlp." not in k}
    for i in range(loaded.num_layers):
        mlp = reference_mlp(loaded.layer_bank(i), f"model.layers.{i}.mlp.")
        mx.eval(list(mlp.values()))
        weights.update(mlp)
    if quant := loaded.config.get("quantization"):
        nn.quantize(
            reference, group_size=quant["group_size"], bits=quant["bits"],
            class_predicate=lambda p, m: hasattr(m, "to_quantized") and f"{p}.scales" in weights,
        )
    reference.load_weights(list(weights.items()), strict=False)
    mx.eval(reference.parameters())
    return reference


def reference_mlp(layer: Bank, prefix: str) -> dict[str, mx.array]:
    """One layer's records ``[1, d_ff, 3, X]`` as mlx-lm's gate/up/down_proj weights.

    A quantized bank holds down transposed and quantized along d, where mlx-lm's
    ``down_proj`` is quantized along d_ff: it is dequantized, transposed and
    quantized again with the same bits and group size, so it reads the same
    bytes per token (its values differ by that rounding).
    """
    names = {GATE: "gate_proj", UP: "up_proj"}
    if not layer.quantized:
        weights = {prefix + f"{n}.weight": mx.contiguous(layer.weight[0, :, part]) for part, n in names.items()}
        weights[prefix + "down_proj.weight"] = mx.contiguous(layer.weight[0, :, DOWN].T)
        return weights
    weights = {}
    for part, n in names.items():
        for field, a in (("weight", layer.weight), ("scales", layer.scales), ("biases", layer.biases)):
            weights[prefix + f"{n}.{field}"] = mx.contiguous(a[0, :, part])
    down = mx.dequantize(
        layer.weight[0, :, DOWN], layer.scales[0, :, DOWN], layer.biases[0, :, DOWN],
        group_size=layer.group_size, bits=layer.bits,
    )
    w, scales, biases = mx.quantize(mx.contiguous(down.T), group_size=layer.group_size, bits=layer.bits)
    weights.update({prefix + "down_proj.weight": w, prefix + "down_proj.scales": scales, prefix + "down_proj.biases": biases})
    return weights


def dense_vs_mlx_lm(model_dir: str, tokens: list[int], max_tokens: int = 64, rounds: int = 5) -> dict:
    """ifp's dense generation against mlx-lm's stream_generate on the same weights."""
    loaded = load(model_dir)
    reference = mlx_lm_reference(loaded)
    engine = Engine(loaded)
    runs = alternate(
        {
            "ifp": lambda: run_engine(engine, tokens, max_tokens),
            "mlx-lm": lambda: run_stream(reference, loaded.tokenizer, tokens, max_tokens),
        },
        rounds,
    )
    ifp_p, ifp_g = median(runs["ifp"], prompt_tps), median(runs["ifp"], generation_tps)
    ref_p, ref_g = median(runs["mlx-lm"], prompt_tps), median(runs["mlx-lm"], generation_tps)
    return {
        "ifp_prompt_tps": ifp_p, "ifp_generation_tps": ifp_g,
        "mlx_lm_prompt_tps": ref_p, "mlx_lm_generation_tps": ref_g,
        "prompt_ratio": ifp_p / ref_p, "generation_ratio": ifp_g / ref_g,
        "generation_ratio_per_round": per_round(runs["ifp"], runs["mlx-lm"], generation_tps),
    }


FILLER = (
    "The history of computing is a story of abstraction: each generation of engineers "
    "builds tools that hide the details their predecessors had to manage by hand. "
)


def synthetic_prompt(tokenizer, length: int) -> list[int]:
    """A prompt of exactly ``length`` tokens of ordinary English."""
    ids = tokenizer.encode(FILLER * (length // 20 + 2), add_special_tokens=False)
    return ids[:length]


def random_tokens(n: int, vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


# --- issue 3: the compact submodel ---------------------------------------------


def compact_vs_dense(
    loaded: LoadedModel, dense_k: LoadedModel, keep: float, tokens: list[int], max_tokens: int, rounds: int
) -> dict:
    """Decode with the gathered submodel against a dense model of FFN width k.

    The dense contender runs twice: through ifp's engine (the same module,
    so only the gathered arrays differ) and through mlx-lm's own MLP and
    ``stream_generate`` (what a user would otherwise run).
    """
    engine = Engine.create(loaded, make_selector("random", loaded), keep=keep)
    if dense_k.d_ff != engine.k:
        raise ValueError(f"the dense model's FFN width is {dense_k.d_ff}, the submodel's k is {engine.k}")
    dense_engine = Engine(dense_k)
    reference = mlx_lm_reference(dense_k)
    runs = alternate(
        {
            "compact": lambda: run_engine(engine, tokens, max_tokens),
            "dense_k_ifp": lambda: run_engine(dense_engine, tokens, max_tokens),
            "dense_k_mlx_lm": lambda: run_stream(reference, dense_k.tokenizer, tokens, max_tokens),
        },
        rounds,
    )
    tps = {name: median(r, generation_tps) for name, r in runs.items()}
    return {
        "keep": keep,
        "k": engine.k,
        "generation_tps": tps,
        "ratio_vs_dense_k_ifp": tps["compact"] / tps["dense_k_ifp"],
        "ratio_vs_dense_k_mlx_lm": tps["compact"] / tps["dense_k_mlx_lm"],
        "per_round_vs_dense_k_ifp": per_round(runs["compact"], runs["dense_k_ifp"], generation_tps),
        "per_round_vs_dense_k_mlx_lm": per_round(runs["compact"], runs["dense_k_mlx_lm"], generation_tps),
    }


def fresh_gathers(engine: Engine, tokens: list[int], max_tokens: int = 1) -> Callable[[], GenerationStats]:
    """A run that always gathers, as for a new prompt: the submodel cache is emptied first."""

    def run() -> GenerationStats:
        engine.submodels.clear()
        return run_engine(engine, tokens, max_tokens)

    return run


def gather_shares(
    loaded: LoadedModel, keep: float, tokens: list[int], rounds: int, selectors: Sequence[str] = ("activations", "random")
) -> dict:
    """Median share of the time to first token spent gathering, per selector."""
    engines = {name: Engine.create(loaded, make_selector(name, loaded), keep=keep) for name in selectors}
    for engine in engines.values():
        engine.warm_up()
    runs = alternate({name: fresh_gathers(e, tokens) for name, e in engines.items()}, rounds)
    return {
        name: {
            "gather_share": median(r, gather_share),
            "gather_ms": 1000 * median(r, phase("gather")),
            "time_to_first_token_ms": 1000 * median(r, lambda s: s.time_to_first_token),
            "phases_ms": {p: 1000 * median(r, phase(p)) for p in r[0].phases},
            "gathers": engines[name].gathers,
        }
        for name, r in runs.items()
    }


def compact_benchmark(
    hidden: int = 1024,
    d_ff: int = 4096,
    layers: int = 8,
    keeps: Sequence[float] = (0.5, 0.33),
    prompt_tokens: int = 512,
    decode_prompt_tokens: int = 32,
    max_tokens: int = 64,
    rounds: int = 5,
    vocab: int = 2048,
    parts: Sequence[str] = ("decode", "gather"),
    workdir: Optional[Path] = None,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """Issue 3's figures on random-weight llama models converted by ifp.

    Per keep, the ``parts`` asked for: ``decode``, tok/s of the compact submodel
    over a dense model of FFN width k (all other shapes equal); ``gather``, the
    gather's share of the time to first token for a ``prompt_tokens`` prompt.
    """
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        log(f"building a random llama: hidden {hidden}, d_ff {d_ff}, {layers} layers")
        loaded = load(build_random_model(Path(tmp) / "full", random_llama_config(hidden, d_ff, layers, vocab)))
        decode_prompt = random_tokens(decode_prompt_tokens, vocab, seed=1)
        long_prompt = random_tokens(prompt_tokens, vocab, seed=2)
        results = []
        for keep in keeps:
            k = resolve_k(d_ff, keep)
            result: dict = {"keep": keep, "k": k}
            if "decode" in parts:
                log(f"keep {keep}: building the dense model of FFN width {k}")
                dense_dir = build_random_model(Path(tmp) / f"dense-{k}", random_llama_config(hidden, k, layers, vocab))
                dense_k = load(dense_dir)
                log(f"keep {keep}: decode, {rounds} rounds")
                result.update(compact_vs_dense(loaded, dense_k, keep, decode_prompt, max_tokens, rounds))
                del dense_k
            if "gather" in parts:
                log(f"keep {keep}: gather share, {rounds} rounds")
                result["gather"] = gather_shares(loaded, keep, long_prompt, rounds)
            results.append(result)
    return {
        "model": {"hidden_size": hidden, "d_ff": d_ff, "layers": layers, "vocab_size": vocab},
        "decode_prompt_tokens": decode_prompt_tokens,
        "max_tokens": max_tokens,
        "gather_prompt_tokens": prompt_tokens,
        "rounds": rounds,
        "keeps": results,
    }
