"""``ifp bench``: llama-bench-style tests of dense, pruned and low-memory generation.

A test is one row (dense; a selector at a keep ratio, with the bank in memory or
on disk; mlx-lm's ``stream_generate`` on the same weights) at one prompt
length: a warm-up reply, then ``repetitions`` timed replies of ``max_tokens``
tokens each, reported as mean and standard deviation, as llama-bench and
mlx_lm.benchmark do.

Each test loads the model afresh (and frees the last test's), so its memory
figures are its own: MLX's peak during a reply, and the process's peak RSS from
just before the load (see :mod:`.machine`). Every reply selects and gathers
anew, as for a new prompt: the engine's submodel cache is emptied before it.
The end-of-sequence tokens are ignored, so every reply runs to ``max_tokens``.

By default tests run one after the other (each holds its own model), so the
decode speed-ups against the dense row carry the machine's drift over the run.
With ``alternate`` every row is held at once and the rows take turns, one reply
each per round, so drift falls on all rows alike; memory is then not per row and
is left out. Measure speed-ups that way, memory the default way.
"""

import gc
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from ..engine.engine import Engine
from ..engine.prompts import context_length
from ..engine.stats import GenerationStats
from ..errors import IFPError
from ..model.load import LoadedModel, load, read_config
from ..select.choose import choose, default_selector
from ..select.predictor import has_predictor
from .machine import evict_from_page_cache, machine_info, peak_rss_bytes, reset_peak_rss, rss_bytes
from .ratios import alternate, fresh_gathers, mlx_lm_reference, run_stream, synthetic_prompt
from .settings import Row, Settings, check_selectors, check_settings, plan
from .traffic import Traffic, traffic

SCHEMA = "ifp-bench/1"


@dataclass
class Test:
    """One row at one prompt length, with every timed repetition."""

    row: Row
    prompt_tokens: int
    max_tokens: int
    k: int
    active_parameters: int
    total_parameters: int
    ideal_speedup: float
    bytes_per_token: int
    runs: list[dict] = field(default_factory=list)  # repetition() of each timed reply
    peak_rss_bytes: Optional[int] = 0  # None when rows alternate (memory is not per row then)
    rss_at_start_bytes: Optional[int] = None
    decode_speedup: Optional[float] = None  # against the dense row at the same prompt length
    speedup_per_round: list[float] = field(default_factory=list)  # repetition i over dense's repetition i

    def to_json(self) -> dict:
        reps = self.runs
        return {
            "row": self.row.name, **asdict(self.row),
            "prompt_tokens": self.prompt_tokens, "max_tokens": self.max_tokens, "k": self.k,
            "active_parameters": self.active_parameters, "total_parameters": self.total_parameters,
            "bytes_per_token": self.bytes_per_token, "ideal_speedup": self.ideal_speedup,
            "decode_speedup": self.decode_speedup,
            "decode_speedup_per_round": self.speedup_per_round,
            "peak_memory_gb": None if self.peak_rss_bytes is None else max(r["peak_memory_gb"] for r in reps),
            "peak_rss_gb": None if self.peak_rss_bytes is None else self.peak_rss_bytes / 1e9,
            "rss_at_start_gb": None if self.rss_at_start_bytes is None else self.rss_at_start_bytes / 1e9,
            "mean": summarize(reps, statistics.fmean),
            "std": summarize(reps, spread),
            "repetitions": reps,
        }


def repetition(stats: GenerationStats) -> dict:
    """One timed reply's raw figures (the stats themselves hold the reply's KV cache:
    not kept). ``prompt_tps`` is the prompt over the time to first token, select and
    gather included, as mlx-lm's own figure is; ``engine_prompt_tps`` is the engine's."""
    return {
        "prompt_tps": stats.prompt_tokens / stats.time_to_first_token,
        "engine_prompt_tps": stats.prompt_tps,
        "generation_tps": stats.generation_tps,
        "generation_tokens": stats.generation_tokens,
        "time_to_first_token_s": stats.time_to_first_token,
        "phases_s": dict(stats.phases),
        "peak_memory_gb": stats.peak_memory_gb,
        "read_bytes": None if stats.read is None else stats.read.bytes,
        "read_seconds": None if stats.read is None else stats.read.seconds,
    }


def spread(values: list[float]) -> float:
    """The sample standard deviation (0 for a single repetition)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(reps: list[dict], reduce: Callable[[list[float]], float]) -> dict:
    """``reduce`` over the repetitions of every figure (phases one by one)."""
    out = {}
    for name in ("prompt_tps", "engine_prompt_tps", "generation_tps", "time_to_first_token_s", "read_bytes", "read_seconds"):
        values = [r[name] for r in reps if r[name] is not None]
        out[name] = reduce(values) if values else None
    out["phases_s"] = {p: reduce([r["phases_s"][p] for r in reps]) for p in reps[0]["phases_s"]}
    if reduce is statistics.fmean and "select" in out["phases_s"]:
        out["select_share"] = out["phases_s"]["select"] / out["time_to_first_token_s"]
    return out


def release() -> None:
    """Free the last test's model, so the next test's memory is its own."""
    gc.collect()
    mx.clear_cache()


def replier(loaded: LoadedModel, row: Row, settings: Settings) -> tuple[Callable[[list[int]], GenerationStats], int, int]:
    """A function that runs one reply of the row; the row's k and active parameters."""
    total = loaded.ifp.get("parameters", 0)
    if row.kind == "mlx-lm":
        reference = mlx_lm_reference(loaded)
        return lambda tokens: run_stream(reference, loaded.tokenizer, tokens, settings.max_tokens), loaded.d_ff, total
    keep = None if row.kind == "dense" else row.keep
    engine = Engine.for_choice(loaded, choose(loaded, row.selector or "dense", keep=keep))
    engine.warm_up()
    cold = settings.cold and loaded.low_memory

    def reply(tokens: list[int]) -> GenerationStats:
        if cold:
            evict_from_page_cache(loaded.bank_path)
        return fresh_gathers(engine, tokens, settings.max_tokens)()

    return reply, engine.k, engine.info(False).active_parameters


def open_model(path: Path, low_memory: bool) -> LoadedModel:
    loaded = load(path, dense=False, low_memory=low_memory)
    loaded.tokenizer.eos_token_ids = ()  # every reply runs to max_tokens, as in llama-bench
    return loaded


def announced(reply: Callable[[list[int]], GenerationStats], tokens: list[int], what: str, repetitions: int,
              on_run: Callable[[str], None]) -> Callable[[], dict]:
    """``reply`` on ``tokens`` as a contender that reports each start and returns its figures."""
    calls = [0]

    def run() -> dict:
        on_run(f"{what}: " + (f"repetition {calls[0]}/{repetitions}" if calls[0] else "warm-up"))
        calls[0] += 1
        return repetition(reply(tokens))

    return run


def run_test(
    path: Path, row: Row, prompt_tokens: int, settings: Settings, costs: Traffic, on_run: Callable[[str], None]
) -> Test:
    """Load, warm up, then time ``settings.repetitions`` replies of one row."""
    release()
    reset_peak_rss()
    start_rss = rss_bytes()
    loaded = open_model(path, row.low_memory)
    reply, k, active = replier(loaded, row, settings)
    run = announced(reply, synthetic_prompt(loaded.tokenizer, prompt_tokens), f"{row.name}, p {prompt_tokens}",
                    settings.repetitions, on_run)
    test = Test(row, prompt_tokens, settings.max_tokens, k, active, loaded.ifp.get("parameters", 0),
                costs.ideal_speedup(k), costs.per_token(k), rss_at_start_bytes=start_rss)
    run()
    test.runs = [run() for _ in range(settings.repetitions)]
    test.peak_rss_bytes = peak_rss_bytes()
    return test


def run_sequential(path: Path, rows: list[Row], settings: Settings, costs: Traffic, on_run: Callable[[str], None]) -> list[Test]:
    """Each row at each prompt length on its own, so its memory figures are its own."""
    return [run_test(path, row, p, settings, costs, on_run) for row in rows for p in settings.prompt_tokens]


def run_alternated(path: Path, rows: list[Row], settings: Settings, costs: Traffic, on_run: Callable[[str], None]) -> list[Test]:
    """Every row held at once, one reply of each per round (:func:`.ratios.alternate`), so
    slow spells of a shared machine fall on all rows alike. Memory is not per row then:
    it is left out. Rows in memory share one loaded model, rows on disk another."""
    models = {low: open_model(path, low) for low in dict.fromkeys(r.low_memory for r in rows)}
    repliers = {row.name: (row, *replier(models[row.low_memory], row, settings)) for row in rows}
    tokenizer = next(iter(models.values())).tokenizer
    tests = []
    for p in settings.prompt_tokens:
        tokens = synthetic_prompt(tokenizer, p)
        contenders = {name: announced(reply, tokens, f"{name}, p {p}", settings.repetitions, on_run)
                      for name, (_, reply, _, _) in repliers.items()}
        runs = alternate(contenders, settings.repetitions)
        for name, (row, _, k, active) in repliers.items():
            total = models[row.low_memory].ifp.get("parameters", 0)
            test = Test(row, p, settings.max_tokens, k, active, total, costs.ideal_speedup(k), costs.per_token(k))
            test.runs, test.peak_rss_bytes = runs[name], None
            tests.append(test)
    return tests


def count_runs(settings: Settings, rows: int) -> int:
    """Replies the benchmark will run, warm-ups included (for a progress bar)."""
    return rows * len(settings.prompt_tokens) * (settings.repetitions + 1)


def prepare(path: Path, settings: Settings) -> tuple[list[Row], Traffic, dict]:
    """Check the settings against the model; the rows, the bytes per token, and the model's description."""
    check_settings(settings)
    check_selectors(settings.selectors)
    config = read_config(path)
    context = context_length(config)
    longest = max(settings.prompt_tokens) + settings.max_tokens
    if context is not None and longest > context:
        raise IFPError(f"-p {max(settings.prompt_tokens)} plus -n {settings.max_tokens} is {longest} tokens, "
                       f"over the model's context of {context}")
    loaded = load(path, dense=False)
    if "predictor" in settings.selectors and not has_predictor(loaded):
        raise IFPError(f"{path.name} has no predictor: choose --selector activations (or another), "
                       "or give the model a predictor/ folder")
    selectors = settings.selectors or (default_selector(loaded),)
    costs = traffic(loaded)
    return plan(settings, selectors), costs, describe_model(loaded, costs)


def describe_model(loaded: LoadedModel, costs: Traffic) -> dict:
    """The model's shapes, files and bytes per token, for the results."""
    ifp = loaded.ifp
    return {
        "path": str(loaded.path),
        "name": loaded.path.name,
        "model_type": loaded.config.get("model_type"),
        "hidden_size": ifp["bank"]["hidden_size"],
        "d_ff": loaded.d_ff,
        "layers": loaded.num_layers,
        "vocab_size": loaded.config.get("vocab_size"),
        "dtype": ifp.get("dtype"),
        "quantization": loaded.config.get("quantization"),
        "parameters": ifp.get("parameters"),
        "files": {"weights": (loaded.path / ifp["weights"]).stat().st_size, "bank": loaded.bank_path.stat().st_size},
        "bytes_per_token": {"non_ffn": costs.non_ffn, "ffn_dense": costs.ffn_dense},
    }


def run_bench(
    path: Path, settings: Settings, on_run: Callable[[str], None] = lambda s: None,
    on_plan: Callable[[int], None] = lambda n: None, extra: Optional[dict] = None,
) -> dict:
    """Every test of the settings on the model folder; the results as JSON-ready data.

    ``on_plan`` hears the number of replies to come, ``on_run`` each one as it starts.
    """
    rows, costs, model = prepare(Path(path), settings)
    on_plan(count_runs(settings, len(rows)))
    run = run_alternated if settings.alternate else run_sequential
    tests = run(Path(path), rows, settings, costs, on_run)
    release()
    dense = {t.prompt_tokens: t for t in tests if t.row.kind == "dense"}
    for t in tests:
        base = dense[t.prompt_tokens]
        t.decode_speedup = mean_tps(t) / mean_tps(base)
        t.speedup_per_round = [a["generation_tps"] / b["generation_tps"] for a, b in zip(t.runs, base.runs)]
    return {
        "schema": SCHEMA,
        "settings": {**asdict(settings), **(extra or {})},
        "machine": machine_info(),
        "model": model,
        "tests": [t.to_json() for t in tests],
    }


def mean_tps(test: Test) -> float:
    return statistics.fmean(r["generation_tps"] for r in test.runs)
