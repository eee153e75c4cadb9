"""Open any supported checkpoint as lazily read Hugging Face-named tensors.

Sources: a Hugging Face folder (config.json plus safetensors or pytorch .bin
weights, single or sharded with an index), a single state-dict file
(.safetensors / .pt / .pth / .bin) with a separate config.json, or a GGUF file.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import ConversionError
from .safetensors_io import read_safetensors
from .tensors import SourceTensor

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
TORCH_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass
class Checkpoint:
    tensors: dict[str, SourceTensor]
    config: dict
    format: str  # "safetensors" | "pytorch" | "gguf"
    write_tokenizer: Callable[[Path], None]


def open_checkpoint(src: str | Path, config_path: Optional[str | Path] = None) -> Checkpoint:
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"{src}: no such file or folder")
    if src.is_dir():
        return _open_folder(src)
    if src.suffix == ".gguf":
        return _open_gguf(src)
    if src.suffix in (".safetensors",) + TORCH_SUFFIXES:
        if config_path is None:
            raise ConversionError(f"{src}: a single weights file needs --config CONFIG.json")
        return _open_single_file(src, Path(config_path))
    raise ConversionError(
        f"{src}: unknown checkpoint type (expected a model folder, .gguf, .safetensors, .bin, .pt or .pth)"
    )


def _open_gguf(src: Path) -> Checkpoint:
    from .gguf_reader import read_gguf

    gguf = read_gguf(src)
    return Checkpoint(gguf.tensors, gguf.config, "gguf", gguf.write_tokenizer)


def _open_single_file(src: Path, config_path: Path) -> Checkpoint:
    config = _read_config(config_path)
    tensors, fmt = read_weights_file(src)
    return Checkpoint(tensors, config, fmt, tokenizer_copier(config_path.parent))


def _open_folder(src: Path) -> Checkpoint:
    config = _read_config(src / "config.json")
    files = _weight_files(src)
    tensors: dict[str, SourceTensor] = {}
    fmt = "safetensors"
    for path in files:
        part, fmt = read_weights_file(path)
        tensors.update(part)
    return Checkpoint(tensors, config, fmt, tokenizer_copier(src))


def normalize_config(config: dict) -> dict:
    """Undo transformers 5's move of ``rope_theta`` into ``rope_parameters``.

    mlx-lm reads ``rope_theta`` (and ``rope_scaling``) at the top level and
    silently falls back to a default when it is missing.
    """
    rope = config.get("rope_parameters")
    if "rope_theta" not in config and isinstance(rope, dict) and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", rope)
    return config


def read_json(path: Path) -> dict:
    """A JSON object from a checkpoint's side file (config, metadata), or a one-line error."""
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})" if hasattr(e, "msg") else f"{path}: invalid JSON")
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return value


def _read_config(path: Path) -> dict:
    return normalize_config(read_json(path))


def read_weights_file(path: Path) -> tuple[dict[str, SourceTensor], str]:
    if path.suffix == ".safetensors":
        return read_safetensors(path), "safetensors"
    from .torch_reader import read_torch

    return read_torch(path), "pytorch"


def _weight_files(folder: Path) -> list[Path]:
    """Shards named by an index (all must exist), else the single weights files."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = _index_shards(index)
            for shard in shards:
                if not (folder / shard).is_file():
                    raise ConversionError(f"{folder}: missing shard {shard} (listed in {index_name})")
            return [folder / s for s in shards]
    for pattern in ("model*.safetensors", "*.safetensors", "pytorch_model*.bin", "*.bin", "*.pt", "*.pth"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise ConversionError(f"{folder}: no weights found (*.safetensors or pytorch_model*.bin)")


def _index_shards(index: Path) -> list[str]:
    """The shard file names a sharded checkpoint's index lists, checked: plain names
    inside the folder (an index is untrusted: ``../`` or an absolute path would
    read files from elsewhere)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index}: no weight_map in the shard index")
    shards = sorted({str(v) for v in weight_map.values()})
    for shard in shards:
        if not shard or Path(shard).name != shard or shard in (".", ".."):
            raise ConversionError(f"{index}: shard {shard!r} is not a file name in the model folder")
    return shards


def tokenizer_copier(folder: Path) -> Callable[[Path], None]:
    def copy(out: Path) -> None:
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, out / name)

    return copy
