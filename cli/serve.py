"""`ifp serve`: an OpenAI-compatible HTTP server over one model (ifp_mlx.serve)."""

import ipaddress
import logging
from pathlib import Path
from typing import Optional

import typer

from ..errors import IFPError
from .app import app, err, resolve
from .generate import check_memory

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@app.command()
def serve(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model folder or named model (default smollm2-135m)"),
    keep: Optional[float] = typer.Option(None, "--keep", help="default fraction of FFN channels kept per layer, 0 < R <= 1 (a request's keep overrides it)"),
    selector: Optional[str] = typer.Option(None, "--selector", "-s", help="default selector: predictor | activations | static | dense | random (a request's selector overrides it)"),
    mask: Optional[Path] = typer.Option(None, "--mask", help="mask file for the static selector (from ifp calibrate / ifp masks --save); alone, static becomes the default"),
    predictor: Optional[Path] = typer.Option(None, "--predictor", help="predictor folder for the predictor selector (else the model's own or the shipped one)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (anything but loopback exposes the server: give it --api-key)"),
    port: int = typer.Option(8080, "--port", help="TCP port"),
    low_memory: bool = typer.Option(False, "--low-memory", help="keep the FFN bank on disk: read only the selected channels (pruning only)"),
    max_tokens: int = typer.Option(512, "--max-tokens", help="reply length for requests that give no max_tokens"),
    conversations: int = typer.Option(8, "--conversations", help="conversations whose KV cache is kept (0: none)"),
    cache_mb: int = typer.Option(1024, "--cache-mb", help="most MB of KV cache the kept conversations hold together"),
    submodels: int = typer.Option(4, "--submodels", help="gathered submodels kept per (selector, k)"),
    queue: int = typer.Option(32, "--queue", help="requests waiting or running at once; more get 503"),
    max_body_kb: int = typer.Option(1024, "--max-body-kb", help="largest request body in KB; larger gets 413"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="IFP_API_KEY", help="require Authorization: Bearer KEY on every route but /health (the environment variable keeps it out of ps)"),
    allow_host: Optional[list[str]] = typer.Option(None, "--allow-host", help="a Host name to answer beyond localhost, 127.0.0.1, [::1] and --host (repeatable; * for any, e.g. behind a proxy)"),
    cors_origin: Optional[list[str]] = typer.Option(None, "--cors-origin", help="a browser origin allowed to call the server, e.g. http://localhost:3000 (repeatable; * for any); none by default"),
    max_connections: int = typer.Option(128, "--max-connections", help="connections open at once; one more closes the one that has waited longest for its request, or gets 503 when all are busy"),
    request_timeout: float = typer.Option(30.0, "--request-timeout", help="seconds a connection has to send a whole request (headers and body) once it starts waiting for one (then 408 and closed), and the longest a reply may go unread"),
    log_level: str = typer.Option("info", "--log-level", help="log level: critical | error | warning | info (each reply's statistics) | debug"),
) -> None:
    """Serve the model over HTTP with OpenAI's chat and completions API; replies stream, one at a time.

    Example: ifp serve --model smollm2-135m --keep 0.5 --port 8080
    """
    from ..select.choose import SELECTORS

    if keep is not None and not 0 < keep <= 1:
        raise IFPError(f"--keep must be in (0, 1], got {keep}")
    if selector is not None and selector not in SELECTORS:
        raise IFPError(f"unknown selector {selector!r}: choose one of {', '.join(SELECTORS)}")
    if log_level not in LOG_LEVELS:
        raise IFPError(f"--log-level must be one of {' | '.join(LOG_LEVELS)}, got {log_level!r}")
    if not 0 < port < 65536:
        raise IFPError(f"--port must be in 1..65535, got {port}")
    if min(max_tokens, submodels, queue, max_body_kb, max_connections) < 1 or min(conversations, cache_mb) < 0:
        raise IFPError("--max-tokens, --submodels, --queue, --max-body-kb and --max-connections must be at least 1; --conversations and --cache-mb at least 0")
    access = access_flags(host, allow_host, api_key, cors_origin)
    if not 0 < request_timeout <= 3600:
        raise IFPError(f"--request-timeout must be in (0, 3600] seconds, got {request_timeout:g}")
    guard = connection_guard(max_connections, request_timeout)

    from ..engine.memory import kv_bytes
    from ..engine.prompts import context_length
    from ..model.load import read_config

    path = resolve(model)
    config = read_config(path)
    context = context_length(config)
    cache_bytes = cache_mb << 20
    held = (context or max_tokens) + cache_bytes // max(1, kv_bytes(config, 1))  # one full context and the kept conversations
    check_memory(path, selector, keep, None, mask, predictor, low_memory, held)

    from ..serve.app import create_app
    from ..serve.connections import make_server
    from ..serve.protocol import Limits
    from ..serve.worker import Settings, Worker

    limits = Limits(model_names(model, path), context, selector, keep, low_memory)
    settings = Settings(path, limits, max_tokens, conversations, cache_bytes, submodels, queue, mask, predictor)
    show_replies(log_level)
    worker = Worker(settings)
    worker.start()
    if not is_loopback(host) and not api_key:
        err.print(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", highlight=False)
    err.print(f"serving {limits.model_id!r} on http://{host}:{port}/v1", highlight=False)
    make_server(create_app(worker, max_body_kb << 10, access, guard), host, port, guard, log_level).run()


def access_flags(host: str, allow_host: Optional[list[str]], api_key: Optional[str], cors_origin: Optional[list[str]]):
    """The access flags checked, as the server's Access."""
    from ..serve.access import Access, parse_hosts

    if api_key is not None and not api_key.strip():
        raise IFPError("--api-key (or IFP_API_KEY) is empty: give a key, or leave it out")
    try:
        hosts = parse_hosts(allow_host or [])
    except ValueError as e:
        raise IFPError(str(e)) from None
    for origin in cors_origin or []:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise IFPError(f"--cors-origin {origin!r} must be an origin such as http://localhost:3000, or *")
    return Access(host.lower(), hosts, api_key, tuple(o.rstrip("/") for o in cors_origin or []))


def connection_guard(max_connections: int, request_timeout: float):
    """The bounds on connections, the file-descriptor limit raised to fit them."""
    from ..serve.connections import ConnectionGuard, check_descriptors

    problem = check_descriptors(max_connections)
    if problem is not None:
        raise IFPError(problem)
    return ConnectionGuard(max_connections, request_timeout)


def show_replies(level: str) -> None:
    """Each reply's statistics line on stderr, beside uvicorn's access log (at level info)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logger = logging.getLogger("ifp.serve")
    logger.addHandler(handler)
    logger.setLevel(level.upper())


def model_names(model: Optional[str], path: Path) -> tuple[str, ...]:
    """The id /v1/models lists (a named model's name, else the folder's), then the other names accepted."""
    given = model if model is not None else path.name
    served = given if not Path(given).expanduser().exists() else path.name
    return tuple(dict.fromkeys([served, given, str(path), str(path.resolve())]))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
