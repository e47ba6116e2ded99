"""The fused lm_head + softcap + cross-entropy equals the full-logits reference, values and gradients."""

import pytest
import torch
from helpers import reference_linear_cross_entropy
from torch.func import vmap

from vmap_sweep.model.loss import (
    _chunk_loss_and_grads,
    _chunk_loss_and_grads_two_pass,
    fused_linear_cross_entropy,
    stacked_linear_cross_entropy,
)


def test_fused_cross_entropy_matches_reference_under_vmap():
    gen = torch.Generator().manual_seed(0)
    K, N, C, V = 3, 50, 16, 40
    h = torch.randn(K, N, C, generator=gen, requires_grad=True)
    w = torch.randn(K, V, C, generator=gen, requires_grad=True)
    targets = torch.randint(-1, V, (N,), generator=gen)
    base = (targets >= 0).float() / (targets >= 0).sum()
    weights = torch.stack([base, 2 * base, 0 * base])  # per-model weights; the last model sees nothing
    fused = vmap(lambda h, w, wt: fused_linear_cross_entropy(h, w, targets, wt, 15.0, chunk=7))(h, w, weights)
    grads = torch.autograd.grad(fused.sum(), (h, w))
    ref = vmap(lambda h, w, wt: reference_linear_cross_entropy(h, w, targets, wt, 15.0))(h, w, weights)
    ref_grads = torch.autograd.grad(ref.sum(), (h, w))
    assert torch.allclose(fused, ref, rtol=1e-6, atol=1e-6)
    assert fused[2] == 0 and torch.all(grads[0][2] == 0)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-6)


def test_chunk_size_does_not_change_the_value_beyond_rounding():
    gen = torch.Generator().manual_seed(1)
    h, w = torch.randn(33, 8, generator=gen), torch.randn(20, 8, generator=gen)
    targets = torch.randint(0, 20, (33,), generator=gen)
    weights = torch.full((33,), 1 / 33)
    values = [fused_linear_cross_entropy(h, w, targets, weights, 15.0, chunk=c) for c in (1, 5, 33, 100)]
    assert all(torch.allclose(v, values[0], rtol=1e-6) for v in values)


def _problem(seed: int = 2, K: int = 3, N: int = 40, C: int = 16, V: int = 48):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(K, N, C, generator=gen)
    w = torch.randn(K, V, C, generator=gen)
    targets = torch.randint(-1, V, (N,), generator=gen)
    base = (targets >= 0).float() / (targets >= 0).sum()
    weights = torch.stack([base * (k + 1) for k in range(K)])
    return h, w, targets, weights


def _reference(h, w, targets, weights):
    return torch.stack([reference_linear_cross_entropy(h[k], w[k] if w.ndim == 3 else w, targets, weights[k], 15.0)
                        for k in range(h.shape[0])])


@pytest.mark.parametrize("compiled", [False, True])
def test_stacked_cross_entropy_matches_reference_per_model(compiled):
    h, w, targets, weights = _problem()
    h.requires_grad_(True), w.requires_grad_(True)
    got = stacked_linear_cross_entropy(h, w, targets, weights, 15.0, chunk=7, compiled=compiled)
    grads = torch.autograd.grad(got.sum(), (h, w))
    ref = _reference(h, w, targets, weights)
    ref_grads = torch.autograd.grad(ref.sum(), (h, w))
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_pass_chunk_is_the_in_place_arithmetic_bitwise(dtype):
    """The compiled path's form of a chunk (no in-place op, no scatter) computes the very same numbers."""
    h, w, targets, weights = _problem(seed=3)
    h, w = h.to(dtype), w.to(dtype)
    weights[1, :5] = 0  # a budget that ends inside the chunk
    for need in [(True, True), (True, False), (False, False)]:
        a = _chunk_loss_and_grads(h, w, targets, weights, 15.0, *need)
        b = _chunk_loss_and_grads_two_pass(h, w, targets, weights, 15.0, *need)
        for x, y in zip(a, b, strict=True):
            assert (x is None and y is None) or torch.equal(x, y)


def test_shared_frozen_weight_and_evaluation_skip_gradients_but_not_the_value():
    h, w, targets, weights = _problem()
    shared = w[0]
    h.requires_grad_(True)
    got = stacked_linear_cross_entropy(h, shared, targets, weights, 15.0, chunk=5)
    (grad_h,) = torch.autograd.grad(got.sum(), (h,))
    ref = _reference(h, shared, targets, weights)
    (ref_grad_h,) = torch.autograd.grad(ref.sum(), (h,))
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(grad_h, ref_grad_h, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(stacked_linear_cross_entropy(h, shared, targets, weights, 15.0, chunk=5), got.detach())
    with pytest.raises(ValueError, match="must be frozen"):
        stacked_linear_cross_entropy(h, shared.clone().requires_grad_(True), targets, weights, 15.0)


def test_autocast_computes_in_its_dtype_and_returns_gradients_in_the_inputs_dtypes():
    h, w, targets, weights = _problem()
    h.requires_grad_(True), w.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = stacked_linear_cross_entropy(h, w, targets, weights, 15.0, chunk=7)
    grads = torch.autograd.grad(got.sum(), (h, w))
    low = _reference(h.bfloat16().float(), w.bfloat16().float(), targets, weights)  # inputs rounded as bf16
    assert got.dtype == torch.float32 and torch.allclose(got, low, rtol=2e-2)
    assert grads[0].dtype == h.dtype and grads[1].dtype == w.dtype
