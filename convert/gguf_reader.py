"""Read a GGUF file as a Hugging Face checkpoint: tensors, config and tokenizer.

The converter downstream only understands Hugging Face checkpoints, so this
reader hides everything llama.cpp does differently. The work is split by
subject:

- ``gguf_bounds`` and ``gguf_container``: the container, parsed and decoded
  by the gguf package behind a bounds check of the header;
- ``gguf_names``: llama.cpp's tensor names, layout fixes and hyper-parameters
  as Hugging Face names and a config.json;
- ``gguf_tokenizer``: tokenizer.json rebuilt from the vocabulary metadata;
- ``gguf_meta``: typed metadata access shared by the two above.

Tensors are read one per ``read()`` from the memory map. ``mx.load`` also
reads GGUF, but it copies the whole file into memory up front (98 MB active
for a 98 MB file), silently turns K-quants into float16 and fails outright on
Q5_0, so it can neither stream a large model nor say which tensor is the
problem.

Every problem with the file surfaces as one single-line ConversionError that
names it: errors raised deeper know the key or tensor but not the path, so
the path is put in front of them here.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import ConversionError
from .gguf_container import GGUFTensor, dequantize, open_gguf
from .gguf_meta import one_line, show
from .gguf_names import (
    CONFIGS,
    NOT_WEIGHTS,
    SUPPORTED_ARCHITECTURES,
    ArchMeta,
    fixer,
    hf_name,
    special_ids,
)
from .gguf_tokenizer import build_tokenizer, tokenizer_files
from .tensors import SourceTensor

_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _one_line_naming(path: Path | None, e: ConversionError) -> ConversionError:
    message = str(e).replace("\r", "\\r").replace("\n", "\\n")
    if path is not None and str(path) not in message:
        message = f"{path}: {message}"
    return ConversionError(message)


@contextmanager
def _naming(path: Path | None) -> Iterator[None]:
    """Re-raise a ConversionError as one line that names the file."""
    try:
        yield
    except ConversionError as e:
        raise _one_line_naming(path, e) from None


@dataclass
class GGUFCheckpoint:
    """A GGUF file seen as a Hugging Face checkpoint."""

    tensors: dict[str, SourceTensor]  # HF names and (out, in) shapes; read() -> float32
    config: dict  # a config.json that mlx-lm's ModelArgs.from_dict understands
    metadata: dict = field(default_factory=dict, repr=False)  # raw GGUF key/values
    path: Path | None = field(default=None, repr=False)  # the file, for error messages

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    def write_tokenizer(self, out_dir: Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json.

        All three are built before anything is written, so a tokenizer that
        cannot be rebuilt leaves no files behind.
        """
        with _naming(self.path):
            tokenizer = build_tokenizer(self.metadata, self.architecture)
            max_length = self.config.get("max_position_embeddings", 4096)
            files = {"tokenizer.json": tokenizer.to_str(pretty=True)}
            for name, content in tokenizer_files(self.metadata, self.architecture, max_length).items():
                files[name] = json.dumps(content, indent=2, ensure_ascii=False) + "\n"
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out_dir / name).write_text(text)


def _reader(path: Path, info: GGUFTensor, fix: Callable[[np.ndarray], np.ndarray] | None):
    def read() -> np.ndarray:
        # Inf/NaN scales in a block decode to inf/NaN: the values are the file's, not an error.
        with np.errstate(invalid="ignore", over="ignore"):
            try:
                w = dequantize(info)
            except Exception as e:  # gguf.quants on bytes the header checks let through
                message = f"tensor {info.name}: cannot decode its {info.type_name} data ({one_line(e)})"
                raise _one_line_naming(path, ConversionError(message)) from None
            return fix(w) if fix is not None else w

    return read


def _architecture(metadata: dict) -> str:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"GGUF architecture {show(arch)} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return arch


def _read(path: Path) -> GGUFCheckpoint:
    metadata, infos = open_gguf(path)
    arch = _architecture(metadata)
    meta = ArchMeta(metadata, arch)
    tensors: dict[str, SourceTensor] = {}
    extras: dict[str, Callable[[], np.ndarray]] = {}
    for info in infos:
        if info.name in NOT_WEIGHTS:
            extras[info.name] = _reader(path, info, None)
            continue
        name = hf_name(arch, info.name)
        tensors[name] = SourceTensor(
            name=name,
            shape=info.shape,
            dtype=_DTYPES.get(info.type_name, info.type_name),
            read=_reader(path, info, fixer(arch, info.name, info.shape, meta)),
            nbytes=info.nbytes,
        )
    if "model.embed_tokens.weight" not in tensors:
        raise ConversionError("GGUF has no token_embd.weight tensor")
    config = CONFIGS[arch](meta, tensors, extras)
    config.update(special_ids(metadata))
    return GGUFCheckpoint(tensors=tensors, config=config, metadata=metadata, path=path)


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Parse a GGUF file's header; tensors are read one at a time on demand."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"GGUF file not found: {path}")
    with _naming(path):
        return _read(path)
