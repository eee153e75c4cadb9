"""ifp serve against hostile input: malformed bodies, foreign pages, stalled clients, unsupported fields.

Real `ifp serve` processes over a tiny random model (replies are noise; what
is tested is what the server accepts and how it refuses), driven by the
official openai client and by raw sockets for what no client library sends.
"""

import asyncio
import json
import selectors
import socket
import threading
from contextlib import contextmanager
from typing import Iterator

import openai
import pytest
from openai import OpenAI

from ifp_mlx.convert import ConvertOptions, convert
from ifp_mlx.serve.access import Access, parse_hosts
from ifp_mlx.serve.connections import ConnectionGuard, make_server
from serving import assert_error, get, post, raw, raw_exchange, read_response, running_server
from test_cli import assert_one_line_error, ifp
from tiny import write_hf_folder

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
TIMEOUT_S, MAX_CONNECTIONS = 3, 48
KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_hf_folder(root / "hf", "llama")
    convert(root / "hf", root / "model", ConvertOptions(dtype="float32", force=True))
    return root / "model"


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """A server with test-short deadlines and a low connection limit; yields (base, port, log path)."""
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    args = ["-m", str(tiny), "--request-timeout", str(TIMEOUT_S), "--max-connections", str(MAX_CONNECTIONS), "--max-tokens", "4",
            "--log-level", "warning"]
    with running_server(args, log) as (base, port):
        yield base, port, log


@pytest.fixture(scope="module")
def keyed(tiny, tmp_path_factory):
    """A server with an API key (from IFP_API_KEY), a CORS origin and one more Host name."""
    log = tmp_path_factory.mktemp("keyed") / "stderr.txt"
    args = ["-m", str(tiny), "--cors-origin", "http://localhost:3000", "--allow-host", "example.test", "--log-level", "warning"]
    with running_server(args, log, env={"IFP_API_KEY": KEY}) as (base, port):
        yield base, port


def chat(port: int, body: dict, **options) -> tuple[int, dict]:
    return post(port, CHAT, json.dumps({"messages": USER, "max_tokens": 2, **body}).encode(), **options)


def served(port: int) -> None:
    status, body = chat(port, {})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant", body


def test_deep_nesting_is_a_400_wherever_it_is(server):
    port = server[1]
    for depth in (40, 1000, 100_000):  # 100,000 deep is 200 KB: under the body limit
        nested = "[" * depth + "]" * depth
        for body in (f'{{"messages": {nested}}}', f'{{"metadata": {nested}}}', f'{{"messages": [{{"role": "user", "content": {nested}}}]}}'):
            status, answer = post(port, CHAT, body.encode())
            assert status == 400 and "nests deeper" in answer["error"]["message"], answer
    served(port)


def test_a_lone_surrogate_in_any_string_is_a_400(server):
    port = server[1]
    lone = "\\ud800"  # escaped in the JSON text: valid JSON, not valid text
    cases = {
        CHAT: [
            (f'{{"messages": [{{"role": "user", "content": "a{lone}"}}]}}', "messages"),
            (f'{{"messages": [{{"role": "system", "content": "{lone}"}}, {{"role": "user", "content": "hi"}}]}}', "messages"),
            (f'{{"messages": [{{"role": "user", "content": [{{"type": "text", "text": "{lone}"}}]}}]}}', "messages"),
            (f'{{"messages": [{{"role": "user", "content": "hi"}}], "task": "{lone}"}}', "task"),
            (f'{{"messages": [{{"role": "user", "content": "hi"}}], "stop": ["x", "{lone}"]}}', "stop"),
            (f'{{"messages": [{{"role": "user", "content": "hi"}}], "model": "{lone}"}}', "model"),
            (f'{{"messages": [{{"role": "user", "content": "hi"}}], "user": "\\udfff"}}', "user"),
            (f'{{"messages": [{{"role": "user", "content": "hi", "na{lone}me": 1}}]}}', "messages"),
        ],
        TEXT: [(f'{{"prompt": "{lone}"}}', "prompt"), (f'{{"prompt": ["{lone}"]}}', "prompt")],
    }
    for path, bodies in cases.items():
        for body, param in bodies:
            status, answer = post(port, path, body.encode())
            assert_error(status, answer, 400, param)
            assert "lone surrogate" in answer["error"]["message"]
    pair = '{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 2}'  # a valid pair: an emoji
    assert post(port, CHAT, pair.encode())[0] == 200


def test_numbers_constants_and_encodings_are_400s(server):
    port = server[1]
    cases = [
        ('"max_tokens": 1e400', "max_tokens"), ('"max_tokens": ' + "9" * 5000, None), ('"max_tokens": 1e10', "max_tokens"),
        ('"temperature": 1e999', "temperature"), ('"temperature": NaN', None), ('"top_p": -Infinity', None),
        ('"seed": 18446744073709551616', "seed"), ('"seed": -1', "seed"), ('"keep": Infinity', None), ('"keep": 1e-400', "keep"),
        ('"n": 1e400', "n"), ('"stream": 1', "stream"),
    ]
    for field, param in cases:
        assert_error(*post(port, CHAT, f'{{"messages": [{{"role": "user", "content": "hi"}}], {field}}}'.encode()), 400, param)
    for body in (b"\xff\xfe{}", b'{"messages": "\xc3\x28"}', b"", b"[]", b"null", b'"x"', b"{" * 10):
        assert_error(*post(port, CHAT, body), 400)
    served(port)


def test_fields_the_server_does_not_implement_are_refused_by_name(server):
    base, port = server[0], server[1]
    client = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    refused = [
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
        {"tool_choice": "auto"}, {"response_format": {"type": "json_object"}}, {"logprobs": True},
        {"top_logprobs": 3}, {"n": 2}, {"logit_bias": {"1": 5}}, {"frequency_penalty": 0.5},
        {"presence_penalty": -1}, {"modalities": ["text", "audio"]},
    ]
    for options in refused:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model, messages=USER, max_tokens=2, **options)
        (name,) = options
        assert e.value.body["param"] == name and name in e.value.body["message"]
    for options in ({"best_of": 2}, {"echo": True}, {"logprobs": 2}, {"suffix": "end"}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model, prompt="hi", max_tokens=2, **options)
        assert e.value.body["param"] == next(iter(options))
    neutral = {"n": 1, "logprobs": False, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
               "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "user": "me", "metadata": {"a": "b"}}
    assert chat(port, neutral)[0] == 200
    tool_call = [*USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}]
    assert_error(*post(port, CHAT, json.dumps({"messages": tool_call}).encode()), 400, "messages")


def test_only_json_bodies_are_accepted(server):
    port = server[1]
    body = json.dumps({"messages": USER, "max_tokens": 2}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "application/json; charset=latin-1", "application/jsonp", "text/json"):
        assert_error(*post(port, CHAT, body, content_type=content_type), 415)
    head = f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    assert_error(*raw(port, head, body), 415)  # no Content-Type at all
    for content_type in ("application/json", "Application/JSON; charset=UTF-8"):
        assert post(port, CHAT, body, content_type=content_type)[0] == 200


def test_only_the_servers_own_host_names_are_answered(server):
    port = server[1]
    for host in ("evil.test", f"evil.test:{port}", "127.0.0.1.nip.io", f"localhost.evil.test:{port}", "localhost:x", "[::1"):
        status, answer = chat(port, {}, host=host)
        assert status == 400 and answer["error"]["code"] == "invalid_host", answer
    for host in ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "localhost:2222"):
        assert chat(port, {}, host=host)[0] == 200, host  # any port: an SSH tunnel changes it
    status, answer = raw(port, "GET /health HTTP/1.0\r\n\r\n")  # HTTP/1.0 may leave Host out; it is refused
    assert status == 400 and answer["error"]["code"] == "invalid_host"
    preflight = f"OPTIONS {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://evil.test\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n"
    status, headers, _ = raw_exchange(port, preflight)
    assert status == 405 and not any(h.startswith("access-control") for h in headers)  # no CORS without --cors-origin


def test_the_api_key_cors_origins_and_extra_host_names(keyed):
    base, port = keyed
    client = OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    assert client.chat.completions.create(model=model, messages=USER, max_tokens=2).choices[0].message.role == "assistant"
    wrong = OpenAI(base_url=f"{base}/v1", api_key=KEY[:-1] + "x", max_retries=0, timeout=60)
    for call in (lambda: wrong.models.list(), lambda: wrong.chat.completions.create(model=model, messages=USER, max_tokens=2)):
        with pytest.raises(openai.AuthenticationError) as e:
            call()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    status, headers, answer = raw_exchange(port, "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert status == 401 and headers["www-authenticate"] == "Bearer" and answer["error"]["code"] == "invalid_api_key"
    assert get(f"{base}/health")["status"] == "ok"  # open, as load balancers probe it
    auth = f"Authorization: bearer {KEY}\r\n"
    assert chat(port, {}, host="example.test:443", extra=auth)[0] == 200
    assert chat(port, {}, host="other.test", extra=auth)[0] == 400

    def preflight(origin: str) -> tuple[int, dict]:
        head = (f"OPTIONS {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST\r\n"
                "Access-Control-Request-Headers: authorization, content-type\r\nConnection: close\r\n\r\n")
        status, headers, _ = raw_exchange(port, head)
        return status, headers

    status, headers = preflight("http://localhost:3000")
    assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
    status, headers = preflight("http://evil.test")
    assert status == 400 and "access-control-allow-origin" not in headers
    status, headers, _ = raw_exchange(port, "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://localhost:3000\r\n"
                                            f"Authorization: Bearer {KEY}\r\nConnection: close\r\n\r\n")
    assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"


def open_stalled(port: int, count: int) -> list[socket.socket]:
    """Connections that send part of a request and then nothing: half stop in the headers, half in the body."""
    body_head = f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    stalled = []
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(body_head.encode() if i % 2 else b"GET /health HTTP/1.1\r\nHost: 127.0")
        stalled.append(s)
    return stalled


def wait_closed(sockets: list[socket.socket], limit_s: float = 60) -> list[bytes]:
    """What each socket received until the server closed it (a bound, not a measurement: fails past ``limit_s``)."""
    received = {s: b"" for s in sockets}
    with selectors.DefaultSelector() as selector:
        for s in sockets:
            selector.register(s, selectors.EVENT_READ)
        while selector.get_map():
            ready = selector.select(limit_s)
            assert ready, f"{len(selector.get_map())} stalled connections still open after {limit_s} s"
            for key, _ in ready:
                try:
                    data = key.fileobj.recv(65536)
                except ConnectionResetError:
                    data = b""
                received[key.fileobj] += data
                if not data:
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
    return list(received.values())


def test_stalled_clients_are_dropped_and_never_lock_out_the_others(server):
    """250 clients that never finish their request, against --max-connections 48: a normal
    client is still served, every stalled one is closed (408) by the deadline or to make
    room, and the log says so in a few lines, not one per socket."""
    base, port, log = server
    health = get(f"{base}/health")
    before, model = health["connections"], health["model"]
    stalled = open_stalled(port, 250)
    client = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
    assert client.chat.completions.create(model=model, messages=USER, max_tokens=2).choices[0].message.role == "assistant"
    received = wait_closed(stalled)
    assert all(b" 408 " in r.split(b"\r\n")[0] for r in received if r)  # answered 408, or closed before a read
    after = get(f"{base}/health")["connections"]
    assert after["open"] <= 2  # this request's connection, and the openai client's kept-alive one
    assert (after["timeout"] - before["timeout"]) + (after["evicted"] - before["evicted"]) == 250
    assert after["timeout"] > before["timeout"] and after["evicted"] > before["evicted"]
    lines = [line for line in log.read_text().splitlines() if "closed" in line]
    assert 2 <= len(lines) <= 4, lines  # the first of each kind; the rest are summed up a minute later
    for _ in range(20):  # not HTTP at all: uvicorn's per-socket warning is counted, logged once
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"NOT HTTP\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 400")
    upgrade = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    for _ in range(20):  # uvicorn warns twice per request that asks for a WebSocket; counted, logged once
        assert raw(port, upgrade)[0] == 200
    text = log.read_text()
    assert text.count("not valid HTTP") == 1 and "Invalid HTTP request" not in text
    assert text.count("upgrade the connection") == 1 and "WebSocket library" not in text and "Unsupported upgrade" not in text
    after = get(f"{base}/health")["connections"]
    assert after["invalid"] - before["invalid"] == 20 and after["upgrade"] - before["upgrade"] == 20


async def holding_app(scope, receive, send):
    """An ASGI app that keeps each request until the test releases it (``gate``), but answers
    /quick at once and, for /flood, streams far more than any socket buffer holds (``flooded``
    is set when it ends)."""
    if scope["type"] == "lifespan":
        for reply in ("lifespan.startup.complete", "lifespan.shutdown.complete"):
            await receive()
            await send({"type": reply})
        return
    if scope["path"] == "/flood":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(1024):  # 64 MB; once the connection is cut off, each send returns at once
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
        holding_app.flooded.set()
        return await send({"type": "http.response.body", "body": b""})
    if scope["path"] != "/quick":
        holding_app.arrived.release()
        await holding_app.gate.wait()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


@contextmanager
def guarded_server(guard: ConnectionGuard) -> Iterator[tuple[int, asyncio.AbstractEventLoop]]:
    """``holding_app`` behind ``guard`` on uvicorn, in a thread; yields its port and event loop."""
    server = make_server(holding_app, "127.0.0.1", 0, guard, "warning")
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    loop = asyncio.new_event_loop()
    holding_app.arrived, holding_app.gate, holding_app.flooded = threading.Semaphore(0), asyncio.Event(), threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.serve(sockets=[listening]))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listening.getsockname()[1], loop
    finally:
        loop.call_soon_threadsafe(holding_app.gate.set)
        server.should_exit = True
        thread.join(30)
        loop.close()


def test_at_the_limit_with_every_connection_busy_a_new_one_gets_503_with_retry_after():
    """The same guard in front of an app that holds its requests: two connections being
    answered fill --max-connections 2, so a third is refused with 503 and Retry-After."""
    guard = ConnectionGuard(max_connections=2, request_timeout=30)
    with guarded_server(guard) as (port, loop):
        busy = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2)]
        for s in busy:
            s.sendall(b"GET /hold HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        for _ in busy:
            assert holding_app.arrived.acquire(timeout=30)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as third:
            status, headers, body = read_response(third)
        assert status == 503 and headers["retry-after"] == "1" and body["error"]["type"] == "server_error"
        assert guard.counts()["refused"] == 1
        loop.call_soon_threadsafe(holding_app.gate.set)
        assert [read_response(s)[0] for s in busy] == [200, 200]
        for s in busy:
            s.close()


def test_a_kept_alive_connection_makes_room_silently():
    """At the limit, a connection kept alive after its reply is closed to make room without
    an answer: a client reusing it must not read an error as its next reply."""
    guard = ConnectionGuard(max_connections=1, request_timeout=30)
    quick = b"GET /quick HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with guarded_server(guard) as (port, loop):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as kept:
            kept.sendall(quick)
            assert read_response(kept)[0] == 200
            with socket.create_connection(("127.0.0.1", port), timeout=30) as newcomer:
                newcomer.sendall(quick)
                assert read_response(newcomer)[0] == 200
                assert kept.recv(65536) == b""  # closed, with nothing sent
            assert guard.counts()["evicted"] == 1


def test_a_reply_the_client_stops_reading_is_cut_off():
    """A client that asks and never reads: once its reply has filled the socket buffers,
    the connection is cut off after the deadline, not held while it never reads."""
    guard = ConnectionGuard(max_connections=4, request_timeout=1)
    with guarded_server(guard) as (port, loop):
        with socket.socket() as reader:
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            reader.connect(("127.0.0.1", port))
            reader.sendall(b"GET /flood HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert holding_app.flooded.wait(60)  # the app's sends returned: the connection is gone
            assert guard.counts()["unread"] == 1 and guard.counts()["open"] == 0
            reader.settimeout(30)
            received = 0
            try:
                while data := reader.recv(1 << 20):
                    received += len(data)
            except ConnectionResetError:
                pass
            assert received < 64 << 20


def test_bad_access_flags_are_one_line_errors(tiny):
    model = str(tiny)
    assert_one_line_error(ifp("serve", "-m", model, "--api-key", " "), "--api-key (or IFP_API_KEY) is empty")
    assert_one_line_error(ifp("serve", "-m", model, "--allow-host", "a:b"), "--allow-host 'a:b' is not a host name")
    assert_one_line_error(ifp("serve", "-m", model, "--cors-origin", "evil.test"), "must be an origin")
    assert_one_line_error(ifp("serve", "-m", model, "--max-connections", "0"), "--max-connections must be at least 1")
    assert_one_line_error(ifp("serve", "-m", model, "--max-connections", "100000000"), "lower --max-connections")
    assert_one_line_error(ifp("serve", "-m", model, "--request-timeout", "0"), "--request-timeout must be in")


FIELDS = {  # the fields each endpoint reads (both share the sampling, stopping and pruning ones)
    CHAT: ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
           "stream_options", "n", "keep", "selector", "task", "reselect", "tools", "tool_choice", "response_format",
           "logprobs", "top_logprobs", "logit_bias", "frequency_penalty", "presence_penalty"),
    TEXT: ("prompt", "logprobs", "best_of", "echo", "suffix"),
}
VALUES = (None, True, False, 0, -1, 1, 2**63, 1.5, 1e308, "", "x", "\u0000", [], ["x"], {}, {"a": 1}, [{}])


def test_every_field_with_every_kind_of_value_is_answered_never_a_500(server):
    """Each field the server knows, and each message key, with a value of every JSON kind:
    an answer (200) or a JSON 4xx, never a 500, and the server keeps serving."""
    port = server[1]
    statuses = set()
    for path, base in ((CHAT, {"messages": USER}), (TEXT, {"prompt": "hi"})):
        for field in FIELDS[path]:
            for value in VALUES:
                status, answer = post(port, path, json.dumps({"max_tokens": 1, **base, field: value}).encode())
                assert status in (200, 400, 404), (path, field, value, answer)
                assert status == 200 or answer["error"]["message"], answer
                statuses.add(status)
    for key in ("role", "content"):
        for value in VALUES:
            message = {"role": "user", "content": "hi", key: value}
            status, answer = post(port, CHAT, json.dumps({"messages": [message], "max_tokens": 1}).encode())
            assert status in (200, 400), (key, value, answer)
    assert statuses == {200, 400, 404}
    served(port)


def test_which_host_names_each_binding_answers():
    loopback, wildcard, named = Access("127.0.0.1"), Access("0.0.0.0", ("box.lan",)), Access("box.lan")
    assert loopback.host_allowed("localhost:8080") and loopback.host_allowed("[::1]") and loopback.host_allowed("localhost.")
    assert not loopback.host_allowed("192.168.1.5:8080") and not loopback.host_allowed(None) and not loopback.host_allowed("")
    assert wildcard.host_allowed("192.168.1.5:8080") and wildcard.host_allowed("[fe80::1]:8080")  # an address is never rebound
    assert wildcard.host_allowed("BOX.LAN:8080") and not wildcard.host_allowed("evil.test")
    assert named.host_allowed("box.lan:1") and not named.host_allowed("10.0.0.1")
    assert Access("127.0.0.1", ("*",)).host_allowed("anything.test")
    assert parse_hosts(["Box.Lan:8080", "[::2]", "*"]) == ("box.lan", "::2", "*")
    with pytest.raises(ValueError):
        parse_hosts(["a b:c"])
