"""`ifp chat` as a user runs it: the real REPL in a pseudo-terminal (pexpect), and piped.

The terminal's output is read with its escape sequences removed, so the tests
match what a user sees, not how prompt_toolkit happens to draw it.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

TIMEOUT = 120  # seconds: a loaded CPU generates a few tokens a second
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[=>]|[\x08\r]")
STATS = re.compile(r"(\d+) tok [\d.]+ tok/s( \(stopped\))? \| ttft \d+ ms \(select \d+, gather \d+, prefill \d+, first token \d+\) "
                   r"\| prompt (\d+) tok, (\d+) cached \| peak [\d.]+ GB \| \w+ k (\d+)/(\d+)")
PROMPT = r"\n>"  # the prompt at the start of a line (the reply or a statistics line ends before it)


class Chat:
    """The REPL in a pseudo-terminal, read as text without escape sequences."""

    def __init__(self, model: Path, home: Path, *options: str):
        env = dict(os.environ, IFP_HOME=str(home), TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")
        args = ["-m", "ifp_mlx.cli.main", "chat", "-m", str(model), "--keep", "0.5", *options]
        self.child = pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", dimensions=(24, 80), timeout=TIMEOUT)
        self.raw, self.pos = "", 0
        self.expect(PROMPT)

    @property
    def text(self) -> str:
        return ESCAPES.sub("", self.raw)

    def expect(self, pattern: str | re.Pattern, timeout: float = TIMEOUT) -> re.Match:
        """The next match of ``pattern`` in what the terminal shows, past the last match."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.compile(pattern).search(self.text, self.pos)
            if match:
                self.pos = match.end()
                return match
            left = deadline - time.monotonic()
            if left <= 0 or not self.child.isalive() and not self.read(0.1):
                raise AssertionError(f"no {pattern!r} in what the chat showed:\n{self.text[self.pos:][-3000:]}")
            self.read(min(left, 1.0))

    def read(self, timeout: float) -> str:
        try:
            chunk = self.child.read_nonblocking(65536, timeout=timeout)
        except (pexpect.TIMEOUT, pexpect.EOF):
            return ""
        self.raw += chunk
        return chunk

    def say(self, line: str) -> re.Match:
        """Type a line, wait for the reply's statistics line and the next prompt."""
        self.child.send(line + "\r")
        stats = self.expect(STATS)
        self.expect(PROMPT)
        return stats

    def command(self, line: str) -> str:
        """Type a command; what it showed before the next prompt."""
        self.child.send(line + "\r")
        start = self.expect(re.escape(line) + r"\n").end()  # the typed line as accepted
        match = self.expect(PROMPT)
        return self.text[start : match.start()]

    def exit_status(self) -> int:
        self.child.expect(pexpect.EOF, timeout=TIMEOUT)
        self.child.close()
        return self.child.exitstatus


@pytest.fixture
def chat(smollm2_dir, tmp_path):
    sessions = []

    def start(*options: str) -> Chat:
        sessions.append(Chat(smollm2_dir, tmp_path / "home", *options))
        return sessions[-1]

    yield start
    for session in sessions:
        session.child.terminate(force=True)


def test_turns_stream_and_the_second_reuses_the_first(chat):
    c = chat("--max-tokens", "6")
    first = c.say("What is the capital of France?")
    generated, stopped, prompt, cached, k, d_ff = first.groups()
    assert int(generated) >= 1 and not stopped and int(cached) == 0 and (k, d_ff) == ("768", "1536")
    reply = c.text[: first.start()].rsplit("France?", 1)[1].strip()
    assert reply  # the streamed reply, between the typed line and the statistics line
    second = c.say("And of Spain?")
    assert int(second.group(4)) > int(prompt)  # the first turn and its reply came from the cache
    c.child.sendcontrol("d")
    assert c.exit_status() == 0


def test_ctrl_c_stops_a_reply_and_the_conversation_goes_on(chat):
    c = chat("--max-tokens", "300")
    c.child.send("Count from one to one hundred, one number per line.\r")
    c.expect(r"per line\.\n")  # the typed line as accepted
    c.expect(r"\S")  # the first streamed text
    c.child.sendcontrol("c")
    stopped = c.expect(STATS, timeout=60)
    assert stopped.group(2) == " (stopped)" and int(stopped.group(1)) < 300
    c.expect(PROMPT)
    after = c.say("Thanks.")  # the stopped reply stayed in the conversation, its KV cached
    assert int(after.group(4)) > int(stopped.group(3))
    c.child.sendcontrol("c")  # at an empty prompt: says how to quit, and stays
    c.expect(r"to quit: /quit or Ctrl\+D")
    c.expect(PROMPT)
    c.child.sendcontrol("d")
    assert c.exit_status() == 0


def test_commands(chat, tmp_path):
    c = chat("--max-tokens", "4")
    first = c.say("Hello!")
    assert int(c.say("Tell me more.").group(4)) > 0
    assert c.command("/reset").count("new conversation") == 1
    assert c.say("Hello!").group(4) == "0"  # a new conversation: nothing cached
    picture = c.command("/mask").strip().splitlines()
    layers = [line for line in picture if re.match(r"\s*\d+ \|.*\| +768$", line)]
    assert len(layers) == 30 and all(len(line) <= 80 for line in picture)
    saved = tmp_path / "out" / "chat.json"
    assert "saved 2 messages" in c.command(f"/save {saved}")
    transcript = json.loads(saved.read_text())
    assert [m["role"] for m in transcript["messages"]] == ["user", "assistant"]
    assert transcript["settings"]["k"] == 768 and transcript["settings"]["max_tokens"] == 4
    bad = c.command("/frobnicate").strip().splitlines()
    assert len(bad) == 1 and "unknown command /frobnicate" in bad[0]
    bad = c.command("/keep lots").strip().splitlines()
    assert len(bad) == 1 and bad[0].startswith("error: /keep takes")
    assert "prompt" in c.command("/stats") and "/reselect" in c.command("/help")
    c.command("/keep 0.25")
    assert c.say("Hello!").group(5) == "384"  # the new size, a fresh mask
    assert first.group(5) == "768"
    c.child.sendcontrol("d")
    assert c.exit_status() == 0


def test_piped_stdin(smollm2_dir, tmp_path):
    lines = ["What is 2 + 2?", "/mask", "/nope", "And 3 + 3?", f"/save {tmp_path / 'c.json'}"]
    result = subprocess.run(
        [sys.executable, "-m", "ifp_mlx.cli.main", "chat", "-m", str(smollm2_dir), "--keep", "0.5", "--max-tokens", "4"],
        check=False, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=TIMEOUT * 2,
        env=dict(os.environ, IFP_HOME=str(tmp_path / "home")),
    )
    assert result.returncode == 2  # a line was refused (/nope); the rest still ran
    stats = [STATS.search(line) for line in result.stderr.splitlines() if STATS.search(line)]
    assert len(stats) == 2 and stats[0].group(4) == "0" and int(stats[1].group(4)) > 0
    assert "error: unknown command /nope" in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stdout.splitlines() if re.match(r"\s*\d+ \|", line)]) == 30
    assert len(json.loads((tmp_path / "c.json").read_text())["messages"]) == 4


def test_the_first_ctrl_c_asks_the_second_interrupts():
    from ifp_mlx.chat.repl import stop_requests

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), stop_requests() as requested:
        assert not requested()
        os.kill(os.getpid(), signal.SIGINT)
        assert requested()  # polled between tokens: the reply stops at a token boundary
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs between bytecodes
            time.sleep(0.001)
    assert signal.getsignal(signal.SIGINT) is before


def test_the_mask_picture_fits_80_columns_for_any_width():
    import numpy as np

    from ifp_mlx.chat.view import mask_picture

    rows = np.stack([np.arange(0, 1536, 2), np.arange(768)])  # every other channel; the first half
    legend, spread, front = mask_picture(rows, 1536)
    assert re.fullmatch(r"0 \|.{24}\| +768", spread) and set(spread.split("|")[1]) == {"▒"}  # half of each block
    assert front.split("|")[1] == "█" * 12 + " " * 12
    wide = mask_picture(np.sort(np.random.default_rng(0).permutation(14336)[:4096])[None].repeat(40, 0), 14336)
    assert len(wide) == 41 and all(len(line) <= 80 for line in wide) and re.match(r"cells of \d+ channels", wide[0])
