"""ifp as an lm-evaluation-harness model: any harness task, run under pruning (``--lm-eval``).

Like ``mlx_lm.evaluate``, a subclass of the harness's ``LM`` answers its
three kinds of request, here with the mask chosen per request:

- ``loglikelihood``: requests are grouped by context; the selector chooses
  the mask from the context, the submodel scores every continuation after it
  (one prefill per context: ``nll.continuation_logprobs``);
- ``generate_until``: the engine's greedy reply to the context under its own
  mask, cut at the first stop string;
- ``loglikelihood_rolling`` (perplexity tasks): a text has no prompt, so the
  mask is chosen from its first ``ROLLING_PROMPT_TOKENS`` tokens.

The oracle has no reference answer here and is refused. lm-eval is an
optional dependency (``pip install 'ifp-mlx[eval]'``); tasks come from the
harness's own registry or from ``--lm-eval-include DIR`` (yaml task files,
e.g. over a local jsonl: nothing has to come from the Hugging Face hub).
"""

import functools
import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

from ..engine.engine import Engine
from ..engine.prompts import context_length
from ..errors import IFPError
from ..model.load import LoadedModel
from ..select.base import Selection
from .nll import continuation_logprobs
from .oracle import OracleSelector
from .tasks import NoProgress, Progress, generate

try:
    import lm_eval
    from lm_eval.api.model import LM
except ImportError:
    raise IFPError("--lm-eval needs lm-evaluation-harness: pip install 'ifp-mlx[eval]' (or lm-eval==0.4.13)") from None

ROLLING_PROMPT_TOKENS = 64
DEFAULT_GEN_TOKENS = 256
SKIPPED_METRIC_KEYS = ("alias", "samples", "name", "sample_len", "sample_count")


class IFPHarnessModel(LM):
    """The harness's model interface over an ifp engine (one selector, one k)."""

    def __init__(self, engine: Engine, max_tokens: Optional[int] = None, chat_template: Optional[bool] = None,
                 progress: Progress = NoProgress()):
        super().__init__()
        if isinstance(engine.selector, OracleSelector):
            raise IFPError("the oracle needs a reference answer, which harness tasks do not give: drop it from --selectors")
        self.engine, self.loaded, self.tokenizer = engine, engine.loaded, engine.loaded.tokenizer
        self.max_tokens = max_tokens
        self.use_chat_template = self.tokenizer.chat_template is not None if chat_template is None else chat_template
        self.progress = progress
        self.context = context_length(self.loaded.config)

    @property
    def tokenizer_name(self) -> str:
        return str(self.loaded.path).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def _encode(self, text: str) -> list[int]:
        """Templated text already holds its special tokens; plain text gets the tokenizer's."""
        return self.tokenizer.encode(text, add_special_tokens=not self.use_chat_template)

    def _start(self) -> list[int]:
        """The one token an empty context is: BOS if the model has one, else EOS (as the harness does)."""
        token = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        return [token]

    def _assign(self, tokens: list[int]) -> Selection:
        """Choose the mask from ``tokens`` and make the model compute with its submodel."""
        selection = self.engine.select(tokens)
        self.engine.use(selection)
        return selection

    def _continuation(self, context: str, context_tokens: list[int], continuation: str) -> list[int]:
        """The continuation's tokens as the joint text tokenizes them (a word boundary can merge)."""
        joint = self._encode(context + continuation) if context else []
        if joint[: len(context_tokens)] == context_tokens and len(joint) > len(context_tokens):
            return joint[len(context_tokens) :]
        return self.tokenizer.encode(continuation, add_special_tokens=False)

    def _fit(self, context: list[int], longest: int) -> list[int]:
        """The context's last tokens that leave room for the longest continuation."""
        if self.context is None or len(context) + longest <= self.context:
            return context
        return context[max(1, len(context) + longest - self.context) :]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        groups = defaultdict(list)
        for index, request in enumerate(requests):
            groups[request.args[0]].append((index, request.args[1]))
        self.progress.total(len(groups))
        scores: list = [None] * len(requests)
        for context, entries in groups.items():
            tokens = self._encode(context) if context else self._start()
            continuations = [self._continuation(context, tokens, text) for _, text in entries]
            tokens = self._fit(tokens, max(len(c) for c in continuations))
            self._assign(tokens)
            for (index, _), score in zip(entries, continuation_logprobs(self.loaded.model, tokens, continuations)):
                scores[index] = score
            self.progress.advance()
        return scores

    def loglikelihood_rolling(self, requests) -> list[float]:
        self.progress.total(len(requests))
        totals = []
        for request in requests:
            tokens = self.tokenizer.encode(request.args[0], add_special_tokens=False)
            if self.context is not None and len(tokens) + 1 > self.context:
                raise IFPError(f"a rolling-loglikelihood text of {len(tokens)} tokens is longer than the model's context")
            self._assign(tokens[:ROLLING_PROMPT_TOKENS])
            totals.append(continuation_logprobs(self.loaded.model, self._start(), [tokens])[0][0])
            self.progress.advance()
        return totals

    def generate_until(self, requests) -> list[str]:
        self.progress.total(len(requests))
        replies = []
        for request in requests:
            context, options = request.args
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = self.max_tokens or options.get("max_gen_toks", DEFAULT_GEN_TOKENS)
            tokens = self._encode(context)
            selection = self.engine.select(tokens)
            stop = (lambda text: any(u in text for u in until)) if until else None
            reply, _ = generate(self.engine, tokens, selection, budget, stop)
            cuts = [reply.find(u) for u in until if u in reply]
            replies.append(reply[: min(cuts)] if cuts else reply)
            self.progress.advance()
        return replies


class HarnessTask:
    """One lm-evaluation-harness task as a column of the grid (``lm-eval:NAME``)."""

    def __init__(self, task: str, include: Optional[Path] = None, max_tokens: Optional[int] = None,
                 chat_template: Optional[bool] = None, num_fewshot: Optional[int] = None, seed: int = 0):
        self.task, self.name = task, f"lm-eval:{task}"
        self.include, self.max_tokens, self.chat_template = include, max_tokens, chat_template
        self.num_fewshot, self.seed = num_fewshot, seed
        self.limit: Optional[int] = None
        self.manager = None

    def prepare(self, loaded: LoadedModel, limit: Optional[int]) -> None:
        """Find the task (``include``'s files first); the harness builds its requests per cell."""
        self.limit = limit
        include = str(self.include) if self.include else None
        self.manager = task_manager(include, defaults=False) if include else None
        if self.manager is None or self.task not in self.manager.all_tasks:
            self.manager = task_manager(include, defaults=True)
        if self.task not in self.manager.all_tasks:
            hint = "" if self.include else " (local task files go with --lm-eval-include DIR)"
            raise IFPError(f"lm-eval has no task {self.task!r}{hint}")
        return None

    def run(self, engine: Engine, items: Optional[list], progress: Progress) -> dict:
        model = IFPHarnessModel(engine, self.max_tokens, self.chat_template, progress)
        out = lm_eval.simple_evaluate(
            model=model, tasks=[self.task], limit=self.limit, task_manager=self.manager, num_fewshot=self.num_fewshot,
            apply_chat_template=model.use_chat_template, bootstrap_iters=0, log_samples=True, verbosity="ERROR",
            random_seed=self.seed, numpy_random_seed=self.seed, torch_random_seed=None, fewshot_random_seed=self.seed,
        )
        results = _plain(out["results"])
        samples = _plain(out.get("samples", {}))
        return {"metrics": {**primary_metric(results.get(self.task) or next(iter(results.values()))), "results": results},
                "items": [dict(s, task=name) for name, rows in samples.items() for s in rows]}


@functools.lru_cache(maxsize=None)
def task_manager(include: Optional[str], defaults: bool):
    """The harness's task index, built once per run: the built-in one (``defaults``) reads
    some 15,000 task files, so a task found in ``include`` alone skips it."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=defaults)


def primary_metric(metrics: dict) -> dict:
    """The task's first reported metric (accuracy for multiple choice, exact match for generation)."""
    for key, value in metrics.items():
        if key in SKIPPED_METRIC_KEYS or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        return {"accuracy": float(value), "metric": key}
    return {"accuracy": float("nan"), "metric": None}


def _plain(value):
    """The harness's results as plain JSON (numpy numbers, tuples and the rest as their text)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
