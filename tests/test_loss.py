"""The fused lm_head + softcap + cross-entropy equals the full-logits reference, values and gradients."""

import torch
from torch.func import vmap

from vmap_sweep.model.loss import fused_linear_cross_entropy, reference_linear_cross_entropy


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
