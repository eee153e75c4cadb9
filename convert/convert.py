"""Convert a checkpoint into an ifp model folder.

Output folder:
  config.json           the source config plus an ``ifp`` block (and mlx-lm's
                        ``quantization`` block when quantized)
  weights.safetensors   attention, norms, embeddings (mlx-lm names)
  ffn_bank.safetensors  every layer's FFN as channel records (see ifp_mlx.bank)
  tokenizer files

Work goes tensor by tensor (one FFN layer at a time) into a temporary folder
that is renamed into place only when everything is written, so a failure never
leaves a half-written model behind.
"""

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from .. import __version__
from ..files import atomic_folder, space_for
from ..model.bank import channel_records
from ..model.config_check import ConfigError, check_model_fields
from ..model.families import UnsupportedFamily, family_for
from .checkpoint import Checkpoint, open_checkpoint
from .errors import ConversionError
from .safetensors_io import SafetensorsWriter
from .tensors import SourceTensor, float32_to_bf16

WEIGHTS_FILE = "weights.safetensors"
BANK_FILE = "ffn_bank.safetensors"
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
FFN_NAME = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")
QUANTIZABLE = re.compile(r"(_proj|embed_tokens|lm_head)\.weight$")
DROPPED = re.compile(r"rotary_emb\.inv_freq$")
PROBE_SIZE = 16
NON_FLOAT_DTYPES = ("int64", "int32", "int16", "int8", "uint8", "bool")


@dataclass
class ConvertOptions:
    dtype: Optional[str] = None  # None: keep the source's float dtype
    quantize: bool = False
    bits: int = 4
    group_size: int = 64
    force: bool = False


@dataclass
class ConvertSummary:
    out: Path
    parameters: int
    bytes_written: int
    seconds: float
    dtype: str = "float32"
    dtype_reason: str = ""  # why that dtype, when the user did not name one


def convert(
    src: str | Path,
    out: str | Path,
    options: ConvertOptions = ConvertOptions(),
    config_path: Optional[str | Path] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> ConvertSummary:
    """Convert ``src`` into the model folder ``out``.

    ``progress(done_bytes, total_bytes)`` is called as source bytes are consumed.
    """
    start = time.perf_counter()
    out = Path(out)
    _check_options(options)
    if out.exists() and not options.force:
        raise ConversionError(f"{out} already exists (use --force to overwrite)")
    checkpoint = open_checkpoint(src, config_path)
    plan = _plan(checkpoint, options)
    _check_source_config(checkpoint.config, Path(config_path) if config_path else _config_file(Path(src)))
    with space_for(out, _output_bytes(plan, options), ConversionError), atomic_folder(out, force=True) as tmp:
        tracker = _Progress(plan.total_bytes, progress)
        _write_weights(tmp / WEIGHTS_FILE, plan, options, tracker)
        _write_bank(tmp / BANK_FILE, plan, options, tracker)
        checkpoint.write_tokenizer(tmp)
        config = _output_config(checkpoint, plan, options, src)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    written = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return ConvertSummary(out, plan.parameters, written, time.perf_counter() - start, plan.dtype, plan.dtype_reason)


def _config_file(src: Path) -> Path:
    """Where a source's config comes from, for messages: a folder's config.json, else the file."""
    return src / "config.json" if src.is_dir() else src


def _check_source_config(config: dict, where: Path) -> None:
    """The model fields a loader will check, checked before anything is written: a
    folder that converts must load (zero heads or a string for a flag was written out,
    then refused by every command)."""
    try:
        check_model_fields(config, where)
    except ConfigError as e:
        raise ConversionError(str(e)) from None


@dataclass
class _Plan:
    dense: dict[str, SourceTensor]  # non-FFN tensors, canonical names
    ffn: list[dict[str, SourceTensor]]  # per layer: gate, up, down
    dtype: str
    activation: str
    parameters: int
    total_bytes: int
    probe: Optional[list] = None  # first weights of layer 0's first gate row
    dtype_reason: str = ""  # why ``dtype``, when the user named none


def _check_options(options: ConvertOptions) -> None:
    if options.dtype is not None and options.dtype not in FLOAT_DTYPES:
        raise ConversionError(f"unknown dtype {options.dtype!r}: use one of {', '.join(FLOAT_DTYPES)}")
    if options.quantize:
        if options.bits not in (2, 3, 4, 5, 6, 8):
            raise ConversionError(f"--bits {options.bits} is not supported: use 2, 3, 4, 5, 6 or 8")
        if options.group_size not in (32, 64, 128):
            raise ConversionError(f"--group-size {options.group_size} is not supported: use 32, 64 or 128")


def canonical_name(name: str) -> str:
    """Strip wrapper prefixes (``llm.``, ``language_model.``...) down to HF names."""
    if name.startswith(("model.", "lm_head.")):
        return name
    for anchor in (".model.", ".lm_head."):
        at = name.find(anchor)
        if at >= 0:
            return name[at + 1 :]
    return name


def _plan(checkpoint: Checkpoint, options: ConvertOptions) -> _Plan:
    config = checkpoint.config
    try:
        family = family_for(config)
    except UnsupportedFamily as e:
        raise ConversionError(str(e))
    if "quantization_config" in config or "quantization" in config:
        raise ConversionError("pre-quantized checkpoints are not supported: convert from float weights")
    num_layers = config["num_hidden_layers"]
    dense: dict[str, SourceTensor] = {}
    ffn: list[dict[str, SourceTensor]] = [{} for _ in range(num_layers)]
    for name, tensor in checkpoint.tensors.items():
        name = canonical_name(name)
        if DROPPED.search(name) or tensor.dtype in NON_FLOAT_DTYPES:
            continue
        if match := FFN_NAME.match(name):
            layer = int(match.group(1))
            if layer >= num_layers:
                raise ConversionError(f"tensor {name} is beyond num_hidden_layers={num_layers}")
            ffn[layer][match.group(2)] = tensor
        elif ".mlp." in name and name.startswith("model.layers."):
            raise ConversionError(f"unsupported FFN tensor {name} (FFN biases are not supported)")
        else:
            dense[name] = tensor
    if config.get("tie_word_embeddings", False):
        dense.pop("lm_head.weight", None)
    _check_ffn(ffn, config)
    dtype, reason = (options.dtype, "") if options.dtype else _source_dtype(ffn[0]["gate"])
    tensors = list(dense.values()) + [t for layer in ffn for t in layer.values()]
    parameters = sum(int(np.prod(t.shape)) for t in tensors)
    total_bytes = sum(t.nbytes or int(np.prod(t.shape)) for t in tensors)
    return _Plan(dense, ffn, dtype, family.activation, parameters, total_bytes, dtype_reason=reason)


def _check_ffn(ffn: list[dict[str, SourceTensor]], config: dict) -> None:
    d, d_ff = config["hidden_size"], config["intermediate_size"]
    expected = {"gate": (d_ff, d), "up": (d_ff, d), "down": (d, d_ff)}
    for layer, parts in enumerate(ffn):
        for part, shape in expected.items():
            if part not in parts:
                raise ConversionError(f"missing tensor model.layers.{layer}.mlp.{part}_proj.weight")
            if tuple(parts[part].shape) != shape:
                raise ConversionError(
                    f"model.layers.{layer}.mlp.{part}_proj.weight has shape {tuple(parts[part].shape)}, config says {shape}"
                )


def _source_dtype(tensor: SourceTensor) -> tuple[str, str]:
    """Keep a float source's dtype; dequantized (GGUF) weights get the platform's
    (MLX's CPU backend runs float16 about 10x slower than float32), and why."""
    if tensor.dtype in FLOAT_DTYPES:
        return tensor.dtype, "the source's"
    return default_dtype(), "the default for dequantized weights " + ("on an Apple GPU" if mx.metal.is_available() else "on a CPU")


def default_dtype() -> str:
    """float16 on Apple GPUs; float32 on CPUs, where half precision is slower."""
    return "float16" if mx.metal.is_available() else "float32"


class _Progress:
    def __init__(self, total: int, callback: Optional[Callable[[int, int], None]]):
        self.total, self.done, self.callback = total, 0, callback

    def advance(self, tensor: SourceTensor) -> None:
        self.done += tensor.nbytes or int(np.prod(tensor.shape))
        if self.callback:
            self.callback(self.done, self.total)


def _quantizes(name: str, shape: tuple[int, ...], options: ConvertOptions) -> bool:
    return options.quantize and len(shape) == 2 and bool(QUANTIZABLE.search(name)) and shape[-1] % options.group_size == 0


def _entries_for(name: str, shape: tuple[int, ...], dtype: str, options: ConvertOptions, quantized: bool):
    """Output (name, dtype, shape) entries of one tensor, as mx.quantize lays them out."""
    if not quantized:
        return [(name, dtype, shape)]
    base = name[: -len(".weight")]
    words = shape[-1] * options.bits // 32
    groups = shape[-1] // options.group_size
    return [
        (f"{base}.weight", "uint32", (*shape[:-1], words)),
        (f"{base}.scales", dtype, (*shape[:-1], groups)),
        (f"{base}.biases", dtype, (*shape[:-1], groups)),
    ]


def _to_output(array: np.ndarray, dtype: str, options: ConvertOptions, quantized: bool) -> list[np.ndarray]:
    """Cast (and maybe quantize) one float32 array; returns arrays in entry order."""
    if not quantized:
        return [_cast(array, dtype)]
    x = mx.array(array.astype(np.float32)).astype(getattr(mx, dtype))
    w, s, b = mx.quantize(x, group_size=options.group_size, bits=options.bits)
    return [np.array(w), _mx_to_numpy(s, dtype), _mx_to_numpy(b, dtype)]


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return float32_to_bf16(array.astype(np.float32))
    return array.astype(dtype)


def _mx_to_numpy(x: mx.array, dtype: str) -> np.ndarray:
    return _cast(np.array(x.astype(mx.float32)), dtype)


def _weight_entries(plan: _Plan, options: ConvertOptions) -> dict[str, list]:
    """Each non-FFN tensor's output entries, by name."""
    return {
        name: _entries_for(name, t.shape, plan.dtype, options, _quantizes(name, t.shape, options))
        for name, t in sorted(plan.dense.items())
    }


def _bank_entries(plan: _Plan, options: ConvertOptions) -> list:
    d_ff, d = plan.ffn[0]["gate"].shape
    return _entries_for("bank.weight", (len(plan.ffn), d_ff, 3, d), plan.dtype, options, options.quantize)


def _output_bytes(plan: _Plan, options: ConvertOptions) -> int:
    """About what the model folder will take on disk: every tensor written, and a
    megabyte for the headers, the config and the tokenizer."""
    entries = [e for es in _weight_entries(plan, options).values() for e in es] + _bank_entries(plan, options)
    itemsize = {"bfloat16": 2, "float16": 2, "float32": 4, "uint32": 4}
    return sum(int(np.prod(shape)) * itemsize[dtype] for _, dtype, shape in entries) + (1 << 20)


def _write_weights(path: Path, plan: _Plan, options: ConvertOptions, tracker: _Progress) -> None:
    entries = _weight_entries(plan, options)
    names = list(entries)
    writer = SafetensorsWriter(path, [e for name in names for e in entries[name]])
    try:
        for name in names:
            tensor = plan.dense[name]
            arrays = _to_output(tensor.read(), plan.dtype, options, len(entries[name]) > 1)
            for (entry, _, _), array in zip(entries[name], arrays):
                writer.write(entry, array)
            tracker.advance(tensor)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _write_bank(path: Path, plan: _Plan, options: ConvertOptions, tracker: _Progress) -> None:
    d = plan.ffn[0]["gate"].shape[1]
    quantized = options.quantize
    if quantized and d % options.group_size:
        raise ConversionError(f"hidden size {d} is not a multiple of --group-size {options.group_size}")
    entries = _bank_entries(plan, options)
    writer = SafetensorsWriter(path, entries)
    try:
        for layer, parts in enumerate(plan.ffn):
            gate = parts["gate"].read()
            if layer == 0:
                plan.probe = [round(float(v), 6) for v in gate[0, :PROBE_SIZE]]
            records = channel_records(gate, parts["up"].read(), parts["down"].read())
            for part in ("gate", "up", "down"):
                tracker.advance(parts[part])
            arrays = _to_output(records, plan.dtype, options, quantized)
            for (entry, _, _), array in zip(entries, arrays):
                writer.write(entry, array[None], row=layer)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _output_config(checkpoint: Checkpoint, plan: _Plan, options: ConvertOptions, src) -> dict:
    config = dict(checkpoint.config)
    d_ff, d = plan.ffn[0]["gate"].shape
    quantization = {"group_size": options.group_size, "bits": options.bits} if options.quantize else None
    if quantization:
        config["quantization"] = dict(quantization)
    config["ifp"] = {
        "format_version": 1,
        "converter": f"ifp-mlx {__version__}",
        "source": {"path": str(Path(src).resolve()), "format": checkpoint.format},
        "dtype": plan.dtype,
        "quantization": quantization,
        "activation": plan.activation,
        "weights": WEIGHTS_FILE,
        "bank": {
            "file": BANK_FILE,
            "layout": "bank.weight[layer, channel, (gate, up, down_t), hidden]",
            "num_layers": len(plan.ffn),
            "d_ff": d_ff,
            "hidden_size": d,
        },
        "parameters": plan.parameters,
        # Identifies the weights (not the dtype) so masks and predictors made
        # for one model are refused by another with the same shapes.
        "probe": plan.probe,
    }
    return config
