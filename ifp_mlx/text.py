"""Text from outside (argv, stdin, a terminal) checked to be UTF-8 before anything reads it.

The tokenizer fails on bytes that are not UTF-8 with a traceback that does
not say which input was wrong; these checks name the input and the byte.
"""

from .errors import IFPError


def decode_utf8(data: bytes, source: str) -> str:
    """Strictly decoded text without a byte-order mark; an IFPError naming the first bad byte."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise IFPError(f"{source} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def check_utf8(text: str, source: str) -> str:
    """The text, unless it holds bytes that were not UTF-8.

    Python hands such bytes on as lone surrogates (argv, a terminal read by
    prompt_toolkit, stdin in the C locale): they are turned back into the
    bytes to name the first one; a surrogate that is no escaped byte is named
    as a character.
    """
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise IFPError(f"{source} is not valid text (lone surrogate U+{ord(text[e.start]):04X} "
                       f"at character {e.start})") from None
    return decode_utf8(data, source)
