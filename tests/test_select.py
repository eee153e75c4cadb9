"""The selector interface, the one choose() rule, index checks and the static default."""

import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from ifp_mlx.engine.engine import Engine
from ifp_mlx.errors import IFPError
from ifp_mlx.files import ifp_home
from ifp_mlx.model.bank import check_indices
from ifp_mlx.model.masks import save_mask
from ifp_mlx.select.base import Selection, Selector, resolve_k, top_k
from ifp_mlx.select.calibrate import activation_sums, builtin_chunks, builtin_scores
from ifp_mlx.select.choose import SELECTORS, choose, make_selector

IFP = [sys.executable, "-m", "ifp_mlx.cli.main"]


@pytest.mark.parametrize("name", SELECTORS)
def test_every_selector_implements_the_protocol(smollm2, name):
    selector = make_selector(name, smollm2)
    assert isinstance(selector, Selector)
    assert selector.name == name
    assert 8 <= selector.default_k(smollm2.d_ff) <= smollm2.d_ff


def test_choose_defaults(smollm2, tmp_path):
    d_ff = smollm2.d_ff
    assert choose(smollm2).selector.name == "dense" and choose(smollm2).k == d_ff
    assert choose(smollm2, keep=0.5).selector.name == "predictor"  # the shipped predictor
    assert choose(smollm2, prune=True).k == resolve_k(d_ff, 0.5)
    picked = choose(smollm2, "random", k=100)
    assert (picked.k, picked.requested_k) == (104, 100)
    mask = save_mask(tmp_path / "m", top_k(mx.random.uniform(shape=(smollm2.num_layers, d_ff)), 200), smollm2.config)
    from_mask = choose(smollm2, mask=mask)
    assert (from_mask.selector.name, from_mask.k) == ("static", 200)  # the mask's own k


@pytest.mark.parametrize(
    "options, message",
    [
        ({"selector": "activations", "mask": "m.safetensors"}, "--mask goes with --selector static"),
        ({"selector": "static", "predictor": "p"}, "--predictor goes with --selector predictor"),
        ({"selector": "dense", "keep": 0.5}, "--selector dense keeps every channel"),
        ({"selector": "magic"}, "unknown selector 'magic'"),
        ({"keep": 0.0}, "--keep must be in (0, 1]"),
    ],
)
def test_choose_refuses(smollm2, options, message):
    with pytest.raises(IFPError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        choose(smollm2, **options)


def test_check_indices():
    good = mx.array([[0, 5], [3, 9]], dtype=mx.uint32)
    assert check_indices(good, 2, 10).dtype == mx.uint32
    with pytest.raises(IFPError, match="channel 10, outside 0..9"):
        check_indices(mx.array([[0, 10], [1, 2]]), 2, 10)
    with pytest.raises(IFPError, match="channel -1"):
        check_indices(mx.array([[0, -1], [1, 2]]), 2, 10)
    with pytest.raises(IFPError, match=r"must be \[layers=2, k\]"):
        check_indices(mx.array([0, 1]), 2, 10)
    with pytest.raises(IFPError, match="float32 values"):
        check_indices(mx.array([[0.0, 1.0], [1.0, 2.0]]), 2, 10)


class OutOfRange:
    """A selector with a bug: it names a channel past the model's FFN width."""

    name, needs_dense = "broken", False

    def default_k(self, d_ff: int) -> int:
        return 8

    def select(self, tokens: list[int], k: int) -> Selection:
        return Selection(mx.full((30, 8), 1 << 20, dtype=mx.uint32))


def test_engine_checks_every_selection(smollm2):
    with pytest.raises(IFPError, match="the broken selection names channel 1048576, outside 0..1535"):
        Engine(smollm2, OutOfRange()).select([1, 2, 3])


def test_out_of_range_mask_file_is_one_line_error(smollm2_dir, smollm2, tmp_path):
    """Before, this mask made `ifp generate` die with a segmentation fault."""
    indices = np.tile(np.arange(768, dtype=np.uint32), (smollm2.num_layers, 1))
    indices[-1, -1] = 1048576
    mask = save_mask(tmp_path / "bad", mx.array(indices), smollm2.config)
    result = subprocess.run(
        [*IFP, "generate", "hi", "-m", str(smollm2_dir), "-n", "2", "--selector", "static", "--mask", str(mask)],
        capture_output=True, text=True,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "names channel 1048576, outside 0..1535" in lines[0], result.stderr


def test_static_without_mask_is_calibrated_on_the_builtin_text_and_cached(smollm2):
    chunks = builtin_chunks(smollm2)
    assert len(chunks) >= 15 and all(len(c) > 10 for c in chunks)
    assert smollm2.tokenizer.decode(chunks[0]).startswith("<|im_start|>")  # through the chat template
    scores = builtin_scores(smollm2)
    cached = list((ifp_home() / "calibration").glob("*.safetensors"))
    assert cached, "the scores are cached"
    assert mx.array_equal(builtin_scores(smollm2), scores)
    k = resolve_k(smollm2.d_ff, 0.5)
    selection = make_selector("static", smollm2).select([1, 2], k)
    assert mx.array_equal(selection.indices, top_k(scores, k))
    # the cache holds exactly what a fresh calibration computes
    assert mx.allclose(activation_sums(smollm2, chunks), scores, rtol=1e-5, atol=1e-5)


def test_static_without_mask_answers_with_words(smollm2_dir):
    """Weight norms gave 16 newlines here; the calibrated default gives text."""
    result = subprocess.run(
        [*IFP, "generate", "What is the capital of France?", "-m", str(smollm2_dir), "-n", "12", "--keep", "0.5", "--selector", "static"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) >= 4, repr(result.stdout)
