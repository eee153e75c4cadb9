"""A model folder's ``config.json``, checked before anything is built from it.

A model folder comes from anywhere, and mlx-lm trusts its config: zero heads
divide by zero, a million layers build a million modules (a minute, then an
abort), a negative size or a string where a number belongs fails deep inside
MLX with a traceback. So every field the model classes, the tokenizer and ifp
read is checked here first, each failure one line naming the field; then the
sizes are compared with the safetensors headers of the weight files (a few
kilobytes read), so a config that disagrees with its weights is refused before
MLX builds a single layer. docs/FORMAT.md lists the checks.
"""

import dataclasses
import json
import math
import re
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Optional

from mlx_lm.utils import _get_classes

from ..errors import IFPError
from .families import FAMILIES
from .safetensors_header import read_header

MAX_CONFIG_BYTES = 1 << 20  # real configs are a few kilobytes
MAX_SIZES = {  # far above any released model, low enough that nothing built from them runs away
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "vocab_size": 1 << 23,
    "max_position_embeddings": 1 << 31,
    "sliding_window": 1 << 31,
    "sliding_window_pattern": 1024,
}
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# What ifp reads itself, whatever the family's model class reads; null is absent for these.
IFP_READS = REQUIRED + ("max_position_embeddings", "eos_token_id", "quantization", "text_config")
MAX_NUMBERS = {"rms_norm_eps": 1.0, "rope_theta": 1e12, "rope_local_base_freq": 1e12, "query_pre_attn_scalar": 1e6}
BOOLEANS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "rope_traditional")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope", "su")
LAYER_TYPES = ("full_attention", "sliding_attention")
FLOAT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
QUANT_BITS, QUANT_GROUPS = (2, 3, 4, 5, 6, 8), (32, 64, 128)
ACTIVATIONS = ("silu", "gelu_approx")
MAX_PROBE = 64  # a fingerprint's probe values (the converter writes fewer)
LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


class ConfigError(IFPError):
    """One field of a model folder's config.json is wrong; the message names it."""


def parse_config(config_file: Path) -> dict:
    """The JSON object in ``config_file``; unreadable, oversized or non-object JSON is one line."""
    size = config_file.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{config_file}: {size} bytes, too large for a model config")
    try:
        config = json.loads(config_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{config_file}: not UTF-8 text") from None
    except (ValueError, RecursionError) as e:  # bad JSON, huge integers, deep nesting
        raise ConfigError(f"{config_file}: not valid JSON ({error_line(e)})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_file}: not a JSON object")
    return config


def check_config(config: dict, where: Path) -> None:
    """Every field the family's model class, the tokenizer and ifp read, in range and
    consistent; the fields the class does not read are left to it. ``where`` names the file."""
    _check_ifp(check_model_fields(config, where))


def check_model_fields(config: dict, where: Path) -> "Fields":
    """The fields the family's model class and the tokenizer read (not the ``ifp``
    block): what the converter checks in a source's config before writing anything."""
    fields = Fields(config, where)
    fields.model_type()
    fields.names("architectures")
    fields.defaults = _class_fields(config)
    for name in REQUIRED + tuple(n for n, d in fields.defaults.items() if d is MISSING):
        fields.present(name)
    for name in MAX_SIZES:
        fields.size(name)
    for name in MAX_NUMBERS:
        fields.positive(name)
    for name in BOOLEANS:
        fields.boolean(name)
    fields.heads()
    fields.rope_scaling("rope_scaling")
    fields.rope_scaling("rope_parameters")
    if config["model_type"] == "qwen3" and config.get("rope_theta") is None:
        fields.positive_in("rope_parameters", "rope_theta")
    fields.layer_types()
    fields.mapping("text_config")
    fields.token_ids("eos_token_id")
    return fields


def model_args(config: dict, where: Path) -> Any:
    """The family's ModelArgs of a checked config (a dataclass: nothing is built yet)."""
    try:
        _, args_class = _get_classes(config)
        return args_class.from_dict(config)
    except (ValueError, TypeError, KeyError) as e:  # a combination the checks do not cover
        raise ConfigError(f"{where}: config.json is not a {config['model_type']} config: {error_line(e)}") from None


def _class_fields(config: dict) -> dict[str, Any]:
    """The fields the family's ModelArgs reads: their defaults, MISSING for required ones."""
    _, args_class = _get_classes(config)
    return {
        f.name: f.default if f.default_factory is MISSING else f.default_factory()
        for f in dataclasses.fields(args_class)
    }


def head_dim(args: Any) -> int:
    """The attention head size the model class uses (qwen2 always derives it)."""
    dim = getattr(args, "head_dim", None)
    if dim and args.model_type != "qwen2":
        return dim
    return args.hidden_size // args.num_attention_heads


def check_against_weights(config: dict, path: Path) -> Any:
    """The sizes in ``config`` against the tensors' shapes in the weight files' headers
    (only headers are read): layers, vocabulary, hidden and FFN sizes, heads. Returns
    the family's ModelArgs it built for the heads (what the model is built from)."""
    ifp = config["ifp"]
    weights = path / ifp["weights"]
    header, _ = read_header(weights, ConfigError)
    shapes = {name: _shape(weights, name, entry) for name, entry in header.items() if name != "__metadata__"}
    layers = {int(m.group(1)) for name in shapes if (m := LAYER_NAME.match(name))}
    if layers != set(range(config["num_hidden_layers"])):
        raise ConfigError(
            f"{path}: config.json num_hidden_layers is {config['num_hidden_layers']}, "
            f"{ifp['weights']} has {len(layers)} layers"
        )
    width = _packed(config["hidden_size"], ifp.get("quantization"))
    embed = "model.embed_tokens"
    packed = width if f"{embed}.scales" in shapes else config["hidden_size"]
    _expect(path, ifp["weights"], shapes, f"{embed}.weight", (config["vocab_size"], packed), "vocab_size and hidden_size")
    args = model_args(config, path / "config.json")
    heads, kv_heads, dim = args.num_attention_heads, args.num_key_value_heads, head_dim(args)
    for proj, rows, fields in (("q_proj", heads * dim, "num_attention_heads x head_dim"), ("k_proj", kv_heads * dim, "num_key_value_heads x head_dim")):
        name = f"model.layers.0.self_attn.{proj}.weight"
        _expect(path, ifp["weights"], shapes, name, (rows,) + shapes.get(name, (None, None))[1:], fields)
    _check_bank(config, path, width)
    return args


def _check_bank(config: dict, path: Path, width: int) -> None:
    ifp = config["ifp"]
    bank = path / ifp["bank"]["file"]
    header, _ = read_header(bank, ConfigError)
    shapes = {name: _shape(bank, name, entry) for name, entry in header.items() if name != "__metadata__"}
    quant = ifp.get("quantization")
    expected = (config["num_hidden_layers"], config["intermediate_size"], 3, width if quant else config["hidden_size"])
    _expect(path, ifp["bank"]["file"], shapes, "bank.weight", expected, "num_hidden_layers, intermediate_size and hidden_size")
    if quant:
        groups = expected[:3] + (config["hidden_size"] // quant["group_size"],)
        for name in ("bank.scales", "bank.biases"):
            _expect(path, ifp["bank"]["file"], shapes, name, groups, "quantization.group_size")
    dtype = header["bank.weight"].get("dtype")
    want = "U32" if quant else FLOAT_DTYPES[ifp["dtype"]]
    if dtype != want:
        raise ConfigError(f"{path}: config.json ifp.dtype is {ifp['dtype']}, {ifp['bank']['file']} holds {show_value(dtype)}")


def _packed(hidden: int, quant: Optional[dict]) -> int:
    return hidden * quant["bits"] // 32 if quant else hidden


def _shape(file: Path, name: str, entry: Any) -> tuple[int, ...]:
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ConfigError(f"{file}: tensor {show_value(name)} has a malformed shape")
    return tuple(shape)


def _expect(path: Path, file: str, shapes: dict, name: str, expected: tuple, fields: str) -> None:
    actual = shapes.get(name)
    if actual is None:
        raise ConfigError(f"{path}: {file} has no tensor {name}")
    if actual != expected:
        raise ConfigError(f"{path}: config.json {fields} make {name} {expected}, {file} has {actual}")


def error_line(e: BaseException) -> str:
    """An exception as one short line: its type and its message's first line."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _check_ifp(fields: "Fields") -> None:
    """The ``ifp`` block the converter wrote: file names inside the folder, the bank's
    sizes equal to the model's, a dtype and quantization the loader knows."""
    ifp = fields.mapping("ifp", required=True)
    sub = Fields(ifp, fields.where, "ifp.")
    version = ifp.get("format_version")
    if version != 1 or type(version) is not int:
        raise ConfigError(f"{fields.where}: ifp.format_version must be 1, not {show_value(version)}")
    sub.file_name("weights")
    sub.choice("dtype", tuple(FLOAT_DTYPES))
    sub.choice("activation", ACTIVATIONS)
    quant = sub.quantization("quantization")
    top = fields.quantization("quantization")
    if top != quant:
        raise ConfigError(f"{fields.where}: quantization and ifp.quantization disagree")
    bank = sub.mapping("bank", required=True)
    banks = Fields(bank, fields.where, "ifp.bank.")
    banks.file_name("file")
    for key, model_key in (("num_layers", "num_hidden_layers"), ("d_ff", "intermediate_size"), ("hidden_size", "hidden_size")):
        if bank.get(key) != fields.config[model_key] or type(bank.get(key)) is not int:
            raise ConfigError(f"{fields.where}: ifp.bank.{key} is {show_value(bank.get(key))}, {model_key} is {fields.config[model_key]}")
    if quant and fields.config["hidden_size"] % quant["group_size"]:
        raise ConfigError(f"{fields.where}: hidden_size is not a multiple of quantization.group_size")
    sub.count("parameters")
    sub.numbers("probe", MAX_PROBE)


def _is_number(value: Any) -> bool:
    """A finite JSON number that fits a float (a 400-digit integer does not)."""
    if type(value) is int:
        return abs(value) < 1 << 64
    return type(value) is float and math.isfinite(value)


def show_value(value: Any) -> str:
    """A short rendering of a JSON value for a one-line message."""
    try:
        text = json.dumps(value)
    except (ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


class Fields:
    """Checks of one JSON object's fields; each failure names ``prefix + field``."""

    def __init__(self, config: dict, where: Path, prefix: str = ""):
        self.config, self.where, self.prefix = config, where, prefix
        self.defaults: dict[str, Any] = {}  # the fields the model class reads, and their defaults

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.where}: {self.prefix}{name} {problem}")

    def model_type(self) -> None:
        value = self.config.get("model_type")
        if not isinstance(value, str) or value not in FAMILIES:
            raise self.fail("model_type", f"is {show_value(value)}: supported families are {', '.join(sorted(FAMILIES))}")

    def absent(self, name: str) -> bool:
        """Unread, not there, or null where its reader takes null for absent (its default is null)."""
        if name not in self.defaults and name not in IFP_READS:
            return True  # the model class never reads it
        return name not in self.config or (self.config[name] is None and self.defaults.get(name) is None)

    def present(self, name: str) -> None:
        if name not in self.config:
            raise self.fail(name, "is missing")

    def size(self, name: str) -> None:
        value = self.config.get(name)
        limit = MAX_SIZES[name]
        if not self.absent(name) and (type(value) is not int or not 1 <= value <= limit):
            raise self.fail(name, f"is {show_value(value)}: it must be a whole number from 1 to {limit}")

    def whole(self, name: str, low: int, high: int) -> int:
        """A whole number from ``low`` to ``high`` that must be there."""
        value = self.config.get(name)
        if type(value) is not int or not low <= value <= high:
            raise self.fail(name, f"is {show_value(value)}: it must be a whole number from {low} to {high}")
        return value

    def fraction(self, name: str) -> None:
        """A number in (0, 1], when present."""
        value = self.config.get(name)
        if value is not None and not (_is_number(value) and 0 < value <= 1):
            raise self.fail(name, f"is {show_value(value)}: it must be a number above 0, at most 1")

    def numbers(self, name: str, most: int) -> None:
        """A list of at most ``most`` finite numbers, when present."""
        value = self.config.get(name)
        if value is not None and not (isinstance(value, list) and len(value) <= most and all(_is_number(v) for v in value)):
            raise self.fail(name, f"must be a list of at most {most} numbers")

    def count(self, name: str) -> None:
        value = self.config.get(name)
        if value is not None and (type(value) is not int or value < 0):
            raise self.fail(name, f"is {show_value(value)}: it must be a whole number")

    def positive(self, name: str) -> None:
        value, limit = self.config.get(name), MAX_NUMBERS[name]
        if not self.absent(name) and not (_is_number(value) and 0 < value <= limit):
            raise self.fail(name, f"is {show_value(value)}: it must be a number above 0, at most {limit:g}")

    def positive_in(self, block: str, name: str) -> None:
        Fields(self.mapping(block), self.where, f"{self.prefix}{block}.").positive(name)
        if (self.config.get(block) or {}).get(name) is None:
            raise self.fail("rope_theta", f"is missing (nor is there a {block}.{name})")

    def boolean(self, name: str) -> None:
        value = self.config.get(name)
        if not self.absent(name) and not isinstance(value, bool):
            raise self.fail(name, f"is {show_value(value)}: it must be true or false")

    def choice(self, name: str, allowed: tuple) -> None:
        value = self.config.get(name)
        if value not in allowed or not isinstance(value, str):
            raise self.fail(name, f"is {show_value(value)}: it must be one of {', '.join(allowed)}")

    def mapping(self, name: str, required: bool = False) -> dict:
        value = self.config.get(name)
        if not isinstance(value, dict) and (required or value is not None):
            raise self.fail(name, f"is {show_value(value)}: it must be a JSON object")
        return value or {}

    def file_name(self, name: str) -> None:
        value = self.config.get(name)
        if not isinstance(value, str) or value in ("", ".", "..") or "/" in value or "\\" in value or "\0" in value:
            raise self.fail(name, f"is {show_value(value)}: it must be a file name in the model folder")
        if not (self.where.parent / value).is_file():
            raise self.fail(name, f"names {show_value(value)}, which is not in the model folder")

    def heads(self) -> None:
        """Query heads split evenly over key/value heads, and over the hidden size when
        the head size is derived from it."""
        heads, kv = self.config["num_attention_heads"], self.config.get("num_key_value_heads")
        if kv is not None and heads % kv:
            raise self.fail("num_key_value_heads", f"({kv}) does not divide num_attention_heads ({heads})")
        dim = None if self.absent("head_dim") else self.config["head_dim"]
        if dim and dim % 2:
            raise self.fail("head_dim", f"is {dim}: rotary embeddings need an even head size")
        pattern = self.config.get("sliding_window_pattern", self.defaults.get("sliding_window_pattern"))
        if "sliding_window_pattern" in self.defaults and pattern > self.config["num_hidden_layers"]:
            raise self.fail("sliding_window_pattern", f"({pattern}) is above num_hidden_layers ({self.config['num_hidden_layers']})")
        derived = "head_dim" not in self.defaults or (self.defaults["head_dim"] is None and not dim)
        if derived and self.config["hidden_size"] % heads:
            raise self.fail("num_attention_heads", f"({heads}) does not divide hidden_size ({self.config['hidden_size']})")

    def rope_scaling(self, name: str) -> None:
        if self.absent(name):
            return
        scaling = self.mapping(name)
        kind = scaling.get("type") or scaling.get("rope_type", "default")
        if scaling and kind not in ROPE_TYPES:
            raise self.fail(name, f"has rope type {show_value(kind)}: supported are {', '.join(ROPE_TYPES)}")
        for key, value in scaling.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not _is_number(value):
                raise self.fail(f"{name}.{key}", f"is {show_value(value)}: it must be a finite number")
        factor = scaling.get("factor")
        if kind in ("linear", "dynamic", "yarn", "llama3") and not (_is_number(factor) and factor > 0):
            raise self.fail(f"{name}.factor", f"is {show_value(factor)}: a {kind} rope needs a number above 0")

    def layer_types(self) -> None:
        if self.absent("layer_types"):
            return
        value = self.config["layer_types"]
        layers = self.config["num_hidden_layers"]
        if not isinstance(value, list) or len(value) != layers or any(v not in LAYER_TYPES for v in value):
            raise self.fail("layer_types", f"must list {layers} of {', '.join(LAYER_TYPES)}")
        if "full_attention" not in value:
            raise self.fail("layer_types", "has no full_attention layer")

    def names(self, name: str) -> None:
        value = self.config.get(name)
        if value is not None and not (isinstance(value, list) and len(value) <= 16 and all(isinstance(v, str) for v in value)):
            raise self.fail(name, f"is {show_value(value)}: it must be a list of class names")

    def token_ids(self, name: str) -> None:
        value = self.config.get(name)
        ids = value if isinstance(value, list) else [value]
        vocab = self.config["vocab_size"]
        if value is None or (len(ids) <= 1024 and all(type(i) is int and 0 <= i < vocab for i in ids)):
            return
        raise self.fail(name, f"is {show_value(value)}: it must be a token id (or a list of them) below vocab_size {vocab}")

    def quantization(self, name: str) -> Optional[dict]:
        quant = self.mapping(name)
        if not quant:
            return None
        if quant.get("bits") not in QUANT_BITS or type(quant.get("bits")) is not int:
            raise self.fail(f"{name}.bits", f"is {show_value(quant.get('bits'))}: use one of {QUANT_BITS}")
        if quant.get("group_size") not in QUANT_GROUPS or type(quant.get("group_size")) is not int:
            raise self.fail(f"{name}.group_size", f"is {show_value(quant.get('group_size'))}: use one of {QUANT_GROUPS}")
        return {"group_size": quant["group_size"], "bits": quant["bits"]}
