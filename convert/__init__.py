"""Checkpoint converter: PyTorch, safetensors and GGUF -> ifp model folders."""

from .convert import ConvertOptions, ConvertSummary, convert
from .errors import ConversionError

__all__ = ["ConversionError", "ConvertOptions", "ConvertSummary", "convert"]
