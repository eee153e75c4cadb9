"""Requests as the server sees them: the JSON body checked field by field.

Every check here is pure Python and answers before a request waits for the
model, so a bad request costs nothing and the reply names the field
(OpenAI's ``{"error": {"message", "type", "param"}}``). Checks that need the
tokenizer (the prompt's length) run where the model is, in the worker.
"""

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ..select.choose import SELECTORS

ROLES = ("system", "user", "assistant")
MAX_STOPS = 16
MAX_DEPTH = 32  # nesting levels a body may have (the deepest a valid request needs is 4)
SURROGATE = re.compile("[\ud800-\udfff]")
# Fields OpenAI's (and mlx-lm's) clients send that this server does not implement, each with the
# values that ask nothing of it; any other value is refused rather than silently ignored.
UNSUPPORTED: dict[str, tuple] = {
    "n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",),
    "logprobs": (False, 0), "top_logprobs": (0,),
    "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "logit_bias": ({},), "frequency_penalty": (0,), "presence_penalty": (0,),
    "repetition_penalty": (1,), "top_k": (0, -1), "min_p": (0,),
    "audio": (), "modalities": (["text"],), "prediction": (), "web_search_options": (),
}


class APIError(Exception):
    """A request the server refuses, with the HTTP status and the field to blame."""

    def __init__(
        self, status: int, message: str, param: Optional[str] = None,
        type: str = "invalid_request_error", code: Optional[str] = None, headers: Optional[dict] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers: dict[str, str] = dict(headers or {})  # sent with the error (Retry-After, WWW-Authenticate)

    def body(self) -> dict:
        error = {"message": self.message, "type": self.type, "param": self.param}
        if self.code is not None:
            error["code"] = self.code
        return {"error": error}


@dataclass
class Limits:
    """What the server allows and assumes, from its flags and the model's config."""

    model_names: tuple[str, ...]  # the id /v1/models lists first, then the other names accepted for it
    context: Optional[int]  # the model's context in tokens (None: unknown, nothing checked)
    selector: Optional[str] = None  # the server's --selector
    keep: Optional[float] = None  # the server's --keep
    low_memory: bool = False

    @property
    def model_id(self) -> str:
        return self.model_names[0]


@dataclass
class Ask:
    """One generation a client asked for, checked, with the server's defaults filled in."""

    kind: str  # "chat" (messages through the chat template) or "text" (a raw prompt)
    messages: list[dict]
    max_tokens: Optional[int] = None  # None: as many as the server's default and the context allow
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    selector: Optional[str] = None
    keep: Optional[float] = None
    task: Optional[str] = None
    reselect: bool = False

    @property
    def chat_template(self) -> bool:
        return self.kind == "chat"


def parse_json(data: bytes) -> dict:
    """The body as a JSON object; 400 for anything else.

    NaN and Infinity are refused; so is nesting past MAX_DEPTH (Python's
    parser would raise RecursionError near 1,000) and a lone surrogate in any
    string, key or value (``"\\ud800"`` is valid JSON but not text: the
    tokenizer cannot encode it).
    """
    try:
        body = json.loads(data, parse_constant=_refuse_constant)
    except RecursionError:
        raise APIError(400, f"the request body nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    _check_text_and_depth(body)
    return body


def _check_text_and_depth(body: dict) -> None:
    """Every string in ``body`` valid Unicode and no value nested past MAX_DEPTH (iteratively: no recursion)."""
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"the request body nests deeper than {MAX_DEPTH} levels (at {path})", _field(path))
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            where = f"{path}[{key}]" if isinstance(key, int) else _member(path, key)
            for text in (key, item):
                if isinstance(text, str) and SURROGATE.search(text):
                    raise APIError(400, f"{where} holds a lone surrogate (\\ud800-\\udfff): it is not text", _field(where))
            if isinstance(item, (dict, list)):
                stack.append((item, where, depth + 1))


def _member(path: str, key: str) -> str:
    shown = key if key.isidentifier() and key.isascii() and len(key) <= 40 else ascii(key[:40])
    return f"{path}.{shown}" if path else shown


def _field(path: str) -> Optional[str]:
    """The top-level field a path is in (``messages`` for ``messages[0].content``)."""
    return re.split(r"[.\[]", path, maxsplit=1)[0] or None


def check_supported(body: dict) -> None:
    """400 naming the first field that asks for something this server does not do (yet)."""
    for name, neutral in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value not in neutral:
            shown = json.dumps(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise APIError(400, f"{name} is not supported by this server (got {shown}): leave it out", name)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_chat(body: dict, limits: Limits) -> Ask:
    """A ``/v1/chat/completions`` body as an Ask."""
    check_model(body, limits)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    return _options(body, Ask("chat", [_message(m, i) for i, m in enumerate(messages)]), limits)


def parse_completion(body: dict, limits: Limits) -> Ask:
    """A ``/v1/completions`` body as an Ask: the prompt is raw text, no chat template."""
    check_model(body, limits)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # the client libraries send one prompt as a list of one
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "prompt must be a non-empty string (one prompt per request)", "prompt")
    return _options(body, Ask("text", [{"role": "user", "content": prompt}]), limits)


def check_model(body: dict, limits: Limits) -> None:
    """The ``model`` field must name the served model (absent: the served model)."""
    model = body.get("model", limits.model_id)
    if not isinstance(model, str):
        raise APIError(400, "model must be a string", "model")
    if model not in limits.model_names:
        raise APIError(
            404, f"the model {model!r} is not served here; this server serves {limits.model_id!r}",
            "model", code="model_not_found",
        )


def _message(message: Any, index: int) -> dict:
    """One chat message as {role, content}, its content text (text parts joined)."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise APIError(400, f"{where} must be an object with role and content", "messages")
    role, content = message.get("role"), message.get("content")
    if message.get("tool_calls") not in (None, []):
        raise APIError(400, f"{where}.tool_calls: tool calls are not supported by this server", "messages")
    if role not in ROLES:
        raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)} (got {role!r})", "messages")
    if isinstance(content, list):  # OpenAI's content parts: only text ones mean anything to a text model
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise APIError(400, f"{where}.content parts must be {{type: text, text}} objects", "messages")
        content = "".join(p["text"] for p in content)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise APIError(400, f"{where}.content must be a string", "messages")
    return {"role": role, "content": content}


def _options(body: dict, ask: Ask, limits: Limits) -> Ask:
    """The sampling, stopping, streaming and pruning fields every endpoint shares."""
    check_supported(body)
    for name in ("max_tokens", "max_completion_tokens"):
        if body.get(name) is not None:
            ask.max_tokens = _integer(body, name, 1, limits.context, "the model's context")
    ask.temperature = _number(body, "temperature", 0.0, 0.0, None)
    ask.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, open_low=True)
    if body.get("seed") is not None:
        ask.seed = _integer(body, "seed", 0, 2**63 - 1, "2**63 - 1")
    ask.stop = _stops(body.get("stop"))
    ask.stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise APIError(400, "stream_options must be an object", "stream_options")
        ask.include_usage = _flag(options, "include_usage", "stream_options.include_usage")
    _pruning(body, ask, limits)
    return ask


def _pruning(body: dict, ask: Ask, limits: Limits) -> None:
    """ifp's own fields: keep, selector, task, reselect (the server's flags fill the gaps)."""
    selector = body.get("selector")
    if selector is not None and selector not in SELECTORS:
        raise APIError(400, f"unknown selector {selector!r}: choose one of {', '.join(SELECTORS)}", "selector")
    keep = None if body.get("keep") is None else _number(body, "keep", 1.0, 0.0, 1.0, open_low=True)
    if selector == "dense" and keep not in (None, 1.0):
        raise APIError(400, "selector dense keeps every channel: drop keep, or choose a pruning selector", "keep")
    ask.selector = selector or limits.selector
    ask.keep = keep if keep is not None or selector == "dense" else limits.keep
    if ask.selector == "dense":
        ask.keep = None
    if limits.low_memory and (ask.selector == "dense" or (ask.selector is None and ask.keep is None)):
        raise APIError(400, "this server runs --low-memory: it serves pruned submodels only (give keep < 1)", "selector")
    task = body.get("task")
    if task is not None and (not isinstance(task, str) or not task.strip()):
        raise APIError(400, "task must be a non-empty string (an instruction the mask is chosen from)", "task")
    ask.task = task
    ask.reselect = _flag(body, "reselect")
    if ask.task is not None and ask.reselect:
        raise APIError(400, "give task or reselect, not both: each chooses the mask", "reselect")


def _integer(body: dict, name: str, low: int, high: Optional[int], high_name: str) -> int:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{name} must be an integer", name)
    if value < low or (high is not None and value > high):
        most = f" and at most {high} ({high_name})" if high is not None else ""
        raise APIError(400, f"{name} must be at least {low}{most}, got {value}", name)
    return value


def _number(
    body: dict, name: str, default: float, low: float, high: Optional[float], open_low: bool = False
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"{name} must be a number", name)
    if value < low or (open_low and value == low) or (high is not None and value > high):
        span = f"({low:g}, {high:g}]" if open_low else (f"[{low:g}, {high:g}]" if high is not None else f">= {low:g}")
        raise APIError(400, f"{name} must be in {span}, got {value}", name)
    return float(value)


def _flag(body: dict, name: str, param: Optional[str] = None) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{param or name} must be true or false", param or name)
    return value


def _stops(value: Any) -> list[str]:
    """``stop`` as a list of non-empty strings (a string, a list of them, or absent)."""
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    return [s for s in stops if s]
