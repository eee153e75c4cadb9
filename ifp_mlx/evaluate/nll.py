"""Log-likelihoods under whatever FFN the model has assigned.

Response NLL: for a held-out (prompt, response) pair, the selector picks the
mask from the prompt, the gathered submodel processes prompt and response (the
pruned model does the prefill too, as in IFPruning), and the mean NLL per
response token is compared with the dense model's. Lower is better; dense is
the floor. Continuation log-probabilities score multiple-choice answers (MMLU,
lm-evaluation-harness requests).
"""

import copy
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from ..data.records import read_records
from ..engine.prompts import prompt_tokens
from ..errors import IFPError
from ..model.load import LoadedModel
from ..select.base import PREFILL_STEP

MAX_RESPONSE_TOKENS = 128


@dataclass
class Example:
    id: str
    domain: str
    prompt: str
    response: str


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


def continuation_logprobs(
    model: nn.Module, context: list[int], continuations: Sequence[Sequence[int]]
) -> list[tuple[float, bool]]:
    """Log-probability of each continuation after ``context``, and whether greedy decoding gives it.

    The context runs once (in chunks, into a KV cache); a continuation of one
    token is read off the context's last logits, a longer one runs on the
    cache, which is then trimmed back (copied, for caches that cannot trim).
    So choices of a multiple-choice question cost one prefill, not four.
    """
    if not context:
        raise IFPError("internal: a continuation needs a context of at least one token")
    cache = make_prompt_cache(model)
    for start in range(0, len(context), PREFILL_STEP):
        logits = model(mx.array(context[start : start + PREFILL_STEP])[None], cache=cache)
    last = nn.log_softmax(logits[0, -1].astype(mx.float32))
    mx.eval(last)
    trimmable = can_trim_prompt_cache(cache)
    results = []
    for continuation in continuations:
        first = int(continuation[0])
        logprob, greedy = last[first], mx.argmax(last) == first
        if len(continuation) > 1:
            rest = mx.array(continuation[1:])
            run_cache = cache if trimmable else copy.deepcopy(cache)
            logp = nn.log_softmax(model(mx.array(continuation[:-1])[None], cache=run_cache)[0].astype(mx.float32))
            logprob = logprob + mx.take_along_axis(logp, rest[:, None], axis=-1).sum()
            greedy = mx.logical_and(greedy, mx.all(mx.argmax(logp, axis=-1) == rest))
            if trimmable:
                trim_prompt_cache(cache, len(continuation) - 1)
        results.append((logprob.item(), bool(greedy.item())))
    return results

