"""Predictor training: gradients, loss going down, resume, export, on tiny models."""

import re

import mlx.core as mx
import numpy as np
import pytest
from ifp_mlx.convert import ConvertOptions, convert
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear
from tiny import write_hf_folder

from ifp_mlx.errors import IFPError
from ifp_mlx.model.ffn import FFN_ADAPTERS
from ifp_mlx.model.load import load
from ifp_mlx.select.predictor import load_predictor
from ifp_mlx.train.lora import ATTENTION_KEYS, LORA_SCALE, add_lora, merge_lora
from ifp_mlx.train.trainer import (
    COLLAPSE_OVERLAP,
    TrainConfig,
    Trainer,
    diversity_pairs,
    export,
    make_pairs,
    start_predictor,
)

RECORDS = [
    {"id": str(i), "domain": d, "prompt": p, "response": r}
    for i, (d, p, r) in enumerate(
        [
            ("code", "write the function", "def f(x): return x"),
            ("code", "the function please", "def g(y): return y + 1"),
            ("math", "two plus two", "the answer is 4"),
            ("math", "three times three", "the answer is 9"),
            ("prose", "tell me the tale", "the the the theme"),
            ("prose", "a story", "once there was the end"),
        ]
    )
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_hf_folder(root / "hf", "llama", intermediate_size=64, num_hidden_layers=3)
    convert(root / "hf", root / "model", ConvertOptions(dtype="float32"))
    return root / "model"


def make_trainer(model_dir, out, **overrides) -> Trainer:
    loaded = load(model_dir, dense=False)
    config = TrainConfig(backbone="shared:1", head_hidden=16, batch_size=3, log_every=2, checkpoint_every=2, **overrides)
    predictor = start_predictor(loaded, config)
    pairs = make_pairs(loaded, RECORDS, config)
    return Trainer(loaded, predictor, pairs, config, out, diversity_pairs(loaded), log=lambda m: None)


def full_loss(trainer: Trainer) -> float:
    rows = mx.arange(len(trainer.pairs))
    if trainer.config.stage == "distill":
        return trainer._loss(rows).item()
    from ifp_mlx.train.trainer import sequence_batch

    tokens, mask = sequence_batch(trainer.pairs)
    return trainer._loss(rows, tokens=tokens, loss_mask=mask).item()


def test_gradients_reach_the_predictor(tiny, tmp_path):
    trainer = make_trainer(tiny, tmp_path, stage="sft")
    from ifp_mlx.train.trainer import sequence_batch

    tokens, mask = sequence_batch(trainer.pairs[:3])
    loss, grads = trainer.loss_and_grad(mx.arange(3), tokens=tokens, loss_mask=mask)
    flat = dict(tree_flatten(grads))
    assert {"predictor.proj.weight", "predictor.out.weight"} <= set(flat)
    assert float(mx.abs(flat["predictor.out.weight"]).sum()) > 0
    assert float(mx.abs(flat["predictor.proj.weight"]).sum()) > 0
    assert all(np.isfinite(np.array(g)).all() for g in flat.values())


@pytest.mark.parametrize("stage,lr", [("sft", 3e-2), ("distill", 3e-3)])
def test_a_few_steps_lower_the_loss(tiny, tmp_path, stage, lr):
    trainer = make_trainer(tiny, tmp_path, stage=stage, steps=12, learning_rate=lr)
    before = full_loss(trainer)
    trainer.train()
    assert full_loss(trainer) < before
    assert [h["step"] for h in trainer.history] == [2, 4, 6, 8, 10, 12]
    assert 0 <= trainer.history[-1]["overlap"] <= 1 and len(trainer.history[-1]["overlap_per_layer"]) == 3


@pytest.mark.parametrize("train_llm,lora_on", [("none", "attention"), ("lora", "attention"), ("lora", "all")])
def test_resume_continues_from_the_same_state(tiny, tmp_path, train_llm, lora_on):
    straight = make_trainer(tiny, tmp_path / "a", stage="sft", steps=4, train_llm=train_llm, lora_on=lora_on)
    straight.train()
    first = make_trainer(tiny, tmp_path / "b", stage="sft", steps=2, train_llm=train_llm, lora_on=lora_on)
    first.train()
    resumed = make_trainer(tiny, tmp_path / "b", stage="sft", steps=4, train_llm=train_llm, lora_on=lora_on)
    resumed.resume()
    assert resumed.step == 2
    resumed.train()
    a = dict(tree_flatten(straight.trainable.trainable_parameters()))
    b = dict(tree_flatten(resumed.trainable.trainable_parameters()))
    assert set(a) == set(b) and any(n.endswith(".lora_b") for n in a) == (train_llm == "lora")
    for name in a:
        np.testing.assert_allclose(np.array(a[name]), np.array(b[name]), rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("saved,now", [("lora", "none"), ("none", "lora"), ("lora:ffn", "lora:attention")])
def test_resume_with_other_parameters_is_a_one_line_error(tiny, tmp_path, saved, now):
    def settings(spec: str) -> dict:
        train_llm, _, on = spec.partition(":")
        return {"train_llm": train_llm, "lora_on": on or "attention"}

    make_trainer(tiny, tmp_path, stage="sft", steps=1, **settings(saved)).train()
    other = make_trainer(tiny, tmp_path, stage="sft", steps=2, **settings(now))
    with pytest.raises(IFPError, match="parameters do not match this run's") as error:
        other.resume()
    assert "\n" not in str(error.value) and other.step == 0


@pytest.mark.parametrize("minutes,expected", [(1e-9, [None, 1, 2]), (60.0, [None, None, None])])
def test_checkpoints_are_also_written_after_a_while(tiny, tmp_path, minutes, expected):
    """Slow steps (minutes each on a laptop CPU) must not wait 50 steps for a checkpoint."""
    import json

    trainer = make_trainer(tiny, tmp_path, stage="distill", steps=3)
    trainer.config.checkpoint_every, trainer.config.checkpoint_minutes = 100, minutes
    state = tmp_path / "checkpoint" / "state.json"
    seen = []
    trainer.train(lambda step, *_: seen.append(json.loads(state.read_text())["step"] if state.is_file() else None))
    assert seen == expected and json.loads(state.read_text())["step"] == 3


def test_export_loads_as_a_predictor(tiny, tmp_path):
    trainer = make_trainer(tiny, tmp_path / "work", stage="distill", steps=2)
    trainer.train()
    path = export(trainer, tmp_path / "pred")
    predictor, config = load_predictor(path, trainer.loaded)
    assert config["backbone"] == "shared:1" and config["keep"] == 0.5
    features = trainer.features[:2]
    np.testing.assert_allclose(np.array(predictor.scores(features)), np.array(trainer.predictor.scores(features)), atol=1e-6)


def adapter_names(model) -> set[str]:
    return {n for n, _ in tree_flatten(model.trainable_parameters())}


def test_a_fresh_adapter_leaves_the_logits_bit_identical(tiny):
    loaded = load(tiny)
    tokens = mx.array([[3, 5, 7, 9, 11]])
    before = np.array(loaded.model(tokens))
    add_lora(loaded.model, 1, rank=4)
    assert adapter_names(loaded.model) == {
        f"model.layers.{layer}.{key}.{part}" for layer in (1, 2) for key in ATTENTION_KEYS for part in ("lora_a", "lora_b")
    }
    projection = loaded.model.layers[1].self_attn.q_proj
    assert projection.lora_a.shape[1] == 4 and projection.scale == LORA_SCALE
    np.testing.assert_array_equal(np.array(loaded.model(tokens)), before)


def test_lora_needs_a_layer_after_the_backbone(tiny):
    loaded = load(tiny)
    with pytest.raises(IFPError, match="no layer after the first 3 of 3"):
        add_lora(loaded.model, 3, rank=4)


def test_lora_trains_adapters_and_merges(tiny, tmp_path):
    trainer = make_trainer(tiny, tmp_path / "work", stage="sft", steps=3, train_llm="lora", learning_rate=1e-2)
    names = {n for n, _ in tree_flatten(trainer.trainable.trainable_parameters())}
    assert any("lora_a" in n for n in names) and not any(".mlp." in n for n in names)
    assert not any("layers.0." in n for n in names)  # the shared backbone's layer stays frozen
    trainer.train()
    assert float(mx.abs(trainer.loaded.model.layers[2].self_attn.v_proj.lora_b).max()) > 0  # the adapters moved
    tokens = mx.array([[3, 5, 7, 9]])
    adapted = np.array(trainer.loaded.model(tokens))
    export(trainer, tmp_path / "pred")
    assert not adapter_names(trainer.loaded.model)  # fused: plain linears again
    merged = load(tmp_path / "pred-model")
    np.testing.assert_allclose(np.array(trainer.loaded.model(tokens)), adapted, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(merged.model(tokens)), adapted, rtol=1e-5, atol=1e-5)


def test_lora_on_smollm2_fuses_to_the_same_logits(smollm2_dir):
    """The real model: a fresh adapter changes nothing, a non-zero one fuses exactly."""
    loaded = load(smollm2_dir)  # its own copy: the session's SmolLM2 must stay unadapted
    tokens = mx.array([loaded.tokenizer.encode("The capital of France is")])
    dense = np.array(loaded.model(tokens))
    add_lora(loaded.model, 4, rank=8)
    np.testing.assert_array_equal(np.array(loaded.model(tokens)), dense)
    mx.random.seed(0)
    for _, module in loaded.model.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_b = 0.01 * mx.random.normal(module.lora_b.shape)
    adapted = np.array(loaded.model(tokens))
    assert np.abs(adapted - dense).max() > 1e-2
    merge_lora(loaded.model)
    assert not adapter_names(loaded.model)
    np.testing.assert_allclose(np.array(loaded.model(tokens)), adapted, rtol=1e-4, atol=1e-4)


def test_ffn_lora_starts_bit_identical_and_trains_after_the_backbone(tiny, tmp_path):
    loaded = load(tiny)
    tokens = mx.array([[3, 5, 7, 9, 11]])
    before = np.array(loaded.model(tokens))
    add_lora(loaded.model, 1, rank=4, on="ffn")
    assert adapter_names(loaded.model) == {
        f"model.layers.{layer}.mlp.{name}.{part}" for layer in (1, 2) for name in FFN_ADAPTERS for part in ("lora_a", "lora_b")
    }
    np.testing.assert_array_equal(np.array(loaded.model(tokens)), before)  # B = 0: a fresh adapter adds nothing
    trainer = make_trainer(tiny, tmp_path / "work", stage="sft", steps=3, train_llm="lora", lora_on="ffn", learning_rate=1e-2)
    trainer.train()
    mlp = trainer.loaded.model.layers[2].mlp
    assert float(mx.abs(mlp.down_lora.lora_b).max()) > 0 and float(mx.abs(mlp.gate_up_lora.lora_b).max()) > 0
    assert "down_lora" not in trainer.loaded.model.layers[0].mlp  # the shared backbone's layer stays as it was
    export(trainer, tmp_path / "pred")
    assert (tmp_path / "pred" / "adapter.safetensors").is_file() and not (tmp_path / "pred-model").exists()


def test_init_mask_starts_as_that_static_mask(tiny, tmp_path):
    from ifp_mlx.model.masks import save_mask
    from ifp_mlx.select.base import top_k

    loaded = load(tiny, dense=False)
    indices = mx.array(np.sort(np.random.default_rng(1).permutation(64)[:32]).astype(np.uint32))
    indices = mx.stack([indices] * loaded.num_layers)
    mask = save_mask(tmp_path / "m.safetensors", indices, loaded.config)
    config = TrainConfig(backbone="shared:1", head_hidden=16)
    predictor = start_predictor(loaded, config, init_mask=mask)
    tokens, lengths = mx.array([[3, 5, 7], [9, 11, 13]]), mx.array([3, 2])
    picked = top_k(predictor.scores(predictor.features(tokens, lengths)), 32)
    for row in np.array(picked):
        np.testing.assert_array_equal(row, np.array(indices))


def test_collapse_warning_fires_only_when_masks_stop_depending_on_the_prompt(tiny, tmp_path):
    """A predictor that is one static mask (zero weights) is collapsed; a fresh one is not."""
    from ifp_mlx.model.masks import save_mask

    loaded = load(tiny, dense=False)
    indices = mx.stack([mx.arange(0, 64, 2, dtype=mx.uint32)] * loaded.num_layers)
    mask = save_mask(tmp_path / "m.safetensors", indices, loaded.config)
    for init_mask, collapsed in ((mask, True), (None, False)):
        config = TrainConfig(backbone="shared:1", head_hidden=16, stage="distill", steps=1, log_every=1)
        logged = []
        predictor = start_predictor(loaded, config, init_mask=init_mask)
        trainer = Trainer(loaded, predictor, make_pairs(loaded, RECORDS, config), config, tmp_path / str(collapsed),
                          diversity_pairs(loaded), log=logged.append)
        trainer.train()
        assert (trainer.history[-1]["overlap"] > COLLAPSE_OVERLAP) == collapsed
        assert any("masks collapsed" in line for line in logged) == collapsed


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"stage": "bogus"}, "unknown --stage 'bogus'"),
        ({"distill_target": "reply"}, "unknown --distill-target 'reply'"),
        ({"train_llm": "full"}, "unknown --train-llm 'full'"),
        ({"steps": 0}, "--steps must be > 0"),
        ({"batch_size": -1}, "--batch-size must be > 0"),
        ({"learning_rate": 0.0}, "--lr must be > 0"),
        ({"temperature": 0.0}, "--temperature must be > 0"),
        ({"keep": 1.5}, "--keep must be in (0, 1]"),
        ({"lora_on": "mlp"}, "unknown --lora-on 'mlp': use one of attention, ffn, all"),
        ({"lora_rank": 0}, "--lora-rank must be > 0"),
    ],
)
def test_bad_settings_are_one_line_errors(overrides, message):
    from ifp_mlx.errors import IFPError

    with pytest.raises(IFPError, match=re.escape(message)):
        TrainConfig(**overrides).check()
    TrainConfig().check()


def test_distill_targets_are_computed_once_per_run_folder(tiny, tmp_path):
    logged = []
    first = make_trainer(tiny, tmp_path, stage="distill", steps=1)
    loaded, config = first.loaded, first.config
    again = Trainer(loaded, first.predictor, first.pairs, config, tmp_path, log=logged.append)
    assert any(line.startswith("targets from") for line in logged)
    np.testing.assert_array_equal(again.targets, first.targets)
    assert first.targets.sum() == len(first.pairs) * loaded.num_layers * first.k  # k channels per layer
    other = Trainer(loaded, first.predictor, first.pairs[:2], config, tmp_path, log=logged.append)
    assert other.targets.shape[0] == 2 and len(list(tmp_path.glob("targets-*.npy"))) == 2


@pytest.mark.parametrize("stage", ["distill", "sft"])
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, stage):
    """mlx.launch with the ring backend on this machine: the losses of 2 processes
    (each half of every batch, gradients summed) equal those of 1 process."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    write_hf_folder(tmp_path / "hf", "llama", intermediate_size=64, num_hidden_layers=3)
    convert(tmp_path / "hf", tmp_path / "model", ConvertOptions(dtype="float32"))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({**r, "domain": "writing" if r["domain"] == "prose" else r["domain"]}) + "\n" for r in RECORDS))
    launch = shutil.which("mlx.launch", path=os.path.dirname(sys.executable))
    histories = {}
    for processes in (1, 2):
        out = tmp_path / f"pred{processes}"
        command = [sys.executable, "-m", "ifp_mlx.cli.main", "train", str(data), "--model", str(tmp_path / "model"),
                   "--out", str(out), "--backbone", "shared:1", "--batch-size", "4", "--steps", "3", "--log-every", "1",
                   "--stage", stage, "--lr", "1e-2"]
        if processes > 1:
            command = [launch, "-n", str(processes), "--backend", "ring", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        if stage == "sft":  # resume both runs one step further
            again = [a if a != "3" else "4" for a in command] + ["--resume"]
            result = subprocess.run(again, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0 and "resumed at step 3" in result.stdout + result.stderr, result.stderr
        state = json.loads((tmp_path / f".pred{processes}.training" / "checkpoint" / "state.json").read_text())
        histories[processes] = [entry["loss"] for entry in state["history"]]
        assert (out / "predictor.safetensors").is_file()
    assert len(histories[1]) == (4 if stage == "sft" else 3)
    np.testing.assert_allclose(histories[2], histories[1], rtol=1e-4)
    assert histories[1][-1] != histories[1][0]  # it trained


def test_freeze_predictor_trains_the_adapters_alone(tiny, tmp_path):
    trainer = make_trainer(tiny, tmp_path / "work", stage="sft", steps=2, train_llm="lora", learning_rate=1e-2, freeze_predictor=True)
    head = {n: np.array(v) for n, v in tree_flatten(trainer.predictor.parameters())}
    names = {n for n, _ in tree_flatten(trainer.trainable.trainable_parameters())}
    assert names and all("lora_" in n for n in names)
    trainer.train()
    assert all(np.array_equal(v, np.array(dict(tree_flatten(trainer.predictor.parameters()))[n])) for n, v in head.items())
    assert float(mx.abs(trainer.loaded.model.layers[2].self_attn.v_proj.lora_b).max()) > 0
    with pytest.raises(IFPError, match="--freeze-predictor trains the LoRA adapters alone"):
        TrainConfig(stage="sft", freeze_predictor=True).check()
