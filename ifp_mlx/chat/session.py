"""A chat session: one conversation, its mask and its KV cache, and the settings that make them.

The mask rule is the conversation's (``ifp_mlx.engine.conversation``): chosen
from the first user turn, or from a task, and kept. The session passes the
conversation's mask to every later turn, so the mask stays even if the KV
store evicted the turns before (they are then processed again, under the same
mask). Whatever changes the mask (a new size or selector, a task, reselect)
empties the store, so it only ever holds this conversation.
"""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional


from ..engine.conversation import ConversationCache, reply
from ..engine.engine import Engine
from ..engine.prompts import chat_tokens, check_context, check_length, context_length, prompt_tokens
from ..engine.stats import GenerationConfig, GenerationStats
from ..errors import IFPError
from ..files import atomic_file
from ..model.load import LoadedModel
from ..select.base import Selection
from ..select.choose import choose

CONTEXT_HINT = "; /reset starts a new conversation, or lower --max-tokens"
LENGTH_HINT = "; send a shorter one"


@dataclass
class Settings:
    """What the user chose on the command line, and changed since with commands."""

    selector: Optional[str] = None  # None: choose()'s default for the size options
    keep: Optional[float] = None
    k: Optional[int] = None
    mask: Optional[Path] = None
    predictor: Optional[Path] = None
    seed: Optional[int] = None
    task: Optional[str] = None
    system: Optional[str] = None
    low_memory: bool = False
    generation: GenerationConfig = field(default_factory=GenerationConfig)


class ChatSession:
    def __init__(self, loaded: LoadedModel, settings: Settings):
        self.loaded = loaded
        self.settings = settings
        self.store = ConversationCache()
        self.engine = self._engine(settings.selector, settings.keep, settings.k)
        self.engine.warm_up()
        self.messages: list[dict] = []
        self.mask: Optional[Selection] = None  # the conversation's, once its first reply chose it
        self.mask_source = ""
        self.reselect = False  # the next reply chooses a new mask from the latest user turn
        self.last: Optional[GenerationStats] = None
        self.last_stopped = False
        self._task_mask: Optional[Selection] = None
        self.reset()

    # -- settings -------------------------------------------------------------

    def _engine(self, selector: Optional[str], keep: Optional[float], k: Optional[int]) -> Engine:
        """An engine from ``choose()``: the one rule for selector and size every command follows."""
        s = self.settings
        mask = s.mask if selector in (None, "static") else None
        predictor = s.predictor if selector in (None, "predictor") else None
        return Engine.for_choice(self.loaded, choose(self.loaded, selector, keep, k, mask, predictor, s.seed or 0))

    def _replace_engine(self, selector: Optional[str], keep: Optional[float], k: Optional[int]) -> None:
        """Switch to a new engine (settings change only if it builds); the next reply selects afresh."""
        self.engine = self._engine(selector, keep, k)
        self.engine.warm_up()
        self.settings.selector, self.settings.keep, self.settings.k = self.engine.selector.name, keep, k
        self._task_mask = None
        self._forget_mask()

    def set_keep(self, keep: float) -> None:
        """A new size with the same selector (a dense session gets the default pruning selector)."""
        name = self.engine.selector.name
        self._replace_engine(None if name == "dense" else name, keep, None)

    def set_selector(self, name: str) -> None:
        """Another selector at the same size (dense: every channel)."""
        s = self.settings
        self._replace_engine(name, None if name == "dense" else s.keep, None if name == "dense" else s.k)

    def set_task(self, task: Optional[str]) -> None:
        """Choose the mask from ``task`` for the rest of the conversation; None goes back to the first user turn."""
        mask = None if task is None else self._select_task(task)  # refused here, not at the next reply
        self.settings.task, self._task_mask = task, mask
        self._forget_mask()

    def ask_reselect(self) -> None:
        """The next reply chooses a new mask from the latest user turn (a task would override it: cleared)."""
        self.settings.task, self._task_mask = None, None
        self.reselect = True

    def reset(self) -> None:
        """A new conversation: the system message only, nothing cached; the settings stay."""
        system = self.settings.system
        self.messages = [{"role": "system", "content": system}] if system else []
        self.reselect = False
        self.last = None
        self._forget_mask()

    def _forget_mask(self) -> None:
        self.mask, self.mask_source = None, ""
        self.store.clear()

    def task_mask(self) -> Optional[Selection]:
        """The task's mask for the current engine, chosen once."""
        if self.settings.task is not None and self._task_mask is None:
            self._task_mask = self._select_task(self.settings.task)
        return self._task_mask

    def _select_task(self, task: str) -> Selection:
        if not task.strip():
            raise IFPError("the task is empty: give an instruction to choose the mask from")
        context = context_length(self.loaded.config)
        check_length(self.loaded.tokenizer, task, 0, context, what="the task")
        tokens = prompt_tokens(self.loaded.tokenizer, task, self.settings.system)
        check_context(tokens, 0, context, what="the task")
        return Selection(self.engine.select(tokens).indices)

    @property
    def next_mask_source(self) -> str:
        """Where the next reply's mask comes from."""
        if self.reselect:
            return "the latest user turn (reselect)"
        if self.mask is not None:
            return self.mask_source
        return "the task" if self.settings.task is not None else "the first user turn"

    # -- turns ----------------------------------------------------------------

    def ask(self, text: str) -> Iterator[str]:
        """The reply to a new user turn, streamed; checked before anything changes.

        The turn joins the conversation with whatever was generated, whole or
        stopped (the stream closed): closing the stream closes the engine's,
        which stores the KV the reply reached for the next turn.
        """
        if not text.strip():
            raise IFPError("the message is empty")
        max_tokens, context = self.settings.generation.max_tokens, context_length(self.loaded.config)
        check_length(self.loaded.tokenizer, text, max_tokens, context, what="the message", hint=LENGTH_HINT)
        messages = self.messages + [{"role": "user", "content": text}]
        tokens = chat_tokens(self.loaded.tokenizer, messages)
        check_context(tokens, max_tokens, context, what="the conversation", hint=CONTEXT_HINT)
        mask = self.mask or self.task_mask()
        return self._stream(messages, mask)

    def _stream(self, messages: list[dict], mask: Optional[Selection]) -> Iterator[str]:
        stats, pieces, source = GenerationStats(), [], self.next_mask_source
        reselect, self.reselect = self.reselect, False
        if reselect:
            self.store.clear()
        stream = reply(self.engine, self.store, messages, self.settings.generation, stats,
                       reselect=reselect, task=None if reselect else mask)
        done = False
        try:
            for piece in stream:
                pieces.append(piece)
                yield piece
            done = True
        finally:
            stream.close()
            if done or stats.token_ids:
                self.messages = messages + [{"role": "assistant", "content": "".join(pieces)}]
                self.mask, self.mask_source = Selection(stats.selection.indices), source
                self.last, self.last_stopped = stats, not done
            else:
                self.reselect = reselect  # nothing came of it: the turn is not kept, nor the request

    # -- saving ---------------------------------------------------------------

    @property
    def dense(self) -> bool:
        return self.engine.selector.name == "dense"

    def describe(self) -> str:
        e = self.engine
        return f"{self.loaded.path.name}: " + ("dense" if self.dense else f"{e.selector.name}, k {e.k}/{e.loaded.d_ff} per layer")

    def transcript(self) -> dict:
        """The conversation and the settings it was had with (``/save``)."""
        s, e = self.settings, self.engine
        settings = {
            "model": str(self.loaded.path.resolve()), "selector": e.selector.name, "k": e.k, "d_ff": e.loaded.d_ff,
            "keep": s.keep, "mask": _path(s.mask), "predictor": _path(s.predictor), "task": s.task,
            "mask_from": self.next_mask_source, "system": s.system, "low_memory": s.low_memory,
            "seed": s.seed, **asdict(s.generation),
        }
        return {"messages": self.messages, "settings": settings}

    def save(self, path: Path) -> Path:
        """Write the transcript as JSON, atomically (an interrupted save leaves the old file)."""
        path = path.expanduser()
        try:
            with atomic_file(path) as tmp:
                tmp.write_text(json.dumps(self.transcript(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
            raise IFPError(f"could not save to {path}: {getattr(e, 'strerror', None) or e}") from None
        return path


def _path(path: Optional[Path]) -> Optional[str]:
    return None if path is None else os.fspath(path)
