"""Bounded fuzzing of a model folder's config.json (as tests/fuzzing.py does the
checkpoint readers), and the tampered configs it stands for, pinned.

A model folder comes from anywhere. The property: loading a folder whose
config.json was tampered with either works (and the model runs a forward pass)
or raises IFPError with one line naming the config file; nothing else
escapes, no case runs over CASE_LIMIT_S of CPU, none hangs. The folders are
tiny random-weight models converted by the real converter, quantized and not.

Cases mutate single fields (nested ``ifp`` ones too) to junk, off-by-one and
huge values or delete them, break the JSON bytes (fuzzing.mutate), or replace
the whole document. IFP_FUZZ_CASES / 5 cases (IFP_FUZZ_SEED picks the stream).
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
import pytest
from fuzzing import CASE_LIMIT_S, CASES, HANG_S, SEED, _deadline, _Hang, mutate
from ifp_mlx.convert import ConvertOptions, convert
from ifp_mlx.errors import IFPError
from ifp_mlx.model.load import load
from ifp_mlx.select.predictor import create_predictor, load_predictor, save_predictor
from tiny import write_hf_folder

CONFIG_CASES = max(1, CASES // 5)
JUNK = [
    0, -1, 1, 2, 3, 7, 10**6, 2**31, 2**63, -(2**63), 10**400, 1e308, math.nan, math.inf, -math.inf, 1.5, 0.0,
    "7", "", None, [], {}, [1, 2], True, False, "../weights.safetensors", "/etc/passwd", "llama",
    {"type": "linear"}, {"rope_type": "llama3", "factor": 0}, ["full_attention"], [[[[[[[[]]]]]]]],
]
ADDED = [  # fields some family's model class reads, which a seed may lack
    "attention_bias", "mlp_bias", "rope_traditional", "layer_types", "rope_scaling", "rope_parameters",
    "sliding_window", "sliding_window_pattern", "query_pre_attn_scalar", "rope_local_base_freq", "head_dim",
    "num_key_value_heads", "text_config", "eos_token_id", "architectures", "quantization", "max_position_embeddings",
]
ROOT_JUNK = [[], "x", 3, None, [{}], True]


def _paths(value, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a JSON object, nested objects included."""
    found = []
    for key, child in value.items():
        found.append(prefix + (key,))
        if isinstance(child, dict):
            found += _paths(child, prefix + (key,))
    return found


def _field_variant(rng: random.Random, config: dict, added: list[str]) -> tuple[dict, str]:
    """One field of ``config`` (at any depth) set to junk, nudged, scaled or removed, or
    a field of ``added`` (some reader reads it; the seed may lack it) added with a junk value."""
    if rng.random() < 0.15:
        key, value = rng.choice(added), rng.choice(JUNK)
        config[key] = value
        return config, f"add {key}={json.dumps(value)[:60]}"
    path = rng.choice(_paths(config))
    parent = config
    for key in path[:-1]:
        parent = parent[key]
    old, key = parent[path[-1]], path[-1]
    roll = rng.random()
    if roll < 0.15:
        del parent[key]
        return config, f"del {'.'.join(path)}"
    if type(old) is int and roll < 0.5:
        parent[key] = rng.choice([old + 1, old - 1, old * 2, old // 2, -old, old * 1000, old * 10**6])
    else:
        parent[key] = rng.choice(JUNK)
    return config, f"{'.'.join(path)}={json.dumps(parent[key])[:60]}"


def _config_case(rng: random.Random, seed: bytes, added: list[str]) -> tuple[bytes, list[str]]:
    roll = rng.random()
    if roll < 0.6:
        config, steps = json.loads(seed), []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            config, step = _field_variant(rng, config, added)
            steps.append(step)
        return json.dumps(config).encode(), steps
    if roll < 0.95:
        return mutate(rng, seed, [])
    root = rng.choice(ROOT_JUNK + ["deep", "bad utf-8", "huge"])
    if root == "deep":
        return b"[" * 100_000 + b"]" * 100_000, ["deep nesting"]
    if root == "bad utf-8":
        return b'{"model_type": "\xff\xfe"}', ["bad utf-8"]
    if root == "huge":
        return seed[:-1] + b', "pad": "' + b"x" * (2 << 20) + b'"}', ["2 MB config"]
    return json.dumps(root).encode(), [f"root {root!r}"]


def _check(folder: Path) -> str:
    """"works" or "refused"; anything else raises and is reported as a bug."""

    def run() -> None:
        loaded = load(folder)
        mx.eval(loaded.model(mx.array([[1, 2, 3]])))

    return _outcome(folder, run)


def _outcome(folder: Path, run: Callable[[], None]) -> str:
    """"works" when ``run`` returns, "refused" on a one-line IFPError naming ``folder``."""
    try:
        with _deadline(HANG_S):
            run()
    except IFPError as e:
        message = str(e)
        assert "\n" not in message and str(folder) in message, f"badly formed error: {message[:300]!r}"
        return "refused"
    return "works"


def _fuzz(folder: Path, seed: bytes, label: str, cases: int, check: Callable[[Path], str] = _check,
          added: list[str] = ADDED) -> list[str]:
    failures, outcomes = [], {"works": 0, "refused": 0}
    config_file = folder / "config.json"
    for i in range(cases):
        rng = random.Random(f"{SEED}:{label}:{i}")
        data, steps = _config_case(rng, seed, added)
        config_file.write_bytes(data)
        start = time.process_time()
        try:
            outcomes[check(folder)] += 1
        except _Hang:
            failures.append(f"case {i} {steps}: still running after {HANG_S:.0f} s")
            continue
        except Exception as e:  # noqa: BLE001 - the property under test
            failures.append(f"case {i} {steps}: {type(e).__name__}: {' '.join(str(e).split())[:160]}")
            continue
        spent = time.process_time() - start
        if spent > CASE_LIMIT_S:
            failures.append(f"case {i} {steps}: took {spent:.2f} s of CPU")
    config_file.write_bytes(seed)
    print(f"{label}: {outcomes['works']} load, {outcomes['refused']} refused")
    return failures


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Converted tiny models: llama (tied embeddings), quantized qwen2, gemma3_text."""
    root = tmp_path_factory.mktemp("models")
    made = {}
    for name, family, options in (
        ("llama", "llama", ConvertOptions(dtype="float32")),
        ("qwen2-q4", "qwen2", ConvertOptions(dtype="float32", quantize=True, bits=4, group_size=32)),
        ("gemma3", "gemma3_text", ConvertOptions(dtype="float16")),
    ):
        write_hf_folder(root / f"{name}-hf", family)
        convert(root / f"{name}-hf", root / name, options)
        made[name] = root / name
    return made


@pytest.mark.parametrize("name", ["llama", "qwen2-q4", "gemma3"])
def test_fuzz_config(tiny_models, name):
    folder = tiny_models[name]
    seed = (folder / "config.json").read_bytes()
    assert _check(folder) == "works"  # the untouched folder loads (and warms up MLX)
    _assert_none_failed(_fuzz(folder, seed, name, CONFIG_CASES))


def _assert_none_failed(failures: list[str]) -> None:
    kinds: dict[str, list[str]] = {}
    for line in failures:
        kinds.setdefault(line.split(": ", 1)[1][:40], []).append(line)
    assert not kinds, f"{len(failures)} failing cases:\n" + "\n".join(f"{len(v)} x {v[0]}" for v in kinds.values())


# ---------------------------------------------------------------------------
# The tampered configs of the report, and configs that disagree with their weights
# ---------------------------------------------------------------------------


def _tampered(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def _set(**fields):
    def edit(config):
        for key, value in fields.items():
            *parents, leaf = key.split("__")
            target = config
            for parent in parents:
                target = target[parent]
            if value is _DELETE:
                del target[leaf]
            else:
                target[leaf] = value

    return edit


_DELETE = object()


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (_set(num_attention_heads=0), "num_attention_heads is 0"),
        (_set(num_hidden_layers=10**6), "num_hidden_layers is 1000000"),
        (_set(num_hidden_layers=10**6, ifp__bank__num_layers=10**6), "num_hidden_layers is 1000000"),
        (_set(hidden_size=-64), "hidden_size is -64"),
        (_set(intermediate_size="96"), 'intermediate_size is "96"'),
        (_set(vocab_size=_DELETE), "vocab_size is missing"),
        (_set(vocab_size=0), "vocab_size is 0"),
        (_set(num_attention_heads=3, num_key_value_heads=1, head_dim=_DELETE), "num_attention_heads (3) does not divide hidden_size"),
        (_set(num_key_value_heads=3), "num_key_value_heads (3) does not divide num_attention_heads (4)"),
        (_set(rms_norm_eps=math.nan), "rms_norm_eps is NaN"),
        (_set(rope_theta=-1.0), "rope_theta is -1.0"),
        (_set(tie_word_embeddings="yes"), "tie_word_embeddings"),
        (_set(eos_token_id=10**9), "eos_token_id"),
        (_set(rope_scaling={"rope_type": "linear"}), "rope_scaling.factor"),
        (_set(layer_types=["sliding_attention", "sliding_attention"]), "layer_types"),
        (_set(ifp__weights="../../etc/passwd"), "ifp.weights"),
        (_set(ifp__bank__file="missing.safetensors"), "ifp.bank.file"),
        (_set(ifp__bank__d_ff=97), "ifp.bank.d_ff is 97"),
        (_set(ifp__dtype="float64"), "ifp.dtype"),
        (_set(ifp__format_version=2), "ifp.format_version"),
        (_set(ifp__quantization={"bits": 4, "group_size": 32}), "quantization and ifp.quantization disagree"),
        (_set(ifp=[]), "ifp is []"),
        (_set(model_type="mamba"), "model_type"),
        # a consistent config that disagrees with the weight files
        (_set(num_hidden_layers=3, ifp__bank__num_layers=3), "num_hidden_layers is 3, weights.safetensors has 2 layers"),
        (_set(intermediate_size=128, ifp__bank__d_ff=128), "bank.weight"),
        (_set(hidden_size=128, ifp__bank__hidden_size=128), "model.embed_tokens.weight"),
        (_set(vocab_size=301), "model.embed_tokens.weight"),
        (_set(head_dim=32), "q_proj"),
        (_set(head_dim=15), "head_dim is 15"),
        (_set(hidden_act=True), "transformers does not load"),
        (_set(ifp__dtype="float16"), "ifp.dtype is float16"),
        (_set(tie_word_embeddings=False), "lm_head.weight"),
    ],
)
def test_a_tampered_config_is_one_line_naming_the_field(tiny_models, tmp_path, edit, fragment):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in tiny_models["llama"].iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "config.json").unlink()
    (folder / "config.json").write_bytes((tiny_models["llama"] / "config.json").read_bytes())
    _tampered(folder, edit)
    start = time.process_time()
    with pytest.raises(IFPError) as e:
        load(folder)
    assert time.process_time() - start < CASE_LIMIT_S
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"[1, 2]", "not a JSON object"),
        (b'{"model_type": "\xff"}', "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"vocab_size": ' + b"1" * 5000 + b"}", "not valid JSON"),
        (b'{"ifp": {}', "not valid JSON"),
    ],
)
def test_an_unreadable_config_is_one_line(tmp_path, data, fragment):
    (tmp_path / "config.json").write_bytes(data)
    with pytest.raises(IFPError, match=fragment):
        load(tmp_path)


def test_the_cli_prints_a_tampered_config_as_one_line(tiny_models, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in tiny_models["llama"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    _tampered(folder, _set(num_attention_heads=0))
    cli = Path(sys.executable).with_name("ifp")
    result = subprocess.run([str(cli), "generate", "hi", "--model", str(folder), "-n", "1"], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "num_attention_heads is 0" in lines[0], result.stderr


def test_ifp_list_shows_a_damaged_model_beside_the_others(tiny_models, tmp_path):
    models = tmp_path / "home" / "models"
    for name in ("good", "damaged"):
        (models / name).mkdir(parents=True)
        for f in tiny_models["llama"].iterdir():
            (models / name / f.name).write_bytes(f.read_bytes())
    (models / "damaged" / "config.json").write_bytes(b"\xff{")
    cli = Path(sys.executable).with_name("ifp")
    env = {**os.environ, "IFP_HOME": str(tmp_path / "home")}
    result = subprocess.run([str(cli), "list"], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "float32" in rows["good"] and "(config.json refused)" in rows["damaged"], result.stdout


REAL_WORLD_FIELDS = {  # as released Hugging Face configs have them: none of it may be refused
    "llama": {
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "eos_token_id": [257, 256], "pretraining_tp": 1, "torch_dtype": "bfloat16", "mlp_bias": False,
        "attention_bias": False, "attention_dropout": 0.0, "use_cache": True, "sliding_window": None, "head_dim": None,
    },
    "qwen2": {"sliding_window": None, "use_sliding_window": False, "max_window_layers": 21, "rope_scaling": None, "head_dim": None},
    "qwen3": {"sliding_window": None, "use_sliding_window": False, "max_window_layers": 28, "rope_scaling": None,
              "attention_bias": False, "layer_types": ["full_attention", "full_attention"], "rope_parameters": None},
    "gemma3_text": {"final_logit_softcapping": None, "attn_logit_softcapping": None, "rope_scaling": None,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
}


@pytest.mark.parametrize("family", sorted(REAL_WORLD_FIELDS))
def test_the_fields_of_released_configs_are_accepted(tmp_path, family):
    write_hf_folder(tmp_path / "hf", family)
    _tampered(tmp_path / "hf", lambda config: config.update(REAL_WORLD_FIELDS[family]))
    convert(tmp_path / "hf", tmp_path / "out")
    assert _check(tmp_path / "out") == "works"


# ---------------------------------------------------------------------------
# A predictor folder's config.json: the same property, through load_predictor
# ---------------------------------------------------------------------------

PREDICTOR_ADDED = ["head_hidden", "activation", "bias", "feature_norm", "window", "adapter", "keep"]


@pytest.fixture(scope="module")
def tiny_predictor(tiny_models, tmp_path_factory) -> tuple[Path, object]:
    """A fresh predictor (shared:1 backbone, an 8-wide head) saved for the tiny llama."""
    loaded = load(tiny_models["llama"])
    folder = tmp_path_factory.mktemp("predictor") / "p"
    save_predictor(folder, create_predictor(loaded, "shared:1", head_hidden=8), loaded.config, keep=0.5)
    return folder, loaded


def _check_predictor(loaded) -> Callable[[Path], str]:
    def check(folder: Path) -> str:
        def run() -> None:
            predictor, _ = load_predictor(folder, loaded)
            mx.eval(predictor.select([[1, 2, 3]], 8))

        return _outcome(folder, run)

    return check


def test_fuzz_predictor_config(tiny_predictor):
    folder, loaded = tiny_predictor
    seed = (folder / "config.json").read_bytes()
    check = _check_predictor(loaded)
    assert check(folder) == "works"
    _assert_none_failed(_fuzz(folder, seed, "predictor", CONFIG_CASES, check, PREDICTOR_ADDED))


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (_set(hidden_size="576"), 'hidden_size is "576"'),
        (_set(head_hidden=-5), "head_hidden is -5"),
        (_set(bias=3), "bias is 3"),
        (_set(target=None), "target is null"),
        (_set(target__d_ff=-1), "target.d_ff is -1"),
        (_set(target__probe=["x"]), "target.probe"),
        (_set(backbone=4), "backbone is 4"),
        (_set(window=1), "window is 1"),
        (_set(adapter={"file": "adapter.safetensors", "keep": 7}), "adapter.keep is 7"),
    ],
)
def test_a_tampered_predictor_config_is_one_line_naming_the_field(tiny_predictor, tmp_path, edit, fragment):
    source, loaded = tiny_predictor
    folder = tmp_path / "p"
    folder.mkdir()
    for f in source.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    _tampered(folder, edit)
    with pytest.raises(IFPError) as e:
        load_predictor(folder, loaded)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)
