"""The sparsity predictor: PyTorch checkpoints in the three public layouts, converted
and run in MLX, against PyTorch's scores and top-k; shared:N; errors; the CLI."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from ifp_mlx.convert import convert
from ifp_mlx.convert.errors import ConversionError
from ifp_mlx.convert.predictor import convert_predictor
from tiny import tiny_config, tiny_weights, write_hf_folder

from ifp_mlx.engine.engine import Engine
from ifp_mlx.engine.prompts import prompt_tokens
from ifp_mlx.engine.stats import GenerationConfig, GenerationStats
from ifp_mlx.errors import IFPError
from ifp_mlx.model.load import load
from ifp_mlx.model.masks import mask_overlap
from ifp_mlx.select.base import Selection
from ifp_mlx.select.choose import choose, make_selector
from ifp_mlx.select.predictor import (
    PredictorSelector,
    create_predictor,
    load_predictor,
    pad_batch,
    save_predictor,
    shipped_predictor,
)

torch = pytest.importorskip("torch")

# Prompts of the backbone's (= the tiny target's) vocabulary; one of a single token.
PROMPTS = [[5, 17, 42, 99, 123, 7, 250, 11, 64], [3, 1, 4, 1, 5, 9, 2, 6], [77], [200, 100, 50, 25, 12, 6]]
KEEP = 0.5
# Backbones: smaller than the target, so sizes are never mixed up by accident.
BACKBONE = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 40, "num_attention_heads": 2, "num_key_value_heads": 1}
IFP = [sys.executable, "-m", "ifp_mlx.cli.main"]


def ifp(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*IFP, *args], capture_output=True, text=True, env=os.environ.copy())


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``ifp ARGS`` in this process (a subprocess re-imports mlx-lm: seconds each)."""
    from ifp_mlx.cli.main import main

    def run(*args: str) -> subprocess.CompletedProcess:
        monkeypatch.setattr(sys, "argv", ["ifp", *args])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and pattern in lines[0], result.stderr


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """The tiny model the predictors prune: qwen2, L = 2, d_ff = 96."""
    root = tmp_path_factory.mktemp("target")
    write_hf_folder(root / "hf", "qwen2")
    return convert(root / "hf", root / "model").out


@pytest.fixture(scope="module")
def target(target_dir):
    return load(target_dir, dense=False)


def torch_state(weights: dict[str, np.ndarray]) -> dict:
    return {name: torch.from_numpy(np.ascontiguousarray(w)) for name, w in weights.items()}


def torch_head(d: int, out: int, activation, last_bias: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, 128), activation, torch.nn.Linear(128, out, bias=last_bias))


def reference_features(config: dict, weights: dict[str, np.ndarray], prompts, num_layers=None) -> np.ndarray:
    """Final-norm hidden state at each prompt's last token: transformers in PyTorch
    when installed, else mlx-lm's own model on the same weights."""
    n = num_layers or config["num_hidden_layers"]
    body = {k[len("model.") :]: v for k, v in weights.items() if k.startswith("model.")}
    body = {k: v for k, v in body.items() if not k.startswith("layers.") or int(k.split(".")[1]) < n}
    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is not None:
        hf_config = transformers.AutoConfig.for_model(**{**config, "num_hidden_layers": n})
        model = transformers.AutoModel.from_config(hf_config, attn_implementation="eager").eval()
        model.load_state_dict(torch_state(body), strict=True)
        with torch.no_grad():
            return np.stack([model(input_ids=torch.tensor([p])).last_hidden_state[0, -1].numpy() for p in prompts])
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict({**config, "num_hidden_layers": n}))
    model.model.load_weights([(k, mx.array(v)) for k, v in body.items()])
    return np.stack([np.array(model.model(mx.array([p]))[0, -1]) for p in prompts])


def assert_same_topk(ours: mx.array, scores: np.ndarray, k: int) -> None:
    """Equal to torch.topk per layer; a differing channel may only be an exact-ish tie."""
    want = torch.topk(torch.from_numpy(scores), k, dim=-1).indices.sort(dim=-1).values.numpy()
    got = np.array(ours)
    assert got.shape == want.shape
    for layer, (g, w) in enumerate(zip(got, want)):
        kth = np.sort(scores[layer])[-k]
        for channel in set(g.tolist()) ^ set(w.tolist()):
            assert abs(scores[layer, channel] - kth) < 1e-6, f"layer {layer} channel {channel}"


def layer_norm(x):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],))


def check_parity(out, target, head, features: np.ndarray, norm=None) -> None:
    """MLX scores (padded batches, both sides) and top-k against the PyTorch head."""
    predictor, config = load_predictor(out, target)
    x = torch.from_numpy(features)
    with torch.no_grad():
        want = head(norm(x) if norm else x).view(len(PROMPTS), target.num_layers, target.d_ff).numpy()
    tokens, mask = pad_batch(PROMPTS)
    right = np.array(predictor.scores(predictor.features(tokens, mask)))
    left_tokens = np.array([[0] * (tokens.shape[1] - len(p)) + p for p in PROMPTS])
    left_mask = np.array([[0] * (tokens.shape[1] - len(p)) + [1] * len(p) for p in PROMPTS])
    left = np.array(predictor.scores(predictor.features(left_tokens, left_mask)))
    np.testing.assert_allclose(right, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(left, want, atol=1e-4, rtol=0)
    k = int(KEEP * target.d_ff)
    assert config["keep"] == KEEP
    selector = PredictorSelector.for_model(target, out)
    for prompt, scores in zip(PROMPTS, want):
        assert_same_topk(selector.select(prompt, k).indices, scores, k)
    for batch, scores in zip(predictor.select(PROMPTS, k), want):
        assert_same_topk(batch, scores, k)


@pytest.fixture(scope="module")
def layout_b(tmp_path_factory, target):
    """extractor.pt + mask_head.pt + predictor_meta.json (transformers 5 style config)."""
    src = tmp_path_factory.mktemp("b") / "step_00000010"
    src.mkdir()
    config = tiny_config("llama", **BACKBONE)
    weights = tiny_weights(config, seed=1)
    body = {k[len("model.") :]: v for k, v in weights.items() if k.startswith("model.")}
    torch.save(torch_state(body), src / "extractor.pt")
    head = torch_head(32, target.num_layers * target.d_ff, torch.nn.GELU())
    torch.save(head.state_dict(), src / "mask_head.pt")
    extractor_config = {k: v for k, v in config.items() if k != "rope_theta"}
    extractor_config["rope_parameters"] = {"rope_theta": config["rope_theta"], "rope_type": "default"}
    meta = {
        "num_layers": target.num_layers, "intermediate_size": target.d_ff, "topk": int(KEEP * target.d_ff),
        "mask_method": "st", "head_hidden_dim": 128, "extractor_config": extractor_config,
    }
    (src / "predictor_meta.json").write_text(json.dumps(meta))
    return src, config, weights, head


def test_layout_a_state_dict_parity(tmp_path, target, target_dir):
    config = tiny_config("qwen2", **BACKBONE)  # untied: the state dict carries an lm_head
    weights = tiny_weights(config, seed=2)
    head1 = torch_head(32, target.num_layers * target.d_ff, torch.nn.Identity(), seed=2)
    state = {f"feature_extractor.{k}": v for k, v in torch_state(weights).items()}
    state.update({"prediction_head1.weight": head1[0].weight, "prediction_head1.bias": head1[0].bias})
    state.update({"prediction_head2.weight": head1[2].weight, "prediction_head2.bias": head1[2].bias})
    torch.save(state, tmp_path / "predictor.pt")
    (tmp_path / "backbone.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="needs --backbone-config"):
        convert_predictor(tmp_path / "predictor.pt", tmp_path / "nope", target_dir)
    out = convert_predictor(tmp_path / "predictor.pt", tmp_path / "pred", target_dir, backbone_config=tmp_path / "backbone.json", keep=KEEP)
    assert json.loads((out / "config.json").read_text())["activation"] == "none"
    check_parity(out, target, head1, reference_features(config, weights, PROMPTS))


def test_layout_b_extractor_mask_head_parity(tmp_path, target, target_dir, layout_b):
    src, config, weights, head = layout_b
    out = convert_predictor(src, tmp_path / "pred", target_dir)
    saved = json.loads((out / "config.json").read_text())
    assert saved["activation"] == "gelu" and saved["backbone"] == "backbone"
    backbone = json.loads((out / "backbone" / "config.json").read_text())
    assert backbone["rope_theta"] == config["rope_theta"] and backbone["ifp"]["source"]["path"] == str(src.resolve())
    check_parity(out, target, head, reference_features(config, weights, PROMPTS))


def test_layout_c_safetensors_parity(tmp_path, target, target_dir):
    from safetensors.torch import save_file

    config = tiny_config("qwen2", **BACKBONE)
    weights = tiny_weights(config, seed=3)
    head = torch_head(32, target.num_layers * target.d_ff, torch.nn.LeakyReLU(0.1), last_bias=False, seed=3)
    state = {f"extractor.{k[len('model.'):]}": v for k, v in torch_state(weights).items() if k.startswith("model.")}
    state.update({f"mlp.{k}": v.detach().contiguous() for k, v in head.state_dict().items()})
    src = tmp_path / "checkpoint-500"
    src.mkdir()
    save_file(state, str(src / "predictor.safetensors"))
    backbone_dir = tmp_path / "Qwen-tiny"
    backbone_dir.mkdir()
    (backbone_dir / "config.json").write_text(json.dumps(config))
    meta = {"num_layers": target.num_layers, "full_intermediate_dim": target.d_ff, "target_intermediate_dim": int(KEEP * target.d_ff),
            "predictor_model": str(backbone_dir), "predictor_hidden_dim": 128}
    (src / "ifpruning_config.json").write_text(json.dumps(meta))
    out = convert_predictor(src, tmp_path / "pred", target_dir)  # the config found through predictor_model
    saved = json.loads((out / "config.json").read_text())
    assert saved["bias"] == [True, False] and saved["feature_norm"] == "layer_norm"
    check_parity(out, target, head, reference_features(config, weights, PROMPTS), layer_norm)


def test_shared_backbone_features_and_round_trip(tmp_path, target, target_dir):
    """shared:1 is the target's embedding, layer 0 and final norm; save/load keeps scores."""
    config = json.loads((target_dir / "config.json").read_text())
    weights = tiny_weights(tiny_config("qwen2"), seed=0)  # what write_hf_folder wrote
    predictor = create_predictor(target, "shared:1", activation="gelu")
    tokens, mask = pad_batch(PROMPTS)
    ours = np.array(predictor.features(tokens, mask))
    np.testing.assert_allclose(ours, reference_features(config, weights, PROMPTS, num_layers=1), atol=1e-4)
    save_predictor(tmp_path / "p", predictor, target.config, keep=0.25)
    loaded, saved = load_predictor(tmp_path / "p", target)
    assert saved["backbone"] == "shared:1" and not (tmp_path / "p" / "backbone").exists()
    np.testing.assert_array_equal(np.array(loaded.scores(mx.array(ours))), np.array(predictor.scores(mx.array(ours))))
    with pytest.raises(IFPError, match="already exists"):
        save_predictor(tmp_path / "p", predictor, target.config)
    # Lengths instead of a mask, and a long prompt read whole (chunked through a KV cache).
    np.testing.assert_array_equal(np.array(predictor.features(tokens, mx.array([len(p) for p in PROMPTS]))), ours)
    long = [int(t) for t in np.random.default_rng(0).integers(0, 256, 700)]
    predictor.window = 0
    want = reference_features(config, weights, [long], num_layers=1)
    np.testing.assert_allclose(np.array(predictor.features([long])), want, atol=1e-4)


def test_predictor_reads_a_long_prompt_as_its_first_and_last_halves_of_the_window(tmp_path, target, target_dir):
    """Prompts up to the window are read whole; a longer one as its first and last
    window/2 tokens, also beside a short prompt in one padded batch; the window
    is saved with the predictor and read back."""
    config = json.loads((target_dir / "config.json").read_text())
    weights = tiny_weights(tiny_config("qwen2"), seed=0)
    predictor = create_predictor(target, "shared:1")
    assert predictor.window == 256
    predictor.window = 16
    rng = np.random.default_rng(1)
    long, short = [int(t) for t in rng.integers(0, 256, 40)], [int(t) for t in rng.integers(0, 256, 16)]
    want = reference_features(config, weights, [long[:8] + long[-8:], short], num_layers=1)
    tokens, mask = pad_batch([long, short])
    np.testing.assert_allclose(np.array(predictor.features(tokens, mask)), want, atol=1e-4)
    save_predictor(tmp_path / "p", predictor, target.config)
    assert json.loads((tmp_path / "p" / "config.json").read_text())["window"] == 16
    assert load_predictor(tmp_path / "p", target)[0].window == 16
    with pytest.raises(IFPError, match="bad predictor window 1"):
        create_predictor(target, "shared:1").__class__(8, 2, 4, window=1)


def test_separate_backbone_predictor_saves_a_self_contained_folder(tmp_path, target, target_dir):
    write_hf_folder(tmp_path / "hf", "llama", seed=4, **BACKBONE)
    backbone = convert(tmp_path / "hf", tmp_path / "small").out
    predictor = create_predictor(target, str(backbone))
    out = save_predictor(tmp_path / "p", predictor, target.config)
    assert (out / "backbone" / "ffn_bank.safetensors").exists()
    selector = PredictorSelector.for_model(target, out)
    assert selector.predictor.backbone.loaded.path == out / "backbone"
    np.testing.assert_array_equal(np.array(selector.select(PROMPTS[0], 48).indices), np.array(predictor.select(PROMPTS[:1], 48)[0]))


def test_errors_are_one_line(tmp_path, target, target_dir, layout_b):
    src, *_ = layout_b
    # A predictor for another model: refused by the converter and by the loader.
    write_hf_folder(tmp_path / "hf", "qwen2", intermediate_size=64)
    other = load(convert(tmp_path / "hf", tmp_path / "other").out, dense=False)
    with pytest.raises(IFPError, match="made for another model"):
        convert_predictor(src, tmp_path / "x", tmp_path / "other")
    out = convert_predictor(src, tmp_path / "pred", target_dir)
    with pytest.raises(IFPError, match="made for another model") as info:
        load_predictor(out, other)
    assert "\n" not in str(info.value)
    # A missing file, an unknown head key.
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("extractor.pt", "predictor_meta.json"):
        (broken / name).write_bytes((src / name).read_bytes())
    with pytest.raises(ConversionError, match="missing mask_head.pt"):
        convert_predictor(broken, tmp_path / "y", target_dir)
    layer_norm_head = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.LayerNorm(128), torch.nn.Linear(128, 192))
    torch.save(layer_norm_head.state_dict(), broken / "mask_head.pt")
    with pytest.raises(ConversionError, match="unknown head key '1.weight'"):
        convert_predictor(broken, tmp_path / "y", target_dir)
    (out / "predictor.safetensors").unlink()
    with pytest.raises(IFPError, match="predictor.safetensors not found"):
        load_predictor(out, target)
    with pytest.raises(IFPError, match="pass --predictor"):
        make_selector("predictor", other)  # no default predictor/ in its folder
    with pytest.raises(IFPError, match="shared:N"):
        create_predictor(target, "shared:x")


def test_cli_convert_generate_masks(tmp_path, target, target_dir, layout_b, cli):
    src, *_ = layout_b
    result = cli("convert-predictor", str(src), str(target_dir / "predictor"), "--model", str(target_dir), "--force")
    assert result.returncode == 0, result.stderr
    args = ("--model", str(target_dir), "-n", "3", "--no-chat-template")
    for extra in ((), ("--task", "Answer in French.")):  # the model's default predictor; per-task mode
        result = cli("generate", "hello there", "how are you", *args, "--selector", "predictor", *extra)
        assert result.returncode == 0, result.stderr
        stats = " ".join(result.stderr.split())
        assert "k 48/96" in stats and stats.count("ttft") == 2
    assert "gathers 2" not in stats  # per-task: one mask, gathered once
    result = cli("masks", "hello there", "the cat", "--model", str(target_dir), "--save", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    assert "prompt 1" in result.stdout and "layer   1:" in result.stdout and "overlap" in result.stdout
    assert (tmp_path / "m.safetensors").exists()
    result = cli("generate", "hi", *args, "--selector", "static", "--mask", str(tmp_path / "m.safetensors"))
    assert result.returncode == 0 and "k 48/96" in result.stderr, result.stderr
    result = cli("masks", "--task", "Translate.", "--model", str(target_dir), "--keep", "0.25", "--full", "--selector", "predictor")
    assert result.returncode == 0 and "k 24/96" in result.stdout, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("  layer   0:"))
    assert len(row.split(":")[1].split()) == 24


def test_cli_errors_and_help(tmp_path, target_dir, layout_b, cli):
    src, *_ = layout_b
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "extractor.pt").write_bytes((src / "extractor.pt").read_bytes())
    # One real process: exit status 2, one stderr line, no traceback.
    assert_one_line_error(ifp("convert-predictor", str(tmp_path / "src"), str(tmp_path / "o"), "--model", str(target_dir)), "missing mask_head.pt")
    assert_one_line_error(cli("generate", "hi", "--model", str(target_dir), "--selector", "predictor", "--predictor", str(tmp_path)), "not a predictor folder")
    assert_one_line_error(cli("masks", "hi", "--model", str(target_dir), "--selector", "dense"), "choose a pruning selector")
    assert_one_line_error(cli("convert-predictor", str(src), str(tmp_path / "o"), "--model", str(target_dir), "--activation", "relu"), "unknown --activation")
    for command in ("convert-predictor", "masks"):
        result = cli(command, "--help")
        assert result.returncode == 0 and "Example: ifp " + command in " ".join(result.stdout.split())


def test_mask_overlap():
    a = mx.array([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=mx.uint32)
    b = mx.array([[0, 1, 8, 9], [4, 5, 6, 7]], dtype=mx.uint32)
    assert mask_overlap(a, a, 10) == 1.0 and mask_overlap(a, b, 10) == 0.75


def test_smollm2_shared4_predictor_generates(smollm2, tmp_path):
    mx.random.seed(0)
    predictor = create_predictor(smollm2, "shared:4")
    save_predictor(tmp_path / "p", predictor, smollm2.config)
    engine = Engine.create(smollm2, make_selector("predictor", smollm2, predictor=tmp_path / "p"), keep=0.5)
    stats = GenerationStats()
    tokens = prompt_tokens(smollm2.tokenizer, "What is the capital of France?")
    text = "".join(engine.generate(tokens, GenerationConfig(max_tokens=4), stats))
    assert stats.submodel.k == 768 and stats.generation_tokens == 4 and text
    assert stats.phases["select"] < stats.phases["prefill"] + stats.phases["first token"] + 1.0


def test_shipped_predictor_works_out_of_the_box(smollm2):
    """The default model needs no --predictor: the package ships one for it, and its
    masks still depend on the prompt (the trainer's collapse bar on its probe prompts)."""
    from ifp_mlx.select.predictor import (
        has_predictor,
        load_predictor,
        shipped_predictor,
    )
    from ifp_mlx.train.trainer import (
        COLLAPSE_OVERLAP,
        diversity_pairs,
        mask_diversity,
        prompt_features,
    )

    folder = shipped_predictor(smollm2.config)
    assert folder is not None and has_predictor(smollm2)
    selector = make_selector("predictor", smollm2)
    engine = Engine.create(smollm2, selector, keep=selector.keep)
    tokens = prompt_tokens(smollm2.tokenizer, "Write a Python function that adds two numbers.")
    stats = GenerationStats()
    text = "".join(engine.generate(tokens, GenerationConfig(max_tokens=8), stats))
    assert text and stats.submodel.k == 768
    predictor, _ = load_predictor(folder, smollm2)
    overlap = mask_diversity(predictor, prompt_features(predictor, diversity_pairs(smollm2)), 768).mean()
    assert 0.5 < overlap < COLLAPSE_OVERLAP


def test_qwen_coder_has_a_shipped_predictor_and_adapter(qwen_dir):
    """`--keep 0.5` on Qwen2.5-Coder-0.5B uses its shipped predictor and adapter out of
    the box (found by the model's fingerprint), and a dense run afterwards is the
    model without them."""
    loaded = load(qwen_dir, dense=False)
    assert shipped_predictor(loaded.config).name == "qwen2.5-coder-0.5b"
    choice = choose(loaded, keep=0.5)
    assert choice.selector.name == "predictor" and "ffn" in choice.selector.adapter.targets
    engine = Engine.for_choice(loaded, choice)
    tokens = prompt_tokens(loaded.tokenizer, "Write a Python function that reverses a string.")
    stats = GenerationStats()
    assert "".join(engine.generate(tokens, GenerationConfig(max_tokens=4), stats))
    assert stats.submodel.k == loaded.d_ff // 2 and loaded.adapter is choice.selector.adapter
    assert any("down_lora" in mlp for mlp in loaded.mlps)
    Engine.for_choice(loaded, choose(loaded)).use(Selection(None))
    assert loaded.adapter is None and not any("down_lora" in mlp for mlp in loaded.mlps)
