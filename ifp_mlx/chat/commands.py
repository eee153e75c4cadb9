"""The chat's slash commands: each a small function of (session, argument, terminal).

A command that cannot run (unknown, a bad argument, an IFPError from the
engine) says so in one line and the conversation goes on unchanged.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import IFPError
from ..select.choose import SELECTORS
from .session import ChatSession
from .view import Terminal, mask_picture, stats_report


class Quit(Exception):
    """``/quit``: leave the REPL."""


@dataclass
class Command:
    run: Callable[[ChatSession, str, Terminal], None]
    usage: str
    help: str


def help_(session: ChatSession, arg: str, term: Terminal) -> None:
    width = max(len(c.usage) for c in COMMANDS.values())
    for command in COMMANDS.values():
        term.show(f"{command.usage:<{width}}  {command.help}")
    term.show(f"{'//text':<{width}}  send text that starts with '/' (one '/' is dropped)")
    term.show("Ctrl+C stops a reply and keeps the conversation, or clears the line; Ctrl+D at an empty prompt quits.")


def reset(session: ChatSession, arg: str, term: Terminal) -> None:
    session.reset()
    term.note("new conversation (the settings stay)")


def keep(session: ChatSession, arg: str, term: Terminal) -> None:
    try:
        value = float(arg)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # nan and inf parse as floats, and would reach the engine
        raise IFPError(f"/keep takes a fraction of channels in (0, 1], e.g. /keep 0.5 (got {arg!r})")
    session.set_keep(value)
    term.note(switched(session))


def selector(session: ChatSession, arg: str, term: Terminal) -> None:
    if arg not in SELECTORS:
        raise IFPError(f"/selector takes one of {', '.join(SELECTORS)} (got {arg!r})")
    session.set_selector(arg)
    term.note(switched(session))


def switched(session: ChatSession) -> str:
    """What a new engine means for the conversation."""
    if session.dense:
        return f"{session.describe()}: every channel from the next reply"
    return f"{session.describe()}; the next reply chooses a new mask from {session.next_mask_source}"


def task(session: ChatSession, arg: str, term: Terminal) -> None:
    session.set_task(arg or None)
    if arg:
        term.note("the mask comes from this task for the rest of the conversation; the next reply reprocesses it")
    else:
        term.note("task cleared: the mask comes from the first user turn again (chosen at the next reply)")


def reselect(session: ChatSession, arg: str, term: Terminal) -> None:
    cleared = session.settings.task is not None
    session.ask_reselect()
    term.note("the next reply chooses a new mask from the latest user turn and reprocesses the earlier ones"
              + (" (task cleared)" if cleared else ""))


def stats(session: ChatSession, arg: str, term: Terminal) -> None:
    if session.last is None:
        raise IFPError("no reply yet in this conversation: /stats reports the last one")
    for line in stats_report(session.last, session.last_stopped):
        term.show(line)


def mask(session: ChatSession, arg: str, term: Terminal) -> None:
    selection = None if session.dense else session.mask or session.task_mask()
    if session.dense or selection is not None and selection.indices is None:
        term.show(f"{session.describe()}: every channel of every layer")
        return
    if selection is None:
        term.show(f"{session.describe()}; no mask yet: the next reply chooses one from {session.next_mask_source}")
        return
    source = session.mask_source if session.mask is not None else "the task"
    later = "; the next reply chooses a new one from the latest user turn" if session.reselect else ""
    term.show(f"{session.describe()}, chosen from {source}{later}")
    for line in mask_picture(np.array(selection.indices), session.loaded.d_ff):
        term.show(line)


def save(session: ChatSession, arg: str, term: Terminal) -> None:
    if not arg:
        raise IFPError("/save needs a file name, e.g. /save chat.json")
    path = session.save(Path(arg))
    term.note(f"saved {len(session.messages)} messages to {path}")


def quit_(session: ChatSession, arg: str, term: Terminal) -> None:
    raise Quit


COMMANDS = {
    "help": Command(help_, "/help", "this list"),
    "reset": Command(reset, "/reset", "a new conversation (clears the messages and the cache)"),
    "keep": Command(keep, "/keep R", "keep the share R of channels per layer, same selector"),
    "selector": Command(selector, "/selector S", "another selector: " + ", ".join(SELECTORS)),
    "task": Command(task, '/task "..."', "choose the mask from this instruction (/task alone: clear)"),
    "reselect": Command(reselect, "/reselect", "the next reply chooses a new mask from the latest turn"),
    "stats": Command(stats, "/stats", "the last reply's full statistics"),
    "mask": Command(mask, "/mask", "the channels this conversation keeps, per layer"),
    "save": Command(save, "/save FILE", "write the conversation and settings as JSON"),
    "quit": Command(quit_, "/quit", "leave (so does Ctrl+D at an empty prompt)"),
}
TAKES_ARGUMENT = {"keep", "selector", "task", "save"}


def run_command(session: ChatSession, line: str, term: Terminal) -> None:
    """Run one ``/command [argument]`` line; raises IFPError when it cannot, Quit for ``/quit``."""
    name, _, rest = line[1:].partition(" ")
    command = COMMANDS.get(name)
    if command is None:
        raise IFPError(f"unknown command /{name}: /help lists them")
    arg = unquote(rest.strip())
    if arg and name not in TAKES_ARGUMENT:
        raise IFPError(f"/{name} takes no argument (got {arg!r})")
    command.run(session, arg, term)


def unquote(text: str) -> str:
    """The argument without one pair of surrounding quotes (``/task "..."``); quotes inside stay."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text
