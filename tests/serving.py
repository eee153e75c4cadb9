"""Helpers for the server's tests: start a real `ifp serve` process, talk to it over raw sockets."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

IFP = [sys.executable, "-m", "ifp_mlx.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, headers: Optional[dict] = None) -> dict:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@contextmanager
def running_server(args: list[str], log: Path, env: Optional[dict] = None) -> Iterator[tuple[str, int]]:
    """`ifp serve ARGS` on a free loopback port, its stderr in ``log``; yields (base URL, port).

    On leaving: SIGTERM, a clean exit, and no traceback in the log.
    """
    port = free_port()
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [*IFP, "serve", "--port", str(port), *args], env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL, stderr=stderr,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            pytest.fail(f"ifp serve exited with {process.returncode}: {log.read_text()}")
        try:
            if get(f"{base}/health")["status"] == "ok":
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("ifp serve did not answer /health within 180 s")
        time.sleep(0.5)
    try:
        yield base, port
    finally:
        process.terminate()
        try:
            assert process.wait(30) in (0, -15), log.read_text()  # uvicorn shuts down, then re-raises SIGTERM
        finally:
            if process.poll() is None:
                process.kill()
    assert "Traceback" not in log.read_text(), log.read_text()


def read_response(s: socket.socket) -> tuple[int, dict, Any]:
    """One whole response from ``s``: status, headers (lower-case names) and body (parsed when JSON)."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
        if b"\r\n\r\n" in data:
            head, _, rest = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            length = int(headers.get("content-length", 0))
            if len(rest) >= length:
                body = rest[:length]
                parsed = json.loads(body) if "json" in headers.get("content-type", "") else body.decode()
                return int(lines[0].split()[1]), headers, parsed
    raise AssertionError(f"no whole response: {data!r}")


def raw_exchange(port: int, head: str, body: bytes = b"") -> tuple[int, dict, Any]:
    """Send ``head`` and ``body`` as they are; the status, headers and JSON answer (the server may close early)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode("latin-1") + body)
        return read_response(s)


def raw(port: int, head: str, body: bytes = b"") -> tuple[int, dict]:
    status, _, answer = raw_exchange(port, head, body)
    return status, answer


def post(port: int, path: str, body: bytes, content_type: str = "application/json", host: str = "127.0.0.1", extra: str = "") -> tuple[int, dict]:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return raw(port, head, body)


def assert_error(status: int, body: dict, expected: int, param=None) -> None:
    assert status == expected, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"] and "type" in error and error["param"] == param
