"""Connections the server holds: each has a deadline to send its request, and there are at most so many.

uvicorn waits forever for a client to finish its headers or its body, and
accepts connections until the process runs out of file descriptors, after
which every client is refused and asyncio logs each failed accept. Here,
on uvicorn's h11 protocol:

- a connection that is waiting for a request (just opened, idle between two
  requests, or part-way through headers or body) must have the whole request
  in within ``request_timeout`` seconds of starting to wait, or it is
  answered 408 and closed;
- at most ``max_connections`` are open: one more closes the connection that
  has waited longest for its request (a stalled client; one kept alive
  after a reply, with nothing of its next request sent, only when there is
  no other; never one whose request is being answered), or, when every one
  is busy answering, is answered 503 with ``Retry-After``;
- a reply the client stops reading (its writes paused) for ``request_timeout``
  seconds is cut off: otherwise a client that asks and never reads holds its
  connection for good;
- these events, and uvicorn's own per-socket warnings, are logged once and
  then summed up once a minute, so a flood cannot grow the log.
"""

import asyncio
import json
import logging
import resource
from collections import Counter
from http import HTTPStatus
from typing import Any, Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("ifp.serve")
SUMMARY_SECONDS = 60.0  # a repeated event is logged once, then counted and summed up this often
RESERVED_FDS = 128  # file descriptors kept for the process itself (model files, logs, the listening socket)
RETRY_AFTER = "1"  # seconds a client refused at the connection limit should wait

EVENTS = {
    "timeout": "closed a connection that sent no whole request within {timeout:g} s",
    "evicted": "closed the connection that had waited longest for its request: {limit} connections were open",
    "refused": "refused a connection with 503: {limit} connections were open, each being answered",
    "unread": "cut off a reply its client had not read for {timeout:g} s",
    "invalid": "answered 400 to a request that was not valid HTTP",
    "upgrade": "answered a request that asked to upgrade the connection (to a WebSocket) as plain HTTP",
}
# uvicorn's per-request warnings, by how they begin, counted as the guard's events instead (None: the
# second line of the one before, dropped)
UVICORN_WARNINGS = (
    ("Invalid HTTP request received.", "invalid"),
    ("Unsupported upgrade request.", "upgrade"),
    ("No supported WebSocket library detected.", None),
)


class ConnectionGuard:
    """The open connections, which of them wait for a request, and the counts of those dropped."""

    def __init__(self, max_connections: int, request_timeout: float):
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.open: set["GuardedH11Protocol"] = set()
        # connections waiting for a request, the longest waiting first (dicts keep insertion order):
        self.waiting: dict["GuardedH11Protocol", None] = {}  # ... part-way through one, or never sent one
        self.kept: dict["GuardedH11Protocol", None] = {}  # ... kept alive after a reply, nothing sent since
        self.dropped: Counter = Counter()  # every event since the start, by kind (for /health)
        self._unlogged: Counter = Counter()  # events since each kind's last log line
        self._summaries: dict[str, asyncio.TimerHandle] = {}

    def admit(self, conn: "GuardedH11Protocol") -> bool:
        """Make room for ``conn``; False when every open connection is busy answering."""
        if len(self.open) >= self.max_connections:
            oldest = next(iter(self.waiting), None) or next(iter(self.kept), None)
            if oldest is None:
                self.note("refused")
                return False
            self.forget(oldest)
            self.note("evicted")
            oldest.drop(408, "the server closed this connection to make room: it had sent no whole request")
        self.open.add(conn)
        return True

    def place(self, conn: "GuardedH11Protocol", receiving: bool, kept: bool) -> None:
        """File ``conn`` as waiting, kept alive or busy; a connection keeps its place while it stays put."""
        target = (self.kept if kept else self.waiting) if receiving else None
        for bucket in (self.waiting, self.kept):
            if bucket is not target:
                bucket.pop(conn, None)
        if target is not None and conn not in target:
            target[conn] = None

    def forget(self, conn: "GuardedH11Protocol") -> None:
        self.open.discard(conn)
        self.place(conn, False, False)

    def note(self, kind: str) -> None:
        """Count one event; log it if it is the first of its kind in SUMMARY_SECONDS, else sum it up later."""
        self.dropped[kind] += 1
        if kind in self._summaries:
            self._unlogged[kind] += 1
            return
        log.warning("%s (more are summed up every %g s)", self._describe(kind), SUMMARY_SECONDS)
        self._schedule(kind)

    def flush(self) -> None:
        """Log what is counted and not yet logged (at shutdown)."""
        for kind in list(self._summaries):
            self._summaries.pop(kind).cancel()
            self._summarize(kind)

    def _schedule(self, kind: str) -> None:
        self._summaries[kind] = asyncio.get_running_loop().call_later(SUMMARY_SECONDS, self._summary, kind)

    def _summary(self, kind: str) -> None:
        del self._summaries[kind]
        if self._summarize(kind):
            self._schedule(kind)

    def _summarize(self, kind: str) -> bool:
        count = self._unlogged.pop(kind, 0)
        if count:
            log.warning("%s: %d more times since the last line about it", self._describe(kind), count)
        return bool(count)

    def _describe(self, kind: str) -> str:
        return EVENTS[kind].format(timeout=self.request_timeout, limit=self.max_connections)

    def counts(self) -> dict:
        """What /health shows: connections open now, and those dropped since the start."""
        return {"open": len(self.open), **{kind: self.dropped[kind] for kind in EVENTS}}


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol under a :class:`ConnectionGuard` (set on a subclass by :func:`protocol_for`)."""

    guard: ConnectionGuard

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: Optional[asyncio.TimerHandle] = None
        self._unread: Optional[asyncio.TimerHandle] = None  # set while the client does not read the reply
        self._kept = False  # a reply was sent and nothing of the next request has come
        if not self.guard.admit(self):
            self.drop(503, f"the server has {self.guard.max_connections} connections open, each being answered; retry later")
            return
        self._track()

    def data_received(self, data: bytes) -> None:
        self._kept = False
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._kept = self.conn.their_state is h11.IDLE
        self._track()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._unread is None:
            self._unread = self.loop.call_later(self.guard.request_timeout, self._cut_off)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._unread is not None:
            self._unread.cancel()
            self._unread = None

    def _cut_off(self) -> None:
        self._unread = None
        self.guard.forget(self)
        self.guard.note("unread")
        self.transport.abort()  # close() would wait to send what the client is not reading

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._stop_deadline()
        if self._unread is not None:
            self._unread.cancel()
        self.guard.forget(self)
        super().connection_lost(exc)

    def _track(self) -> None:
        """Start the deadline when the connection begins to wait for a request; stop it once one is in."""
        if self.transport.is_closing() or self not in self.guard.open:
            return
        receiving = self.conn.their_state in (h11.IDLE, h11.SEND_BODY)
        if receiving and self._deadline is None:
            self._deadline = self.loop.call_later(self.guard.request_timeout, self._expired)
        elif not receiving and self._deadline is not None:
            self._stop_deadline()
        self.guard.place(self, receiving, self._kept)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.guard.place(self, False, False)

    def _expired(self) -> None:
        self._deadline = None
        self.guard.forget(self)
        self.guard.note("timeout")
        self.drop(408, f"the request did not arrive whole within {self.guard.request_timeout:g} s")

    def drop(self, status: int, message: str) -> None:
        """Answer ``status`` with a JSON error and close the connection.

        No answer when a reply has begun (it is cut short), nor on a connection
        kept alive with nothing of a next request sent: it closes silently, as
        on its keep-alive timeout, so a client reusing it at that moment never
        takes the error for its next request's answer.
        """
        self._stop_deadline()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        answering = cycle is not None and cycle.response_started and not cycle.response_complete
        if cycle is not None and not cycle.response_started:
            cycle.disconnected = True  # the handler waiting for the body sees a disconnect, and sends nothing
            cycle.message_event.set()
        if not answering and not self._kept:
            self.transport.write(raw_response(status, message))
        self.transport.close()


def raw_response(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response with OpenAI's error body, written outside h11 (the connection then closes)."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None}}).encode()
    retry = f"retry-after: {RETRY_AFTER}\r\n" if status == 503 else ""
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{retry}connection: close\r\n\r\n"
    )
    return head.encode() + body


def protocol_for(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn builds each connection with, bound to ``guard``."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})


class CountUvicornWarnings(logging.Filter):
    """Turns uvicorn's per-socket warnings into the guard's counted events."""

    def __init__(self, guard: ConnectionGuard):
        super().__init__()
        self.guard = guard

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for start, kind in UVICORN_WARNINGS:
            if message.startswith(start):
                if kind is not None:
                    self.guard.note(kind)
                return False
        return True


def check_descriptors(max_connections: int) -> Optional[str]:
    """Raise this process's file-descriptor limit to fit the connections; the problem, if it cannot."""
    need = max_connections + RESERVED_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard == resource.RLIM_INFINITY or hard >= need:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        else:
            return (
                f"--max-connections {max_connections} needs {need} file descriptors, "
                f"and this process may open at most {hard} (ulimit -Hn): lower --max-connections"
            )
    return None


def make_server(app: Any, host: str, port: int, guard: ConnectionGuard, log_level: str) -> Any:
    """A uvicorn server of ``app`` whose connections ``guard`` bounds (run it with ``.run()``)."""
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=protocol_for(guard),
        timeout_graceful_shutdown=5, ws="none",
    )
    server = uvicorn.Server(config)
    logging.getLogger("uvicorn.error").addFilter(CountUvicornWarnings(guard))
    return server
