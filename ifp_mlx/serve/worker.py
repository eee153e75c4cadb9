"""The one thread that touches the model: requests wait their turn and run one at a time.

MLX is not thread-safe, and one model has one set of FFN weights assigned at
a time, so every MLX call (loading included) and every tokenizer call
happens on this thread. The HTTP handlers hand it a :class:`Job` and read the
job's events from an asyncio queue; a job whose client went away is
cancelled: skipped if it is still waiting, closed between two tokens if it
is running (the conversation's KV is stored back either way).
"""

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from ..engine.conversation import ConversationCache, reply
from ..engine.engine import CACHED_SUBMODELS, Engine
from ..engine.prompts import chat_tokens, check_context, prompt_tokens
from ..engine.stats import GenerationConfig, GenerationStats
from ..errors import IFPError
from ..select.base import Selection, resolve_k
from ..select.choose import choose, default_selector, prunes
from .protocol import APIError, Ask, Limits
from .responses import Usage
from .stops import StopWatch

log = logging.getLogger("ifp.serve")
MAX_ENGINES = 4  # (selector, k) pairs kept at once; each holds up to Settings.submodels gathered FFNs
RETRY_AFTER = "5"  # seconds a client turned away by a full queue is told to wait (a short reply's time)


@dataclass
class Settings:
    """The server's flags: its model, defaults for requests, and the bounds of its caches."""

    path: Path
    limits: Limits
    max_tokens: int = 512  # a reply's length when the request names none
    conversations: int = 8  # conversations whose KV is kept
    cache_bytes: int = 1 << 30  # ... and the most bytes of KV they may hold together
    submodels: int = CACHED_SUBMODELS  # gathered submodels each engine keeps
    queue: int = 32  # requests that may wait or run at once; beyond it, 503
    mask: Optional[Path] = None  # the static selector's mask file (--mask)
    predictor: Optional[Path] = None  # the predictor selector's folder (--predictor)


@dataclass
class Piece:
    text: str


@dataclass
class Finished:
    finish_reason: str
    usage: Usage
    info: dict


@dataclass
class Failed:
    error: APIError


Event = Union[Piece, Finished, Failed]


class ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


class Job:
    """One request's place in the queue, and the events its reply sends back."""

    POLL = 0.25  # seconds between checks that the client is still there

    def __init__(self, ask: Ask, loop: asyncio.AbstractEventLoop):
        self.ask = ask
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self._loop = loop
        self._checked = 0.0  # when the client was last seen connected (time.monotonic)

    def send(self, event: Event) -> None:
        """Called by the worker: hand ``event`` to the handler's loop."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    async def next_event(self, request) -> Event:
        """The next event; raises ClientGone (and cancels the job) once ``request``'s client disconnects.

        The client is checked every POLL seconds whether or not events flow:
        a reply that streams steadily to nobody must stop as surely as one
        that waits in the queue.
        """
        getter = asyncio.ensure_future(self.events.get())
        try:
            while True:
                if time.monotonic() - self._checked >= self.POLL:
                    self._checked = time.monotonic()
                    if await request.is_disconnected():
                        self.cancel()
                        raise ClientGone
                done, _ = await asyncio.wait({getter}, timeout=self.POLL)
                if done:
                    return getter.result()
        finally:
            getter.cancel()


@dataclass
class Counters:
    served: int = 0
    cancelled: int = 0
    failed: int = 0
    started: float = field(default_factory=time.time)


class Worker:
    """Loads the model and runs the queued jobs, one at a time, on its own thread."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.jobs: queue.Queue[Optional[Job]] = queue.Queue()
        self.counters = Counters()
        self.current: Optional[Job] = None
        self.engines: OrderedDict[tuple, Engine] = OrderedDict()
        self.store = ConversationCache(settings.conversations, settings.cache_bytes)
        self._lock = threading.Lock()
        self._waiting = 0
        self._ready = threading.Event()
        self._startup_error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._main, name="ifp-generation", daemon=True)

    def start(self) -> None:
        """Load the model (and the default engine) on the worker thread; raise what went wrong there."""
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what runs and waits, and let the thread end."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.send(Failed(APIError(503, "the server is shutting down", type="server_error")))
        if self.current is not None:
            self.current.cancel()
        self.jobs.put(None)
        self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        """Jobs queued or running."""
        return self._waiting

    def submit(self, ask: Ask, loop: asyncio.AbstractEventLoop) -> Job:
        """Queue ``ask``; 503 when the queue is full (the client may retry)."""
        with self._lock:
            if self._waiting >= self.settings.queue:
                message = f"the server is busy: {self._waiting} requests are waiting; retry later"
                raise APIError(503, message, type="server_error", headers={"Retry-After": RETRY_AFTER})
            self._waiting += 1
        job = Job(ask, loop)
        self.jobs.put(job)
        return job

    def _main(self) -> None:
        try:
            from ..model.load import load

            self.loaded = load(self.settings.path, dense=False, low_memory=self.settings.limits.low_memory)
            limits = self.settings.limits
            # the files named on the command line are checked now, not at the first request for them
            for named, selector in ((self.settings.mask, "static"), (self.settings.predictor, "predictor")):
                if named is not None:
                    self._engine(selector, limits.keep)
            self._engine(limits.selector, limits.keep)
        except BaseException as e:  # handed to start(), on the main thread
            self._startup_error = e
            self._ready.set()
            return
        self._ready.set()
        while (job := self.jobs.get()) is not None:
            self.current = job
            try:
                if job.cancelled.is_set():
                    self.counters.cancelled += 1
                else:
                    self._run(job)
            finally:
                self.current = None
                with self._lock:
                    self._waiting -= 1

    def _engine(self, selector: Optional[str], keep: Optional[float], seed: int = 0) -> Engine:
        """The engine for (selector, k), built on first use; the least recently used goes first.

        Keyed by the selector's name as resolved (no selector named and the
        default named are one engine); the server's --mask and --predictor go
        to the selectors they belong to.
        """
        mask, predictor = self.settings.mask, self.settings.predictor
        if selector is None:
            prunes_now = prunes(None, keep, None, mask, predictor)
            selector = default_selector(self.loaded, mask, predictor) if prunes_now else "dense"
        k = None if keep is None else resolve_k(self.loaded.d_ff, keep)
        key = (selector, k, seed if selector == "random" else 0)
        if key in self.engines:
            self.engines.move_to_end(key)
            return self.engines[key]
        mask, predictor = (mask if selector == "static" else None), (predictor if selector == "predictor" else None)
        engine = Engine.for_choice(self.loaded, choose(self.loaded, selector, keep, mask=mask, predictor=predictor, seed=seed))
        engine.cache_size = self.settings.submodels
        engine.warm_up()
        self.engines[key] = engine
        while len(self.engines) > MAX_ENGINES:
            self.engines.popitem(last=False)
        return engine

    def _run(self, job: Job) -> None:
        try:
            cancelled = self._generate(job)
            if cancelled:
                self.counters.cancelled += 1
            else:
                self.counters.served += 1
        except APIError as e:
            self.counters.failed += 1
            job.send(Failed(e))
        except IFPError as e:
            self.counters.failed += 1
            job.send(Failed(APIError(400, str(e))))
        except Exception as e:  # one request's failure must not stop the server
            log.exception("generation failed")
            self.counters.failed += 1
            job.send(Failed(APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")))

    def _generate(self, job: Job) -> bool:
        """Stream ``job``'s reply to it; True when its client went away first."""
        ask = job.ask
        try:
            engine = self._engine(ask.selector, ask.keep, ask.seed or 0)
        except IFPError as e:
            raise APIError(400, str(e), "selector") from None
        config = self._config(ask)
        task = self._task_selection(engine, ask)
        stats, watch = GenerationStats(), StopWatch(ask.stop)
        stream = reply(engine, self.store, ask.messages, config, stats, reselect=ask.reselect, task=task, chat_template=ask.chat_template)
        try:
            for piece in stream:
                if job.cancelled.is_set():
                    return True
                if text := watch.feed(piece):
                    job.send(Piece(text))
                if watch.stopped:
                    break
        finally:
            stream.close()  # stops generation; the KV it holds is stored back for the next turn
        if job.cancelled.is_set():
            return True
        if rest := watch.flush():
            job.send(Piece(rest))
        finish = "length" if stats.finish_reason == "length" and not watch.stopped else "stop"  # OpenAI's two
        usage = Usage(stats.prompt_tokens, stats.generation_tokens, stats.cached_tokens)
        job.send(Finished(finish, usage, _info(stats, engine)))
        log.info("%s", stats.summary())
        return False

    def _config(self, ask: Ask) -> GenerationConfig:
        """Sampling settings, the prompt checked against the context (400 when it does not fit)."""
        tokenizer = self.loaded.tokenizer
        try:
            tokens = chat_tokens(tokenizer, ask.messages, ask.chat_template)
        except Exception as e:  # a chat template refusing the messages
            raise APIError(400, f"the messages do not fit the model's chat template: {e}", "messages") from None
        context = self.settings.limits.context
        what = "messages" if ask.chat_template else "prompt"
        max_tokens = ask.max_tokens
        try:
            check_context(tokens, max_tokens or 1, context, what=f"the {what}", hint="; shorten it or lower max_tokens")
        except IFPError as e:
            raise APIError(400, str(e), what) from None
        if max_tokens is None:
            max_tokens = self.settings.max_tokens if context is None else min(self.settings.max_tokens, context - len(tokens))
        return GenerationConfig(max_tokens=max_tokens, temp=ask.temperature, top_p=ask.top_p, seed=ask.seed)

    def _task_selection(self, engine: Engine, ask: Ask) -> Optional[Selection]:
        """The mask chosen from ``ask.task`` (per-task mode), or None."""
        if ask.task is None:
            return None
        tokens = prompt_tokens(self.loaded.tokenizer, ask.task, chat_template=ask.chat_template)
        try:
            check_context(tokens, 0, self.settings.limits.context, what="the task")
        except IFPError as e:
            raise APIError(400, str(e), "task") from None
        return Selection(engine.select(tokens).indices)


def _info(stats: GenerationStats, engine: Engine) -> dict:
    """The submodel that answered, for the ``ifp`` field of a response."""
    sub = stats.submodel
    return {
        "selector": engine.selector.name,
        "k": engine.k if sub is None else sub.k,
        "d_ff": engine.loaded.d_ff,
        "gathered": bool(sub and sub.gathered),
        "time_to_first_token": round(stats.time_to_first_token, 4),
    }
