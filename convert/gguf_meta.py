"""Typed access to GGUF metadata, with one-line errors for values of the wrong kind.

GGUF metadata values carry their own type, chosen by whoever wrote the file:
a head count may arrive as a string, a token list as a float, a token id as
NaN. The gguf package hands values back as they are, so every read of a key
that the converter relies on goes through here and either gets the kind it
needs or a ConversionError naming the key and the value.
"""

from __future__ import annotations

from typing import Any

from .errors import ConversionError

_MISSING: Any = object()


def show(value: Any, limit: int = 60) -> str:
    """A value for an error message: repr, cut short (metadata strings can be megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(e: BaseException) -> str:
    """A library's exception as a fragment of a one-line message."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Metadata:
    """A GGUF's key/value pairs; ``prefix`` makes ``get("block_count")`` read ``llama.block_count``."""

    def __init__(self, values: dict[str, Any], prefix: str = ""):
        self.values = values
        self.prefix = prefix

    def key(self, name: str) -> str:
        return self.prefix + name

    def __contains__(self, name: str) -> bool:
        return self.key(name) in self.values

    def get(self, name: str, default: Any = _MISSING) -> Any:
        full = self.key(name)
        if full in self.values:
            return self.values[full]
        if default is _MISSING:
            raise ConversionError(f"GGUF metadata lacks {full}")
        return default

    def _wrong(self, name: str, value: Any, wanted: str) -> ConversionError:
        return ConversionError(f"GGUF metadata {self.key(name)} is {show(value)}, not {wanted}")

    def integer(self, name: str, default: Any = _MISSING, minimum: int = 0) -> int:
        """A whole number >= minimum; a per-layer list must hold one value for every layer."""
        value = self.get(name, default)
        if isinstance(value, list) and value:
            if len(set(map(repr, value))) != 1:
                raise ConversionError(f"{self.key(name)} varies per layer, which is not supported")
            value = value[0]
        if not _is_int(value) or value < minimum:
            raise self._wrong(name, value, f"a whole number >= {minimum}")
        return value

    def number(self, name: str, default: Any = _MISSING) -> float | None:
        """A float; ``default`` None passes through for optional settings."""
        value = self.get(name, default)
        if value is None and default is None:
            return None
        if not _is_number(value):
            raise self._wrong(name, value, "a number")
        return float(value)

    def text(self, name: str, default: Any = _MISSING) -> str:
        value = self.get(name, default)
        if not isinstance(value, str):
            raise self._wrong(name, value, "text")
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, (bool, int)):
            raise self._wrong(name, value, "true or false")
        return bool(value)

    def texts(self, name: str, default: Any = _MISSING) -> list[str]:
        value = self.get(name, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._wrong(name, value, "a list of strings")
        return value

    def integers(self, name: str, default: Any = _MISSING) -> list[int]:
        value = self.get(name, default)
        if not isinstance(value, list) or not all(_is_int(v) for v in value):
            raise self._wrong(name, value, "a list of whole numbers")
        return value

    def numbers(self, name: str, default: Any = _MISSING) -> list[float]:
        value = self.get(name, default)
        if not isinstance(value, list) or not all(_is_number(v) for v in value):
            raise self._wrong(name, value, "a list of numbers")
        return [float(v) for v in value]

    def token_id(self, name: str) -> int | None:
        """An optional token id: absent is None, anything but a whole number is an error."""
        value = self.get(name, None)
        if value is None:
            return None
        if not _is_int(value) or value < 0:
            raise self._wrong(name, value, "a token id")
        return value
