"""SoftTopK: differentiable per-layer channel masks for training the predictor.

IFPruning trains the sparsity predictor through the LLM's loss, so the mask
must carry gradients back to the predictor's scores ``z``. Per row (one LLM
layer), ``lambda_i = sigmoid((z_i - tau) / T)`` with the threshold ``tau``
chosen so that ``sum(lambda) = k``: every layer spends exactly its budget of
``k`` channels, softly. The training mask is ``lambda * TopK(lambda)``: the
forward pass uses exactly ``k`` channels (as inference will), scaled by their
soft weights, and gradients flow through ``lambda``.

``tau`` is found by bisection on detached scores (no autograd graph for the
search). Its gradient is then restored by the implicit function theorem:
from ``sum_i sigmoid((z_i - tau) / T) = k``, ``d tau / d z_j = s_j / sum_i s_i``
with ``s = lambda * (1 - lambda)``. Adding ``sum_j w_j (z_j - stop(z_j))``
with ``w = stop(s / sum(s))`` to the detached ``tau`` adds zero to its value
and exactly that derivative, so ``mx.grad`` differentiates the true function:
the constraint ``sum(lambda) = k`` holds to first order under a gradient step
and each row's gradient sums to zero (only the scores' order matters). With
``tau`` simply detached, the gradient would also push the total up or down,
which the next forward pass undoes anyway.
"""

import math

import mlx.core as mx

from ..select.base import top_k


def _check(n: int, k: int, temperature: float) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _bisect_threshold(z: mx.array, k: int, temperature: float, iterations: int) -> mx.array:
    """Per-row ``tau`` [..., 1] with ``sum(sigmoid((z - tau) / T)) = k``, for 1 <= k < n.

    The sum falls monotonically in tau. With ``c = T * logit(k / n)``, every
    term at ``tau = min(z) - c`` is at least ``k / n`` and every term at
    ``tau = max(z) - c`` at most ``k / n``, so the root lies between them and
    each iteration halves the gap (float32 resolution after about 30).
    """
    n = z.shape[-1]
    c = temperature * math.log(k / (n - k))
    lo = z.min(axis=-1, keepdims=True) - c
    hi = z.max(axis=-1, keepdims=True) - c
    for _ in range(iterations):
        mid = (lo + hi) / 2
        above = mx.sigmoid((z - mid) / temperature).sum(axis=-1, keepdims=True) > k
        lo = mx.where(above, mid, lo)
        hi = mx.where(above, hi, mid)
    return (lo + hi) / 2


def soft_top_k(z: mx.array, k: int, temperature: float, iterations: int = 32) -> mx.array:
    """Soft weights ``lambda`` in [0, 1] with ``sum(lambda) = k`` along the last axis.

    ``z``: scores [..., n], one row per layer (any leading shape). Computed in
    float32 and returned in ``z``'s dtype. As ``temperature -> 0`` lambda tends
    to the hard top-k indicator; larger temperatures spread the budget. With
    ``k = n`` every weight is 1 (and carries no gradient).
    """
    n = z.shape[-1]
    _check(n, k, temperature)
    if k == n:
        return mx.ones_like(z)
    x = z.astype(mx.float32)
    fixed = mx.stop_gradient(x)
    tau = _bisect_threshold(fixed, k, temperature, iterations)
    lam = mx.sigmoid((fixed - tau) / temperature)
    s = lam * (1 - lam)
    weights = s / mx.maximum(s.sum(axis=-1, keepdims=True), 1e-30)
    tau = tau + (weights * (x - fixed)).sum(axis=-1, keepdims=True)
    return mx.sigmoid((x - tau) / temperature).astype(z.dtype)


def topk_indicator(z: mx.array, k: int) -> mx.array:
    """Constant 0/1 mask [..., n] with exactly k ones per row at the largest scores.

    Ranking ``z`` picks the same channels as ranking ``lambda`` (sigmoid is
    monotone) but still breaks ties where lambda has saturated to 0 or 1.
    """
    picked = top_k(mx.stop_gradient(z), k)
    ones = mx.ones(picked.shape, dtype=z.dtype)
    return mx.put_along_axis(mx.zeros_like(z), picked, ones, axis=-1)


def topk_mask(z: mx.array, k: int, temperature: float, iterations: int = 32) -> mx.array:
    """The training mask ``lambda * TopK(lambda)``: k nonzero channels per row, soft-weighted.

    Gradients reach ``z`` through the soft weights of the selected channels
    (and, via tau, every channel of the row); the indicator is a constant.
    """
    lam = soft_top_k(z, k, temperature, iterations)
    return lam * topk_indicator(z, k)
