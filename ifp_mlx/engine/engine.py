"""The engine: select -> gather -> prefill -> decode, one mask per reply.

It owns a loaded model, a selector and a small LRU cache of gathered submodels
keyed by the selection, so a repeated selection (per-task mode, a static mask,
a conversation) is gathered once. Every submodel is a dense compact copy,
gathered from the resident bank or, with ``--low-memory``, read from disk: no
per-token weight reloading.
"""

import time
from collections import OrderedDict
from typing import Iterator, Optional

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import (
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.sample_utils import make_sampler

from ..gather.backend import gather
from ..heap import release_free_memory
from ..model.bank import Bank, CompactFFN, check_indices
from ..model.bank_file import ReadStats
from ..model.load import LoadedModel
from ..select.base import PREFILL_STEP, Selection, Selector
from ..select.basic import DenseSelector
from ..select.choose import Choice, sized
from .stats import GenerationConfig, GenerationStats, SubmodelInfo


CACHED_SUBMODELS = 4  # gathered submodels an engine keeps by default (LRU)


class Engine:
    def __init__(
        self, loaded: LoadedModel, selector: Optional[Selector] = None, k: Optional[int] = None,
        requested_k: Optional[int] = None, cache_size: int = CACHED_SUBMODELS,
    ):
        self.loaded = loaded
        self.selector = selector or DenseSelector()
        self.k = k if k is not None else self.selector.default_k(loaded.d_ff)
        self.requested_k = requested_k
        self.cache_size = cache_size
        self.submodels: OrderedDict[bytes, CompactFFN] = OrderedDict()
        self.gathers = 0
        self.last_read: Optional[ReadStats] = None  # what the last --low-memory gather read from disk
        self.task_selection: Optional[Selection] = None
        if not mx.metal.is_available():
            # CPU's default 32 MiB buffer cache makes every new submodel page-fault.
            mx.set_cache_limit(1 << 30)

    @classmethod
    def for_choice(cls, loaded: LoadedModel, choice: Choice, cache_size: int = CACHED_SUBMODELS) -> "Engine":
        return cls(loaded, choice.selector, choice.k, choice.requested_k, cache_size)

    @classmethod
    def create(cls, loaded: LoadedModel, selector: Selector, keep: Optional[float] = None, k: Optional[int] = None) -> "Engine":
        """An engine for ``selector`` at the size named (or the selector's default)."""
        return cls.for_choice(loaded, sized(selector, loaded.d_ff, keep, k))

    @property
    def bank(self) -> Bank:
        return self.loaded.bank()

    def warm_up(self) -> None:
        """Read what the first reply needs before timing it: the dense FFN for a
        dense engine, else the resident bank (nothing in --low-memory mode, where
        every selection reads its own records)."""
        if isinstance(self.selector, DenseSelector):
            self.loaded.dense_ffn()
        elif not self.loaded.low_memory:
            self.bank

    def submodel(self, selection: Selection) -> tuple[CompactFFN, bool]:
        """The compact FFN of a selection, gathered or from the cache."""
        if selection.indices is None:
            return self.loaded.dense_ffn(), False
        key = selection.key
        if key in self.submodels:
            self.submodels.move_to_end(key)
            return self.submodels[key], False
        release_free_memory()  # the selection's transient buffers, before the submodel is built
        if self.loaded.low_memory:
            self.submodels.clear()  # bounded to what is in use: the point of --low-memory
            self.loaded.unassign()  # ... and the layers let go of the last one before the next is read
            ffn, self.last_read = self.loaded.bank_file().gather(selection.indices)
        else:
            ffn = gather(self.bank, selection.indices)
        mx.eval(ffn.arrays())
        release_free_memory()  # the selection's and gather's transient buffers: resident memory is the submodel
        self.gathers += 1
        self.submodels[key] = ffn
        while len(self.submodels) > self.cache_size:
            self.submodels.popitem(last=False)
        return ffn, True

    def use(self, selection: Selection) -> bool:
        """Make the model compute with ``selection``'s submodel (gathered or cached),
        with the selector's adapter when pruned; returns whether it was gathered now."""
        ffn, gathered = self.submodel(selection)
        self.loaded.assign(ffn)
        self.loaded.use_adapter(self.selector.adapter if selection.indices is not None else None, selection.indices)
        return gathered

    def select(self, tokens: list[int]) -> Selection:
        """The selector's choice for ``tokens``, its channel numbers checked once here."""
        selection = self.selector.select(tokens, self.k)
        if selection.indices is not None:
            L = self.loaded.num_layers
            selection.indices = check_indices(selection.indices, L, self.loaded.d_ff, f"the {self.selector.name} selection")
        return selection

    def set_task(self, task_tokens: list[int]) -> Selection:
        """Per-task mode: choose the mask once from the instruction, reuse it."""
        selection = self.select(task_tokens)
        self.task_selection = Selection(selection.indices)
        return self.task_selection

    def info(self, gathered: bool) -> SubmodelInfo:
        total = self.loaded.ifp.get("parameters", 0)
        d = self.loaded.ifp["bank"]["hidden_size"]
        pruned = 3 * d * (self.loaded.d_ff - self.k) * self.loaded.num_layers
        return SubmodelInfo(self.k, self.loaded.d_ff, self.requested_k, total - pruned, total, gathered, self.gathers, self.selector.name)

    def generate(
        self, tokens: list[int], config: GenerationConfig, stats: GenerationStats,
        selection: Optional[Selection] = None, cache: Optional[list] = None, cached: int = 0,
        select_from: Optional[list[int]] = None,
    ) -> Iterator[str]:
        """Stream the reply to ``tokens``; ``stats`` gets the phase timings.

        ``selection``: a mask chosen before (a conversation's, a task's); else
        the selector chooses from ``select_from`` (a conversation's first turn),
        or from ``tokens``. ``cache``: a KV cache of that
        selection's submodel already holding ``tokens[:cached]`` (a conversation's
        earlier turns); it is extended in place. Closing the generator stops the
        reply; ``stats.token_ids`` has what was generated.
        """
        if config.seed is not None:
            mx.random.seed(config.seed)
        mx.reset_peak_memory()
        start = time.perf_counter()
        if selection is None and select_from is not None:
            # a conversation's mask: its KV must be the submodel's own, not a selector's dense prefill
            selection = Selection(self.select(select_from).indices)
        selection = selection or self.task_selection or self.select(tokens)
        t_select = time.perf_counter()
        self.last_read = None
        gathered = self.use(selection)
        t_gather = time.perf_counter()
        reused = cached if cache is not None and 0 <= cached < len(tokens) else 0
        if not reused:  # no conversation's KV: maybe the selector's dense prefill of the prompt
            cache, cached = self._reusable_cache(selection, len(tokens))
        self._prefill(tokens[cached:-1], cache)
        t_prefill = time.perf_counter()
        stats.submodel = self.info(gathered)
        stats.read = self.last_read
        stats.prompt_tokens, stats.cached_tokens = len(tokens), reused
        stats.selection, stats.cache = selection, cache
        response = None
        sampler = make_sampler(config.temp, config.top_p)
        try:
            for response in stream_generate(
                self.loaded.model, self.loaded.tokenizer, mx.array(tokens[-1:]),
                max_tokens=config.max_tokens, sampler=sampler, prompt_cache=cache,
            ):
                if stats.generation_tokens == 0:
                    now = time.perf_counter()
                    stats.time_to_first_token = now - start
                    stats.phases = {
                        "select": t_select - start,
                        "read" if self.loaded.low_memory else "gather": t_gather - t_select,
                        "prefill": t_prefill - t_gather,
                        "first token": now - t_prefill,
                    }
                    model_time = now - t_gather + (t_select - start if selection.prompt_cache is not None else 0)
                    stats.prompt_tps = (len(tokens) - reused) / model_time
                stats.generation_tokens = response.generation_tokens
                stats.token_ids.append(response.token)
                yield response.text
        finally:  # also when the caller stops the reply (closes this generator)
            if response is not None:
                stats.generation_tps = response.generation_tps
                stats.peak_memory_gb = mx.get_peak_memory() / 1e9
                stats.finish_reason = response.finish_reason or "interrupted"

    def _reusable_cache(self, selection: Selection, num_tokens: int) -> tuple[list, int]:
        """The selector's dense KV cache minus the last prompt token, if usable."""
        cache = selection.prompt_cache
        if cache is not None and selection.cached_tokens == num_tokens and num_tokens > 1:
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                return cache, num_tokens - 1
        return make_prompt_cache(self.loaded.model), 0

    def _prefill(self, tokens: list[int], cache: list) -> None:
        for start in range(0, len(tokens), PREFILL_STEP):
            self.loaded.model(mx.array(tokens[start : start + PREFILL_STEP])[None], cache=cache)
            mx.eval([c.state for c in cache])
