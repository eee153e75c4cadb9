"""SoftTopK: the budget holds exactly, T -> 0 is the hard top-k, gradients reach the scores."""

import mlx.core as mx
import numpy as np
import pytest

from ifp_mlx.train.softtopk import soft_top_k, topk_indicator, topk_mask


def scores(shape, seed=0, scale=3.0) -> mx.array:
    return mx.array(np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale)


@pytest.mark.parametrize(
    "shape, k, temperature",
    [((3, 50), 5, 1.0), ((2, 4, 256), 64, 0.1), ((30, 1536), 384, 0.01), ((8, 100), 1, 0.5), ((4, 64), 63, 10.0), ((2, 512), 100, 1e-4)],
)
def test_sums_to_k(shape, k, temperature):
    lam = soft_top_k(scores(shape), k, temperature)
    assert lam.shape == shape and lam.dtype == mx.float32
    assert mx.abs(lam.sum(axis=-1) - k).max().item() < 1e-3
    assert lam.min().item() >= 0 and lam.max().item() <= 1


def test_low_temperature_is_the_hard_top_k():
    z = scores((6, 200), seed=1)
    hard = topk_indicator(z, 20)
    assert (hard.sum(axis=-1) == 20).all().item()
    expected = np.zeros((6, 200), np.float32)
    np.put_along_axis(expected, np.argsort(-np.array(z), axis=-1)[:, :20], 1.0, axis=-1)
    assert np.array_equal(np.array(hard), expected)
    assert mx.abs(soft_top_k(z, 20, 1e-4) - hard).max().item() < 1e-3
    assert mx.abs(topk_mask(z, 20, 1e-4) - hard).max().item() < 1e-3
    # Higher temperatures move away from it, keeping the budget.
    assert mx.abs(soft_top_k(z, 20, 1.0) - hard).max().item() > 0.1


def test_mask_keeps_exactly_k_channels_even_with_ties():
    z = mx.zeros((3, 10))
    mask = topk_mask(z, 4, 0.1)
    assert ((mask > 0).sum(axis=-1) == 4).all().item()
    assert mx.allclose(mask.sum(axis=-1), mx.array([1.6, 1.6, 1.6]))  # lambda = 4/10 each


def test_gradients_reach_the_scores():
    z = scores((4, 64), seed=2)
    weights = scores((4, 64), seed=3)

    def loss(z):
        return (topk_mask(z, 8, 0.5) * weights).sum()

    grad = mx.grad(loss)(z)
    selected = np.array(topk_indicator(z, 8)) > 0
    g = np.array(grad)
    assert np.isfinite(g).all()
    assert (np.abs(g[selected]) > 0).all()
    # Through tau, each row's gradient sums to zero: only the order of the scores matters.
    assert np.abs(g.sum(axis=-1)).max() < 1e-4


def test_gradient_matches_finite_differences_of_the_true_function():
    z = scores((2, 12), seed=4, scale=1.0)
    weights = scores((2, 12), seed=5)

    def loss(z):
        return (soft_top_k(z, 3, 1.0, iterations=60) * weights).sum()

    grad = np.array(mx.grad(loss)(z))
    eps = 1e-2
    for index in [(0, 0), (0, 5), (1, 11)]:
        step = np.zeros((2, 12), np.float32)
        step[index] = eps
        numeric = (loss(z + mx.array(step)).item() - loss(z - mx.array(step)).item()) / (2 * eps)
        assert abs(numeric - grad[index]) < 2e-3 + 0.02 * abs(numeric)


def test_budget_holds_to_first_order():
    z = scores((3, 40), seed=6)
    direction = scores((3, 40), seed=7)
    _, change = mx.jvp(lambda z: soft_top_k(z, 10, 0.3).sum(axis=-1), [z], [direction])
    assert mx.abs(change[0]).max().item() < 1e-3


def test_k_equal_n_and_k_one():
    z = scores((5, 16), seed=8)
    assert mx.array_equal(soft_top_k(z, 16, 0.5), mx.ones((5, 16)))
    assert mx.array_equal(topk_mask(z, 16, 0.5), mx.ones((5, 16)))
    assert mx.all(mx.grad(lambda z: topk_mask(z, 16, 0.5).sum())(z) == 0).item()
    one = topk_mask(z, 1, 0.01)
    assert ((one > 0).sum(axis=-1) == 1).all().item()
    assert mx.array_equal(mx.argmax(one, axis=-1), mx.argmax(z, axis=-1))


def test_half_precision_in_and_out():
    lam = soft_top_k(scores((4, 128)).astype(mx.float16), 32, 0.5)
    assert lam.dtype == mx.float16
    assert mx.abs(lam.astype(mx.float32).sum(axis=-1) - 32).max().item() < 0.1


def test_bad_arguments():
    z = scores((2, 8))
    for k in (0, 9):
        with pytest.raises(ValueError, match="k must be"):
            soft_top_k(z, k, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        soft_top_k(z, 2, 0.0)
