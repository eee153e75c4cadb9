"""The read-reply loop: prompt_toolkit in a terminal, plain lines from a pipe.

Every line is checked to be UTF-8 before it is used, and a line that is
refused (bytes that are not UTF-8, a message longer than the context) is
one error line: the conversation goes on. Ctrl+C at the prompt never quits
(a stray one would lose the conversation): it says how to.

Ctrl+C during a reply asks it to stop after the token being computed, so the
KV cache is never left half-written by an interrupt in the middle of a layer;
the partial reply stays in the conversation. A second Ctrl+C stops at once
and drops the cached KV (the next turn processes the conversation again).
"""

import os
import select
import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from ..errors import IFPError
from ..files import ifp_home
from ..text import check_utf8
from .commands import Quit, run_command
from .session import ChatSession
from .view import Terminal, stats_line

PROMPT = "> "
QUIT_HINT = "(to quit: /quit or Ctrl+D)"
PASTE_GAP = 0.01  # seconds: keys closer than this are one paste (typing is ten times slower)
PASTE_BATCH = 1 << 20  # keys: a longer paste goes in as several, so memory stays bounded while it arrives
HISTORY = "chat_history"  # under $IFP_HOME


def handle(session: ChatSession, line: str, term: Terminal, name: str = "the line") -> bool:
    """One line of input: a command, or a user turn and its reply. False: an IFPError was reported.

    ``line`` may hold bytes that were not UTF-8 as lone surrogates (how
    prompt_toolkit and a piped stdin hand them on); ``name`` is how an error names it.
    """
    try:
        line = check_utf8(line, name).strip()
        if not line:
            return True
        if line.startswith("/") and not line.startswith("//"):
            run_command(session, line, term)
        else:
            converse(session, line.removeprefix("/"), term)
    except IFPError as e:
        term.error(str(e))
        return False
    return True


def converse(session: ChatSession, text: str, term: Terminal) -> None:
    """Stream the reply to ``text``, stoppable with Ctrl+C, then its statistics line."""
    stream = session.ask(text)  # raises before any output when the turn cannot be had
    before, stopped, interrupted, shown = session.last, False, False, ""
    with stop_requests() as requested:
        try:
            for piece in stream:
                term.write(piece)
                shown = piece or shown
                if requested():
                    stopped = True
                    break
        except KeyboardInterrupt:  # the second Ctrl+C, anywhere in the engine
            stopped = interrupted = True
        finally:
            stream.close()
    if interrupted:  # the KV may be cut mid-layer: the next turn processes the conversation again
        session.store.clear()
    if not shown.endswith("\n"):
        term.write("\n")
    if session.last is not before:
        term.note(stats_line(session.last, stopped))
    elif interrupted:
        term.note("stopped before the first token: the message was not added")


@contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """While a reply streams: the first SIGINT is a request polled between tokens, the second interrupts."""
    requests: list[int] = []

    def on_interrupt(signum: int, frame) -> None:
        requests.append(signum)
        if len(requests) > 1:
            raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_interrupt)
    except ValueError:  # not the main thread: Ctrl+C interrupts at once, as Python does
        yield lambda: False
        return
    try:
        yield lambda: bool(requests)
    finally:
        signal.signal(signal.SIGINT, previous)


def run(session: ChatSession, term: Terminal) -> int:
    """The REPL until /quit, Ctrl+D or end of input; the exit status."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        return interactive(session, term)
    return piped(session, term)


def piped(session: ChatSession, term: Terminal) -> int:
    """Lines from a pipe or file, for scripts: no prompt, no line editing. Status 2 if a line was refused."""
    failed = False
    for number, line in enumerate(sys.stdin.buffer, 1):
        try:
            failed |= not handle(session, line.decode("utf-8", "surrogateescape"), term, f"line {number}")
        except Quit:
            break
    return 2 if failed else 0


def interactive(session: ChatSession, term: Terminal) -> int:
    """prompt_toolkit's line editing and history; Ctrl+C clears a typed line, and at an empty one says how to quit."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("c-c")
    def _(event) -> None:
        buffer = event.app.current_buffer
        if buffer.text:
            buffer.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt, style="class:aborting")

    prompt = PromptSession(history=history(), key_bindings=bindings, input=burst_input())
    term.note(f"{session.describe()} | /help for commands, Ctrl+D to quit")
    while True:
        try:
            line = prompt.prompt(PROMPT)
        except EOFError:
            return 0
        except KeyboardInterrupt:
            term.note(QUIT_HINT)
            continue
        try:
            handle(session, line, term)
        except Quit:
            return 0
        except KeyboardInterrupt:  # during a command (building an engine, say): it is dropped
            session.store.clear()
            term.note("interrupted")


def history():
    """The prompt history in ``$IFP_HOME/chat_history`` (private to the user), else in memory."""
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    path = ifp_home() / HISTORY
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600))
    except OSError:
        return InMemoryHistory()
    return FileHistory(str(path))


def burst_input():
    """The terminal's input, with the characters of a paste given as one paste however they arrive.

    A terminal without bracketed paste (or a script typing into one) sends a
    paste as keystrokes, and prompt_toolkit spends about a millisecond, a
    redraw of the whole line and a copy of it for undo on each: 100,000
    characters took a minute and gigabytes before the line could be refused.
    Input that keeps arriving within ``PASTE_GAP`` seconds is read as one
    batch, and its runs of characters go in as one paste: one insertion, one redraw.
    """
    from prompt_toolkit.input.vt100 import Vt100Input

    class BurstInput(Vt100Input):
        def read_keys(self) -> list:
            keys = super().read_keys()
            while 0 < len(keys) < PASTE_BATCH and select.select([self.fileno()], [], [], PASTE_GAP)[0]:
                keys += super().read_keys()
            return as_pastes(keys)

    return BurstInput(sys.stdin)


def as_pastes(keys: list) -> list:
    """The key presses with each run of two or more plain characters joined into one paste."""
    from prompt_toolkit.key_binding import KeyPress
    from prompt_toolkit.keys import Keys

    merged: list = []
    run: list[str] = []
    for key in keys + [None]:
        if key is not None and not isinstance(key.key, Keys) and key.key.isprintable():
            run.append(key.data)
            continue
        if len(run) > 1:
            merged.append(KeyPress(Keys.BracketedPaste, "".join(run)))
        elif run:
            merged.append(KeyPress(run[0], run[0]))
        run = []
        if key is not None:
            merged.append(key)
    return merged
