"""Mask files: a saved selection ``[L, k]`` and the model it was made for.

A mask file is a safetensors file holding ``indices`` (uint32, ascending per
layer) and, in its metadata, the fingerprint of the model (shapes and a probe
of its first weights) plus how the mask was made. Loading it with another
model is refused with a one-line error.
"""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from ..errors import IFPError
from ..files import atomic_file
from .bank import check_indices

PROBE_TOLERANCE = 0.05  # the probe survives dtype changes and 8-bit quantization


def model_fingerprint(config: dict) -> dict:
    """What identifies a model's FFN: family, shapes and a probe of its weights."""
    ifp = config["ifp"]
    return {
        "model_type": config["model_type"],
        "num_layers": ifp["bank"]["num_layers"],
        "d_ff": ifp["bank"]["d_ff"],
        "hidden_size": ifp["bank"]["hidden_size"],
        "probe": ifp.get("probe"),
    }


def check_fingerprint(expected: dict, config: dict, what: str) -> None:
    """Raise IFPError when ``what`` (made for ``expected``) does not fit ``config``."""
    actual = model_fingerprint(config)
    for key in ("model_type", "num_layers", "d_ff", "hidden_size"):
        if expected.get(key) != actual[key]:
            raise IFPError(
                f"{what} was made for another model ({key} {expected.get(key)}, this model has {actual[key]})"
            )
    probe, ours = expected.get("probe"), actual["probe"]
    if probe and ours and (len(probe) != len(ours) or not np.allclose(probe, ours, atol=PROBE_TOLERANCE * max(1e-3, float(np.abs(ours).max())))):
        raise IFPError(f"{what} was made for another model (same shapes, different weights)")


def save_mask(path: str | Path, indices: mx.array, config: dict, info: Optional[dict] = None) -> Path:
    """Write a mask file atomically (temporary file, then rename)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    metadata = {"fingerprint": json.dumps(model_fingerprint(config)), "info": json.dumps(info or {})}
    with atomic_file(path) as tmp:
        mx.save_safetensors(str(tmp), {"indices": indices.astype(mx.uint32)}, metadata=metadata)
    return path


def load_mask(path: str | Path, config: dict) -> tuple[mx.array, dict]:
    """The indices of a mask file checked against ``config``, and its info."""
    path = Path(path)
    if not path.is_file():
        raise IFPError(f"{path}: mask file not found")
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
        indices = arrays["indices"]
        fingerprint = json.loads(metadata["fingerprint"])
    except (KeyError, ValueError, RuntimeError, json.JSONDecodeError):
        raise IFPError(f"{path}: not an ifp mask file")
    check_fingerprint(fingerprint, config, f"mask {path.name}")
    bank = config["ifp"]["bank"]
    indices = check_indices(indices, bank["num_layers"], bank["d_ff"], f"mask {path.name}")
    return indices, json.loads(metadata.get("info", "{}"))


def mask_overlap(a: mx.array, b: mx.array, d_ff: int) -> float:
    """|A ∩ B| / k averaged over layers, for two selections ``[L, k]``.

    Tracks mask collapse: overlaps near 1 across unrelated prompts mean the
    predictor stopped depending on the prompt.
    """
    a, b = np.array(a).astype(np.int64), np.array(b).astype(np.int64)
    hits = np.zeros((a.shape[0], d_ff), np.int32)
    np.put_along_axis(hits, a, 1, axis=1)
    shared = np.take_along_axis(hits, b, axis=1).sum(axis=1)
    return float((shared / b.shape[1]).mean())
