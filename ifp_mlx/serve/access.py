"""Who may use the server: the Host names it answers to, an optional API key, optional CORS origins.

A page open in the user's browser can send requests to a server on
loopback. Three things keep it out: the ``Host`` header must be a name the
server is bound to (a DNS-rebinding page sends its own name), a POST must be
``application/json`` (which a cross-site page can only send after a CORS
preflight, answered only for ``--cors-origin``), and with ``--api-key``
every route but ``/health`` needs ``Authorization: Bearer <key>``.
"""

import hmac
import ipaddress
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from .protocol import APIError
from .responses import error_response

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
OPEN_PATHS = ("/health",)  # answered without the API key, as llama-server and vLLM answer theirs


@dataclass(frozen=True)
class Access:
    """The server's access flags: Host names beyond its own, its API key, its CORS origins."""

    bound: str = "127.0.0.1"  # --host
    allowed_hosts: tuple[str, ...] = ()  # --allow-host ("*": any)
    api_key: Optional[str] = None  # --api-key (or IFP_API_KEY)
    cors_origins: tuple[str, ...] = ()  # --cors-origin

    def host_allowed(self, header: Optional[str]) -> bool:
        """Whether the ``Host`` header names this server (any port: a tunnel or a proxy may change it)."""
        if "*" in self.allowed_hosts:
            return True
        name = host_name(header or "")
        if name is None:
            return False
        names = {*LOOPBACK_NAMES, *(n.lower().strip("[]") for n in self.allowed_hosts)}
        if self.bound in WILDCARD_HOSTS:
            return name in names or is_ip(name)  # an address in Host is never a rebound name
        return name in names or name == self.bound.lower().strip("[]")


def host_name(header: str) -> Optional[str]:
    """The name in a ``Host`` header, lower case, without port or brackets; None when malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        name, closed, rest = header[1:].partition("]")
        if not closed:
            return None
    else:
        name, _, port = header.partition(":")
        rest = f":{port}" if _ else ""
    if not name or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
        return None
    return name.rstrip(".")


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class CheckHost:
    """Refuses (400) a request whose ``Host`` header is not a name of this server: DNS rebinding."""

    def __init__(self, app: ASGIApp, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = header(scope, b"host")
            if not self.access.host_allowed(host):
                shown = "no Host header" if host is None else f"the Host {host[:100]!r}"
                error = APIError(
                    400, f"{shown} is not a name this server answers to; start it with --allow-host NAME to add one",
                    code="invalid_host",
                )
                return await error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


class CheckKey:
    """Refuses (401) a request without the server's API key as a Bearer token (compared in constant time)."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not self.authorized(scope):
            error = APIError(401, "this server needs an API key: send Authorization: Bearer <key>", code="invalid_api_key")
            error.headers["WWW-Authenticate"] = "Bearer"
            return await error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)

    def authorized(self, scope: Scope) -> bool:
        scheme, _, token = (header_bytes(scope, b"authorization") or b"").strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


def header_bytes(scope: Scope, name: bytes) -> Optional[bytes]:
    return next((value for key, value in scope["headers"] if key == name), None)


def header(scope: Scope, name: bytes) -> Optional[str]:
    value = header_bytes(scope, name)
    return None if value is None else value.decode("latin-1")


def add_access_checks(app: Any, access: Access) -> None:
    """Wrap ``app``: the Host check outermost, then CORS (opt-in), then the API key."""
    from starlette.middleware.cors import CORSMiddleware

    if access.api_key:
        app.add_middleware(CheckKey, key=access.api_key)
    if access.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(access.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"], max_age=600,
        )
    app.add_middleware(CheckHost, access=access)


def parse_hosts(names: Sequence[str]) -> tuple[str, ...]:
    """--allow-host values as names (a port given with one is ignored: any port is accepted)."""
    hosts = []
    for name in names:
        parsed = "*" if name == "*" else host_name(name)
        if parsed is None:
            raise ValueError(f"--allow-host {name!r} is not a host name")
        hosts.append(parsed)
    return tuple(hosts)
