"""Response bodies in OpenAI's shapes (as mlx-lm's server writes them).

A chat reply is a ``chat.completion`` (streamed: ``chat.completion.chunk``
objects with a ``delta``), a text reply a ``text_completion``; ``usage``
carries ``prompt_tokens_details.cached_tokens``, the prompt tokens whose KV
came from a cached conversation. ``ifp`` is this server's own field: the
submodel that answered, so a client can see what its pruning fields did.
"""

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from starlette.responses import JSONResponse

from .protocol import APIError


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    def body(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass
class Shape:
    """What every body of one reply shares: its id, kind, model and creation time."""

    kind: str  # "chat" or "text"
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"

    def _head(self, object_type: str) -> dict:
        return {"id": self.id, "object": object_type, "created": self.created, "model": self.model}

    def _choice(self, text: str, finish_reason: Optional[str], stream: bool) -> dict:
        choice: dict = {"index": 0, "finish_reason": finish_reason}
        if self.kind == "text":
            choice.update(text=text, logprobs=None)
        elif stream:
            choice["delta"] = {"role": "assistant", "content": text} if text else {}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        return choice

    def whole(self, text: str, finish_reason: str, usage: Usage, info: dict) -> dict:
        """The reply in one body (``stream`` false)."""
        kind = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self._head(kind), "choices": [self._choice(text, finish_reason, False)], "usage": usage.body(), "ifp": info}

    def chunk(self, text: str, finish_reason: Optional[str] = None) -> dict:
        """One streamed piece of the reply (the last one carries the finish reason)."""
        kind = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(kind), "choices": [self._choice(text, finish_reason, True)]}

    def usage_chunk(self, usage: Usage, info: dict) -> dict:
        """The streamed usage (``stream_options.include_usage``): no choices, as OpenAI sends it."""
        kind = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(kind), "choices": [], "usage": usage.body(), "ifp": info}


def event(body: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(body)}\n\n"


DONE = "data: [DONE]\n\n"


def models_body(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [model_body(model_id, created)]}


def model_body(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "ifp-mlx"}


def error_response(e: APIError) -> JSONResponse:
    """``e`` as OpenAI's error body, with its status and headers."""
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
