"""Adapters trained with a predictor: used only when pruning, exact against the masked reference."""

import json

import mlx.core as mx
import numpy as np
import pytest
from test_train import make_trainer

from ifp_mlx.engine.engine import Engine
from ifp_mlx.engine.stats import GenerationConfig, GenerationStats
from ifp_mlx.model.adapter import ADAPTER_FILE
from ifp_mlx.model.bank import gather_rows
from ifp_mlx.model.load import load
from ifp_mlx.select.base import Selection
from ifp_mlx.select.choose import choose
from ifp_mlx.train.trainer import export

TOKENS = mx.array([[3, 5, 7, 9, 11, 13]])


@pytest.fixture(scope="module", params=["attention", "all"])
def trained(tmp_path_factory, request):
    """A tiny model and a predictor trained jointly with LoRA (exported with its
    adapter): on the attention alone, and on the attention and the FFN."""
    root = tmp_path_factory.mktemp("adapter")
    from ifp_mlx.convert import ConvertOptions, convert
    from tiny import write_hf_folder

    write_hf_folder(root / "hf", "llama", intermediate_size=64, num_hidden_layers=3)
    convert(root / "hf", root / "model", ConvertOptions(dtype="float32"))
    trainer = make_trainer(
        root / "model", root / "work", stage="sft", steps=3, train_llm="lora", learning_rate=1e-2, lora_on=request.param
    )
    trainer.train()
    export(trainer, root / "pred")
    return root / "model", root / "pred"


def test_the_adapter_is_saved_beside_the_predictor(trained):
    _, pred = trained
    config = json.loads((pred / "config.json").read_text())
    assert config["adapter"]["file"] == ADAPTER_FILE and (pred / ADAPTER_FILE).is_file()


def logits(loaded) -> np.ndarray:
    return np.array(loaded.model(TOKENS))


def test_dense_stays_bit_identical_after_pruned_runs(trained):
    model, pred = trained
    plain = logits(load(model))
    loaded = load(model, dense=False)
    engine = Engine.for_choice(loaded, choose(loaded, "predictor", keep=0.5, predictor=pred))
    assert engine.selector.adapter is not None
    "".join(engine.generate([3, 5, 7], GenerationConfig(max_tokens=3), GenerationStats()))
    assert loaded.adapter is engine.selector.adapter  # applied while pruned
    dense = Engine.for_choice(loaded, choose(loaded))
    "".join(dense.generate([3, 5, 7], GenerationConfig(max_tokens=3), GenerationStats()))
    assert loaded.adapter is None
    np.testing.assert_array_equal(logits(loaded), plain)


def test_pruned_with_the_adapter_equals_the_masked_reference_with_it(trained):
    model, pred = trained
    loaded = load(model, dense=False)
    selector = choose(loaded, "predictor", keep=0.5, predictor=pred).selector
    k = selector.default_k(loaded.d_ff)
    indices = selector.select([3, 5, 7], k).indices
    loaded.use_adapter(selector.adapter, indices)
    loaded.assign(gather_rows(loaded.bank(), indices))
    compact = logits(loaded)
    # the reference: the dense FFN with every unselected channel zeroed, the same adapter on (at full width)
    loaded.use_adapter(selector.adapter)
    loaded.assign(loaded.dense_ffn())
    mask = np.zeros((loaded.num_layers, loaded.d_ff), np.float32)
    np.put_along_axis(mask, np.array(indices).astype(np.int64), 1.0, axis=1)
    for mlp, row in zip(loaded.mlps, mask):
        mlp.channel_mask = mx.array(row)
    reference = logits(loaded)
    for mlp in loaded.mlps:
        mlp.channel_mask = None
    loaded.use_adapter(None)
    loaded.assign(gather_rows(loaded.bank(), indices))
    without = logits(loaded)  # the same submodel without the adapter
    np.testing.assert_allclose(compact, reference, rtol=1e-4, atol=1e-4)
    assert np.abs(compact - without).max() > 1e-4  # the adapter does something


def test_ffn_adapters_follow_the_submodel_and_come_off_for_dense(trained):
    """The FFN's updates are the kept channels' slice of the trained factors, and a
    dense run afterwards has none left on any layer."""
    model, pred = trained
    loaded = load(model, dense=False)
    engine = Engine.for_choice(loaded, choose(loaded, "predictor", keep=0.5, predictor=pred))
    adapter = engine.selector.adapter
    "".join(engine.generate([3, 5, 7], GenerationConfig(max_tokens=2), GenerationStats()))
    adapted = [mlp for mlp in loaded.mlps if "down_lora" in mlp]
    assert bool(adapted) == ("ffn" in adapter.targets)
    for mlp in adapted:
        a, b = adapter.weights[f"model.layers.{mlp.layer}.mlp.gate_up_lora"]
        assert mlp.gate_up_lora.lora_b.shape == (b.shape[0], 2 * mlp.width) and mlp.width < loaded.d_ff
        assert mlp.down_lora.lora_a.shape == (mlp.width, a.shape[1])
    Engine.for_choice(loaded, choose(loaded)).use(Selection(None))
    assert not any("down_lora" in mlp or "gate_up_lora" in mlp for mlp in loaded.mlps)


def test_ffn_updates_are_sliced_once_per_selection(trained):
    """A selection used again (a cached submodel, the next turn) keeps its slices; a
    different one gets its own, equal to slicing the factors afresh."""
    model, pred = trained
    loaded = load(model, dense=False)
    engine = Engine.for_choice(loaded, choose(loaded, "predictor", keep=0.5, predictor=pred))
    first = engine.select([3, 5, 7])
    engine.use(first)
    if "ffn" not in engine.selector.adapter.targets:  # an attention-only adapter slices nothing
        assert not any("down_lora" in mlp for mlp in loaded.mlps)
        return
    sliced = loaded.mlps[-1].down_lora
    engine.use(first)
    assert loaded.mlps[-1].down_lora is sliced
    other = Selection(mx.array(np.array(first.indices)[:, ::-1].copy()))  # the same channels, in another order
    engine.use(other)
    assert loaded.mlps[-1].down_lora is not sliced
    a, _ = engine.selector.adapter.weights[f"model.layers.{loaded.mlps[-1].layer}.mlp.down_lora"]
    expected = np.array(a)[np.array(other.indices[loaded.mlps[-1].layer]).astype(np.int64)]
    np.testing.assert_array_equal(np.array(loaded.mlps[-1].down_lora.lora_a), expected)
