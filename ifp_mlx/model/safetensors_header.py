"""A safetensors file's header, read without trusting it.

The converter reads safetensors checkpoints from anywhere; the runtime reads the
FFN bank of a model folder with positioned reads (``bank_file``). Both parse the
header here: an 8-byte little-endian length, then that many bytes of JSON. A
length past the file's end or over 100 MiB, bad JSON or UTF-8, huge integers,
deep nesting and a header that is not a JSON object are each one-line errors.
"""

import json
import struct
from pathlib import Path

from ..errors import IFPError

MAX_HEADER_BYTES = 100 << 20


def read_header(path: Path, error: type[IFPError] = IFPError) -> tuple[dict, int]:
    """The header dict and the byte offset where tensor data starts; bad input raises ``error``."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise error(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise error(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):  # bad JSON or UTF-8, huge ints, deep nesting
            raise error(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise error(f"{path}: not a safetensors file (the header is not a JSON object)")
    return header, 8 + n
