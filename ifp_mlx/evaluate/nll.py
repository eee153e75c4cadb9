"""Selection quality: response negative log-likelihood under each selector.

For every held-out (prompt, response) pair, the selector picks the mask from
the prompt, the gathered submodel processes prompt and response (the pruned
model does the prefill too, as in IFPruning), and the mean NLL per response
token is compared with the dense model's. Lower is better; dense is the floor.
Mask overlap within and across domains shows whether masks depend on the prompt
(a collapsed predictor gives the same mask everywhere).
"""

import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..data.records import read_records
from ..engine.engine import Engine
from ..engine.prompts import prompt_tokens
from ..errors import IFPError
from ..model.load import LoadedModel
from ..model.masks import mask_overlap

MAX_RESPONSE_TOKENS = 128


@dataclass
class Example:
    id: str
    domain: str
    prompt: str
    response: str


@dataclass
class SelectorResult:
    nll: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # domain -> per example
    masks: dict[str, list[np.ndarray]] = field(default_factory=lambda: defaultdict(list))

    def mean_nll(self, domain: str) -> float:
        return float(np.mean(self.nll[domain]))


def read_examples(paths: list[Path], limit_per_domain: Optional[int] = None) -> list[Example]:
    """(prompt, response) records from jsonl files, at most ``limit_per_domain`` each."""
    examples, counts = [], defaultdict(int)
    for path in paths:
        for record in read_records(path):
            if "prompt" not in record:
                raise IFPError(f"{path}: record {record['id']} has no prompt/response (prose is for training)")
            if limit_per_domain is None or counts[record["domain"]] < limit_per_domain:
                counts[record["domain"]] += 1
                examples.append(Example(record["id"], record["domain"], record["prompt"], record["response"]))
    return examples


def example_tokens(loaded: LoadedModel, example: Example) -> tuple[list[int], list[int]]:
    prompt = prompt_tokens(loaded.tokenizer, example.prompt)
    response = loaded.tokenizer.encode(example.response, add_special_tokens=False)[:MAX_RESPONSE_TOKENS]
    return prompt, response


def response_nll(loaded: LoadedModel, prompt: list[int], response: list[int]) -> float:
    """Mean NLL per response token under whatever FFN the model has assigned."""
    tokens = mx.array(prompt + response)[None]
    logits = loaded.model(tokens[:, :-1])[:, len(prompt) - 1 :].astype(mx.float32)
    targets = tokens[:, len(prompt) :]
    return nn.losses.cross_entropy(logits, targets, reduction="mean").item()


def evaluate(
    loaded: LoadedModel,
    examples: list[Example],
    engines: dict[str, Engine],
    progress: Optional[Callable[[int, int], None]] = None,
) -> dict[str, SelectorResult]:
    """NLL of every example under every engine's selection (and its masks)."""
    results = {name: SelectorResult() for name in engines}
    encoded = [example_tokens(loaded, e) for e in examples]
    steps, done = len(examples) * len(engines), 0
    for name, engine in engines.items():
        for example, (prompt, response) in zip(examples, encoded):
            selection = engine.select(prompt)
            ffn, _ = engine.submodel(selection)
            loaded.assign(ffn)
            results[name].nll[example.domain].append(response_nll(loaded, prompt, response))
            if selection.indices is not None:
                results[name].masks[example.domain].append(np.array(selection.indices))
            done += 1
            if progress:
                progress(done, steps)
    return results


def overlap_by_domain(masks: dict[str, list[np.ndarray]], d_ff: int) -> tuple[float, float]:
    """Mean pairwise mask overlap within a domain and across domains."""
    within, across = [], []
    items = [(domain, m) for domain, ms in masks.items() for m in ms]
    for (da, a), (db, b) in itertools.combinations(items, 2):
        (within if da == db else across).append(mask_overlap(a, b, d_ff))
    return (float(np.mean(within)) if within else float("nan"), float(np.mean(across)) if across else float("nan"))
