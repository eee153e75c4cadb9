"""Convert a PyTorch IFPruning predictor checkpoint into an ifp predictor folder.

Accepted layouts (see docs/PREDICTOR.md):
  (a) one state dict (.pt/.pth/.bin/.safetensors): a Qwen2/Llama backbone under
      Hugging Face names (any wrapper prefix) plus ``prediction_head1`` /
      ``prediction_head2`` (``Linear(d, 128)``, ``Linear(128, L*d_ff)``, biases,
      no activation). The backbone config comes from ``--backbone-config``.
  (b) a folder with ``extractor.pt`` (backbone body, no ``model.`` prefix),
      ``mask_head.pt`` (``nn.Sequential``: ``0.*`` Linear, GELU, ``2.*`` Linear)
      and ``predictor_meta.json`` (``extractor_config``, sizes, ``topk``).
  (c) a folder with ``predictor.safetensors`` (``extractor.*``, ``mlp.0.*``,
      ``mlp.2.weight``: LeakyReLU(0.1), no last bias, parameter-free layer norm
      on the features) and ``ifpruning_config.json``; the backbone config is
      ``--backbone-config`` or ``<predictor_model>/config.json``.

Tensors are read with the converter's torch-free readers (no pickle code runs).
The backbone becomes an ifp model folder ``backbone/`` through the model
converter: its tensors are streamed into a temporary Hugging Face folder with
the target's tokenizer (the public layouts carry none), then converted.
"""

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx

from ..files import atomic_folder
from ..model.load import read_config
from ..model.masks import model_fingerprint
from ..model.predictor_head import ACTIVATIONS, BACKBONE_FOLDER, DEFAULT_KEEP, PredictorHead, write_predictor_files
from .checkpoint import (
    TORCH_SUFFIXES,
    normalize_config,
    read_json,
    read_weights_file,
    tokenizer_copier,
)
from .convert import FLOAT_DTYPES, ConvertOptions, canonical_name, convert
from .errors import ConversionError
from .safetensors_io import SafetensorsWriter, read_safetensors
from .tensors import SourceTensor, float32_to_bf16

LAYOUT_A = "(a) backbone state dict + prediction_head1/2"
LAYOUT_B = "(b) extractor.pt + mask_head.pt + predictor_meta.json"
LAYOUT_C = "(c) predictor.safetensors + ifpruning_config.json"
FILES_B = ("extractor.pt", "mask_head.pt", "predictor_meta.json")
FILES_C = ("predictor.safetensors", "ifpruning_config.json")
# Head tensor name -> (linear 0 or 1, weight or bias), per layout.
HEAD_A = {f"prediction_head{i + 1}.{p}": (i, p) for i in (0, 1) for p in ("weight", "bias")}
HEAD_B = {f"{2 * i}.{p}": (i, p) for i in (0, 1) for p in ("weight", "bias")}
HEAD_C = {f"mlp.{2 * i}.{p}": (i, p) for i in (0, 1) for p in ("weight", "bias")}


@dataclass
class PredictorSource:
    """A predictor checkpoint read lazily: backbone under HF names, head, settings."""

    layout: str
    format: str  # "pytorch" | "safetensors"
    backbone: dict[str, SourceTensor]
    head: dict[tuple[int, str], SourceTensor]
    backbone_config: Optional[dict]
    activation: str
    feature_norm: str = "none"
    keep: Optional[float] = None
    sizes: dict = field(default_factory=dict)  # num_layers / d_ff the checkpoint states
    tokenizer: Optional[Path] = None  # the predictor's own tokenizer folder, if it ships one


def convert_predictor(
    src: str | Path,
    out: str | Path,
    model: str | Path,
    backbone_config: Optional[str | Path] = None,
    tokenizer: Optional[str | Path] = None,
    activation: Optional[str] = None,
    keep: Optional[float] = None,
    dtype: Optional[str] = None,
    force: bool = False,
) -> Path:
    """Convert ``src`` into the predictor folder ``out`` for the model folder ``model``."""
    model = Path(model)
    target = read_config(model)
    source = open_predictor(src, read_json(Path(backbone_config)) if backbone_config else None)
    if activation is not None:
        if activation not in ACTIVATIONS:
            raise ConversionError(f"unknown --activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
        source.activation = activation
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}: use one of {', '.join(FLOAT_DTYPES)}")
    predictor = _build_head(source, target)
    config = _backbone_config(source.backbone_config, predictor.hidden_size)
    tokenizer_dir = Path(tokenizer) if tokenizer else source.tokenizer or model
    keep = keep if keep is not None else source.keep or DEFAULT_KEEP
    with atomic_folder(out, force) as tmp:
        hf = tmp / ".hf-backbone"
        _write_hf_folder(hf, source.backbone, config, tokenizer_dir)
        convert(hf, tmp / BACKBONE_FOLDER, ConvertOptions(dtype=dtype))
        shutil.rmtree(hf)
        _record_source(tmp / BACKBONE_FOLDER, src, source.format)
        head_dtype = getattr(mx, dtype or _head_dtype(source))
        info = {"path": str(Path(src).resolve()), "layout": source.layout}
        write_predictor_files(tmp, predictor, target, keep, BACKBONE_FOLDER, dtype=head_dtype, source=info)
    return Path(out)


def open_predictor(src: str | Path, backbone_config: Optional[dict] = None) -> PredictorSource:
    """Detect the layout of ``src`` and index its tensors."""
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"{src}: no such file or folder")
    if src.is_file():
        return _open_layout_a(src, backbone_config)
    if any((src / name).exists() for name in FILES_B):
        return _open_layout_b(src, backbone_config)
    if any((src / name).exists() for name in FILES_C):
        return _open_layout_c(src, backbone_config)
    raise ConversionError(
        f"{src}: not a predictor checkpoint (expected a state-dict file, {' + '.join(FILES_B)}, or {' + '.join(FILES_C)})"
    )


def _open_layout_a(src: Path, backbone_config: Optional[dict]) -> PredictorSource:
    if src.suffix not in TORCH_SUFFIXES + (".safetensors",):
        raise ConversionError(f"{src}: expected a .pt/.pth/.bin/.safetensors state dict")
    if backbone_config is None:
        raise ConversionError(f"{src}: a backbone state dict needs --backbone-config CONFIG.json (the backbone's HF config)")
    tensors, fmt = read_weights_file(src)
    backbone, head = {}, {}
    for name, tensor in tensors.items():
        hf = canonical_name(name)
        if hf.startswith(("model.", "lm_head.")):
            backbone[hf] = tensor
        else:
            head[_head_key(src, ".".join(name.split(".")[-2:]), name, HEAD_A)] = tensor
    return PredictorSource(LAYOUT_A, fmt, backbone, head, backbone_config, "none")


def _open_layout_b(src: Path, backbone_config: Optional[dict]) -> PredictorSource:
    _require(src, FILES_B)
    meta = read_json(src / "predictor_meta.json")
    extractor, _ = read_weights_file(src / "extractor.pt")
    head_tensors, _ = read_weights_file(src / "mask_head.pt")
    head = {_head_key(src / "mask_head.pt", name, name, HEAD_B): t for name, t in head_tensors.items()}
    backbone = {_body_name(name): t for name, t in extractor.items()}
    config = backbone_config or meta.get("extractor_config")
    if not isinstance(config, dict):
        raise ConversionError(f"{src}/predictor_meta.json: no extractor_config (pass --backbone-config CONFIG.json)")
    sizes = {"num_layers": meta.get("num_layers"), "d_ff": meta.get("intermediate_size")}
    keep = _ratio(meta.get("topk"), meta.get("intermediate_size"))
    return PredictorSource(LAYOUT_B, "pytorch", backbone, head, config, "gelu", keep=keep, sizes=sizes)


def _open_layout_c(src: Path, backbone_config: Optional[dict]) -> PredictorSource:
    _require(src, FILES_C)
    meta = read_json(src / "ifpruning_config.json")
    backbone, head = {}, {}
    for name, tensor in read_safetensors(src / "predictor.safetensors").items():
        if name.startswith("extractor."):
            backbone[_body_name(name[len("extractor.") :])] = tensor
        else:
            head[_head_key(src / "predictor.safetensors", name, name, HEAD_C)] = tensor
    config = backbone_config or _predictor_model_config(src, meta.get("predictor_model"))
    sizes = {"num_layers": meta.get("num_layers"), "d_ff": meta.get("full_intermediate_dim")}
    keep = _ratio(meta.get("target_intermediate_dim"), meta.get("full_intermediate_dim"))
    tokenizer = src / "predictor_tokenizer" if (src / "predictor_tokenizer").is_dir() else None
    return PredictorSource(LAYOUT_C, "safetensors", backbone, head, config, "leaky_relu", "layer_norm", keep, sizes, tokenizer)


def _require(src: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if not (src / name).is_file():
            raise ConversionError(f"{src}: missing {name} (this layout needs {', '.join(names)})")


def _head_key(path: Path, key: str, name: str, known: dict) -> tuple[int, str]:
    if key not in known:
        raise ConversionError(f"{path}: unknown head key {name!r} (expected {', '.join(sorted(known))})")
    return known[key]


def _body_name(name: str) -> str:
    """A backbone body's key (``layers.0...``) under its HF causal-LM name (``model.layers.0...``)."""
    for prefix in ("model.", "language_model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return f"model.{name}"


def _ratio(part, whole) -> Optional[float]:
    return part / whole if isinstance(part, (int, float)) and isinstance(whole, int) and whole > 0 and 0 < part <= whole else None


def _predictor_model_config(src: Path, predictor_model) -> dict:
    """Layout (c) names the backbone by path; its config.json is used if it is there."""
    if isinstance(predictor_model, str):
        for folder in (Path(predictor_model), src / predictor_model):
            if (folder / "config.json").is_file():
                return read_json(folder / "config.json")
    raise ConversionError(
        f"{src}: the backbone config ({predictor_model}/config.json) is not here: pass --backbone-config CONFIG.json"
    )


def _build_head(source: PredictorSource, target: dict) -> PredictorHead:
    """The head (no backbone: the selector attaches one), checked against the target model."""
    fingerprint = model_fingerprint(target)
    L, d_ff = fingerprint["num_layers"], fingerprint["d_ff"]
    for key, ours in (("num_layers", L), ("d_ff", d_ff)):
        theirs = source.sizes.get(key)
        if theirs is not None and theirs != ours:
            raise ConversionError(f"the predictor was made for another model ({key} {theirs}, this model has {ours})")
    for i in (0, 1):
        if (i, "weight") not in source.head:
            raise ConversionError(f"the predictor checkpoint has no weight for head layer {i + 1}")
    first, last = source.head[(0, "weight")].shape, source.head[(1, "weight")].shape
    if len(first) != 2 or len(last) != 2 or last[1] != first[0]:
        raise ConversionError(f"head layers do not chain: shapes {tuple(first)} and {tuple(last)}")
    if last[0] != L * d_ff:
        raise ConversionError(
            f"the predictor was made for another model (its head scores {last[0]} channels, this model has {L} x {d_ff})"
        )
    bias = ((0, "bias") in source.head, (1, "bias") in source.head)
    predictor = PredictorHead(first[1], L, d_ff, first[0], source.activation, bias, source.feature_norm)
    names = {0: "proj", 1: "out"}
    predictor.load_weights([(f"{names[i]}.{part}", mx.array(t.read()).astype(mx.float32)) for (i, part), t in source.head.items()])
    return predictor


def _head_dtype(source: PredictorSource) -> str:
    dtype = source.head[(1, "weight")].dtype
    return dtype if dtype in FLOAT_DTYPES else "float32"


def _backbone_config(config: Optional[dict], hidden_size: int) -> dict:
    """The backbone's HF config, made loadable as a feature extractor.

    Multimodal configs keep their ``text_config``; transformers 5 moved
    ``rope_theta`` into ``rope_parameters``; the LM head is never used, so
    embeddings are declared tied and no ``lm_head`` is needed.
    """
    config = dict(config or {})
    if isinstance(config.get("text_config"), dict):
        config = {**config["text_config"]}
    normalize_config(config)
    if "model_type" not in config:
        raise ConversionError("the backbone config has no model_type")
    if config.get("hidden_size") != hidden_size:
        raise ConversionError(f"the head reads {hidden_size} features, the backbone config says hidden_size {config.get('hidden_size')}")
    config["tie_word_embeddings"] = True
    return config


def _write_hf_folder(folder: Path, tensors: dict[str, SourceTensor], config: dict, tokenizer: Path) -> None:
    """Stream the backbone's float tensors into ``model.safetensors`` beside its config."""
    folder.mkdir()
    kept = {n: t for n, t in sorted(tensors.items()) if not n.startswith("lm_head.") and t.dtype in FLOAT_DTYPES + ("float64",)}
    if not kept:
        raise ConversionError("the predictor checkpoint holds no backbone tensors")
    dtypes = {n: t.dtype if t.dtype in FLOAT_DTYPES else "float32" for n, t in kept.items()}
    writer = SafetensorsWriter(folder / "model.safetensors", [(n, dtypes[n], tuple(t.shape)) for n, t in kept.items()])
    try:
        for name, tensor in kept.items():
            array = tensor.read()
            writer.write(name, float32_to_bf16(array) if dtypes[name] == "bfloat16" else array.astype(dtypes[name]))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_copier(tokenizer)(folder)


def _record_source(backbone: Path, src: str | Path, fmt: str) -> None:
    """Point the backbone's ``ifp.source`` at the checkpoint, not the temporary folder."""
    config = json.loads((backbone / "config.json").read_text())
    config["ifp"]["source"] = {"path": str(Path(src).resolve()), "format": fmt}
    (backbone / "config.json").write_text(json.dumps(config, indent=2))
