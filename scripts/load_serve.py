"""Load check of `ifp serve` on loopback: sequential and concurrent streams, and the conversation cache's effect.

Starts its own server (127.0.0.1, a free port) and drives it with the openai
client:
  1. ``--requests`` streamed chat requests one after another (each a new
     conversation, so each is a fresh selection and gather);
  2. ``--concurrent`` streamed requests at once (they queue: one generation at a time);
  3. ``--chats`` 5-turn chats, time to first token per turn, against this
     server and against a second one started with ``--conversations 0`` (no
     KV kept across turns). Greedy decoding, so both must write the same replies.
Every count and wait is bounded; any error fails the run.

    python scripts/load_serve.py --model smollm2-135m --keep 0.5
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from openai import OpenAI

HOST = "127.0.0.1"
TURNS = [  # long-ish turns (about 100-150 tokens each), so a late turn's history is worth caching
    "I am planning a week-long trip to Japan in the spring with my sister. We like food markets, old temples, "
    "quiet gardens and long train rides, and we would rather avoid crowds where we can. We land in Tokyo on a "
    "Monday morning and fly home from Osaka the next Monday evening. Neither of us speaks Japanese, we are happy "
    "to walk ten or fifteen kilometres a day, and we would like one night somewhere in the mountains. Where should "
    "we start, and what should we book before we leave?",
    "Good. Which cities and towns would you put on a route for those seven days, and how many nights should we "
    "stay in each? We would rather have fewer hotel changes and more time in each place, even if that means "
    "skipping a famous sight or two. Please also say which day trips are easy from each base.",
    "How should we move between those places? Is a rail pass worth it for that route, or are single tickets "
    "cheaper now? We have heard that seat reservations matter in the spring holidays; should we reserve seats, "
    "and how early? Also, how do local buses and the smaller private railways work for visitors?",
    "What food should we try in each place, and which markets open early enough for breakfast? My sister does "
    "not eat pork, and I cannot eat very spicy food. We would also like one special dinner during the week that "
    "is worth booking ahead: what kind of place would you suggest, and how far ahead should we book it?",
    "Finally, give us a short packing list for spring weather in both the cities and the mountains, tell us how "
    "much cash to carry compared with cards, and teach us one or two polite phrases in Japanese worth learning "
    "for shops, trains and restaurants.",
]


@dataclass
class Stream:
    ttft: float  # seconds from sending to the first content chunk
    total: float
    text: str
    cached: int
    prompt: int
    server_ttft: float  # the server's own time to first token (its ``ifp`` field): no HTTP, no client


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path
    client: OpenAI = field(init=False)
    model: str = field(init=False)

    def __post_init__(self) -> None:
        self.client = OpenAI(base_url=f"http://{HOST}:{self.port}/v1", api_key="x", max_retries=0, timeout=120)
        self.model = self.client.models.list().data[0].id


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start(model: str, keep: float, extra: list[str], log: Path, wait: float = 300) -> Server:
    """An `ifp serve` process, once it answers /health."""
    port = free_port()
    args = [sys.executable, "-m", "ifp_mlx.cli.main", "serve", "-m", model, "--keep", str(keep), "--host", HOST, "--port", str(port), *extra]
    with open(log, "w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=out, env=os.environ.copy())
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"ifp serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=5):
                return Server(process, port, log)
        except OSError:
            time.sleep(0.5)
    process.kill()
    sys.exit(f"ifp serve did not answer /health within {wait:.0f} s")


def stop(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(30)
    except subprocess.TimeoutExpired:
        server.process.kill()


def stream(server: Server, messages: list[dict], max_tokens: int) -> Stream:
    """One streamed chat request, timed on the client."""
    start = time.perf_counter()
    ttft, parts, cached, prompt, server_ttft = None, [], 0, 0, 0.0
    chunks = server.client.chat.completions.create(
        model=server.model, messages=messages, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
    )
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft if ttft is not None else time.perf_counter() - start
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            cached, prompt = chunk.usage.prompt_tokens_details.cached_tokens, chunk.usage.prompt_tokens
            server_ttft = chunk.model_extra["ifp"]["time_to_first_token"]
    total = time.perf_counter() - start
    return Stream(ttft if ttft is not None else total, total, "".join(parts), cached, prompt, server_ttft)


def sequential(server: Server, count: int, max_tokens: int, deadline: float) -> list[Stream]:
    results = []
    for i in range(count):
        if time.monotonic() > deadline:
            sys.exit(f"sequential: {i} of {count} requests done when the time bound ran out")
        results.append(stream(server, [{"role": "user", "content": f"Question {i}: what is {i} plus {i + 1}?"}], max_tokens))
    return results


def concurrent(server: Server, count: int, max_tokens: int) -> tuple[list[Stream], float]:
    results: list[Stream] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results.append(stream(server, [{"role": "user", "content": f"Name {i + 2} fruits."}], max_tokens))
        except BaseException as e:  # reported below: any error fails the run
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    if errors or len(results) != count:
        sys.exit(f"concurrent: {len(results)} of {count} streams finished; errors: {errors!r}")
    return results, time.perf_counter() - start


def chat(server: Server, max_tokens: int, number: int) -> list[Stream]:
    """The 5-turn chat, each turn's reply carried into the next (``number`` makes each chat's opening its own)."""
    messages, turns = [], []
    for i, content in enumerate(TURNS):
        messages.append({"role": "user", "content": f"(Chat {number}.) {content}" if i == 0 else content})
        turns.append(stream(server, messages, max_tokens))
        messages.append({"role": "assistant", "content": turns[-1].text})
    return turns


def median(turns: list[Stream], name: str) -> float:
    return statistics.median(getattr(t, name) for t in turns)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def summary(name: str, results: list[Stream], wall: float) -> str:
    ttfts = sorted(r.ttft for r in results)
    p95 = ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]
    return (
        f"| {name} | {len(results)} | 0 | {wall:.1f} | {ms(statistics.median(ttfts))} | {ms(p95)} | {ms(ttfts[-1])} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", default="smollm2-135m")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--requests", type=int, default=200, choices=range(0, 1001), metavar="N (0..1000)", help="sequential requests (0: skip)")
    parser.add_argument("--concurrent", type=int, default=8, choices=range(0, 33), metavar="N (0..32)", help="concurrent requests (0: skip)")
    parser.add_argument("--chats", type=int, default=3, choices=range(1, 11), metavar="N (1..10)", help="5-turn chats per server (medians)")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per request in the sequential and concurrent phases")
    parser.add_argument("--chat-tokens", type=int, default=32, help="tokens per reply in the 5-turn chat")
    parser.add_argument("--minutes", type=float, default=30, help="time bound of the sequential phase")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp"), help="where the servers' logs go")
    args = parser.parse_args()

    server = start(args.model, args.keep, [], args.log_dir / "load_serve.log")
    try:
        stream(server, [{"role": "user", "content": "Hello!"}], 2)  # first-request costs out of the figures
        t = time.perf_counter()
        seq = sequential(server, args.requests, args.max_tokens, time.monotonic() + args.minutes * 60) if args.requests else []
        seq_wall = time.perf_counter() - t
        conc, conc_wall = concurrent(server, args.concurrent, args.max_tokens) if args.concurrent else ([], 0.0)
        cached_chats = [chat(server, args.chat_tokens, n) for n in range(args.chats)]
    finally:
        stop(server)
    server = start(args.model, args.keep, ["--conversations", "0"], args.log_dir / "load_serve_nocache.log")
    try:
        stream(server, [{"role": "user", "content": "Hello!"}], 2)
        fresh_chats = [chat(server, args.chat_tokens, n) for n in range(args.chats)]
    finally:
        stop(server)
    if [[t.text for t in c] for c in cached_chats] != [[t.text for t in c] for c in fresh_chats]:
        sys.exit("the 5-turn chats differ with and without the conversation cache")

    print(f"model {server.model}, keep {args.keep}")
    if seq or conc:
        print(f"\nstreamed chat requests, {args.max_tokens} tokens each, every one a new conversation\n")
        print("| run | requests | errors | wall s | ttft p50 ms | ttft p95 ms | ttft max ms |")
        print("|---|---|---|---|---|---|---|")
    if seq:
        print(summary("sequential", seq, seq_wall))
    if conc:
        print(summary(f"{args.concurrent} concurrent", conc, conc_wall))
    print(f"\n5-turn chat, {args.chat_tokens} tokens per reply: time to first token in ms by turn, median of {args.chats} chats")
    print("(client: from sending the request to the first streamed text; server: the server's own, in its ifp field)\n")
    print("| turn | prompt tokens | cached | with cache: client | server | without (--conversations 0): client | server |")
    print("|---|---|---|---|---|---|---|")
    for i in range(len(TURNS)):
        with_cache, without = [c[i] for c in cached_chats], [c[i] for c in fresh_chats]
        print(
            f"| {i + 1} | {median(with_cache, 'prompt'):.0f} | {median(with_cache, 'cached'):.0f} "
            f"| {ms(median(with_cache, 'ttft'))} | {ms(median(with_cache, 'server_ttft'))} "
            f"| {ms(median(without, 'ttft'))} | {ms(median(without, 'server_ttft'))} |"
        )


if __name__ == "__main__":
    main()
