"""Hostile input typed into the real `ifp chat` REPL in a pseudo-terminal: bytes that are not
UTF-8, Ctrl+C at the prompt, a paste of 100,000 characters from a terminal without bracketed
paste. Each is refused (or answered) in one line and the conversation goes on.
"""

import json
import os
import threading

from test_chat import PROMPT, Chat, chat  # noqa: F401  (chat: the fixture that starts one)


def type_bytes(c: Chat, data: bytes) -> threading.Thread:
    """Write raw bytes to the terminal, from a thread so the chat's output is read meanwhile."""
    def write() -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(c.child.child_fd, view):]

    writer = threading.Thread(target=write)
    writer.start()
    return writer


def test_bytes_that_are_not_utf8_are_refused_and_the_chat_goes_on(chat, tmp_path):
    c = chat("--max-tokens", "4")
    type_bytes(c, b"Hi \xff there\r").join()
    c.expect(r"error: the line is not UTF-8 text \(byte 0xff at offset 3\)")
    c.expect(PROMPT)
    assert c.say("Hello!").group(4) == "0"
    saved = tmp_path / "chat.json"
    assert "saved 2 messages" in c.command(f"/save {saved}")
    assert json.loads(saved.read_text())["messages"][0]["content"] == "Hello!"
    c.child.sendcontrol("d")
    assert c.exit_status() == 0


def test_ctrl_c_at_an_empty_prompt_says_how_to_quit(chat):
    c = chat("--max-tokens", "4")
    c.child.sendcontrol("c")
    c.expect(r"\(to quit: /quit or Ctrl\+D\)")
    c.expect(PROMPT)
    c.child.send("some words")
    c.expect("some words")
    c.child.sendcontrol("c")  # with text typed: clears the line, says nothing
    assert "/reselect" in c.command("/help")
    assert "to quit" not in c.text[c.text.index("some words"):c.text.index("/help")]
    assert c.say("Hello!")  # the session is whole
    c.child.send("/quit\r")
    assert c.exit_status() == 0


def test_a_pasted_100000_characters_are_refused_and_the_conversation_goes_on(chat):
    """Keystrokes, not a bracketed paste: the chat reads them as one paste and refuses the line."""
    c = chat("--max-tokens", "4")
    first = c.say("What is the capital of France?")
    writer = type_bytes(c, b"hello world " * 8_333 + b"0123\r")
    refused = c.expect(r"error: the conversation is (\d+) tokens \+ 4 to generate = \d+, more than the model's "
                       r"context of 8192 tokens")
    writer.join()
    assert int(refused.group(1)) > 8192
    c.expect(PROMPT)
    after = c.say("And of Spain?")  # the first turn and its reply are still cached
    assert int(after.group(4)) > int(first.group(3))
    c.child.sendcontrol("d")
    assert c.exit_status() == 0

