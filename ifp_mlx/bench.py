"""Benchmarks whose figures go into docs/: ratios measured inside one run.

Absolute CPU timings are noisy, so every comparison alternates the two
contenders over several rounds and reports the median of each.
"""

import statistics
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.generate import stream_generate

from .engine import Engine
from .generate import GenerationConfig, GenerationStats
from .load import LoadedModel, load


@dataclass
class Timing:
    name: str
    prompt_tps: list
    generation_tps: list

    def median(self) -> tuple[float, float]:
        return statistics.median(self.prompt_tps), statistics.median(self.generation_tps)


def _run_ifp(loaded: LoadedModel, tokens: list[int], max_tokens: int) -> tuple[float, float]:
    stats = GenerationStats()
    for _ in Engine(loaded).generate(tokens, GenerationConfig(max_tokens=max_tokens), stats):
        pass
    return stats.prompt_tps, stats.generation_tps


def _run_stream(model: nn.Module, loaded: LoadedModel, tokens: list[int], max_tokens: int) -> tuple[float, float]:
    response = None
    for response in stream_generate(model, loaded.tokenizer, mx.array(tokens), max_tokens=max_tokens):
        pass
    return response.prompt_tps, response.generation_tps


def alternate(contenders: dict[str, Callable[[], tuple[float, float]]], rounds: int) -> list[Timing]:
    """Run each contender once per round, in turn, after one warm-up each."""
    timings = {name: Timing(name, [], []) for name in contenders}
    for run in contenders.values():
        run()
    for _ in range(rounds):
        for name, run in contenders.items():
            p, g = run()
            timings[name].prompt_tps.append(p)
            timings[name].generation_tps.append(g)
    return list(timings.values())


def mlx_lm_reference(loaded: LoadedModel) -> nn.Module:
    """The same weights in mlx-lm's own model with its own MLP modules."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(loaded.config)
    reference = model_class(args_class.from_dict(loaded.config))
    if loaded.config.get("quantization"):
        raise ValueError("the mlx-lm reference is built for float models only")
    ours = dict(tree_flatten(loaded.model.parameters()))
    bank = loaded.bank()
    weights = [(k, v) for k, v in ours.items() if ".mlp." not in k]
    for i in range(loaded.num_layers):
        prefix = f"model.layers.{i}.mlp."
        weights += [
            (prefix + "gate_proj.weight", bank.weight[i, :, 0]),
            (prefix + "up_proj.weight", bank.weight[i, :, 1]),
            (prefix + "down_proj.weight", bank.weight[i, :, 2].T),
        ]
    reference.load_weights([(k, mx.contiguous(v)) for k, v in weights], strict=False)
    mx.eval(reference.parameters())
    return reference


def dense_vs_mlx_lm(model_dir: str, tokens: list[int], max_tokens: int = 64, rounds: int = 5) -> dict:
    """ifp's dense generation against mlx-lm's stream_generate on the same weights."""
    loaded = load(model_dir)
    reference = mlx_lm_reference(loaded)
    results = alternate(
        {
            "ifp": lambda: _run_ifp(loaded, tokens, max_tokens),
            "mlx-lm": lambda: _run_stream(reference, loaded, tokens, max_tokens),
        },
        rounds,
    )
    (ifp_p, ifp_g), (ref_p, ref_g) = (t.median() for t in results)
    return {
        "ifp_prompt_tps": ifp_p, "ifp_generation_tps": ifp_g,
        "mlx_lm_prompt_tps": ref_p, "mlx_lm_generation_tps": ref_g,
        "prompt_ratio": ifp_p / ref_p, "generation_ratio": ifp_g / ref_g,
    }


FILLER = (
    "The history of computing is a story of abstraction: each generation of engineers "
    "builds tools that hide the details their predecessors had to manage by hand. "
)


def synthetic_prompt(tokenizer, length: int) -> list[int]:
    """A prompt of exactly ``length`` tokens of ordinary English."""
    ids = tokenizer.encode(FILLER * (length // 20 + 2), add_special_tokens=False)
    return ids[:length]
