"""Cross-entropy over a large vocabulary without holding full logits, for one model or K stacked ones.

The lm_head matmul, the softcap and the cross-entropy are fused chunk by chunk: the forward computes the
gradients with respect to the hidden states and the lm_head weight while it has a chunk's logits in hand,
so no chunk's logits outlive the loop and the backward is a scale of the saved gradients. K stacked models
are chunked alike (the same rows at once, whatever K), so they never hold K full (tokens, vocab) fp32 tensors
and a model's sums do not depend on its companions.
"""

from __future__ import annotations

import torch


def _chunk_loss_and_grads(h, w, targets, weights, softcap: float, need_h: bool, need_w: bool):
    """Weighted CE (K, n) of one chunk's tokens, and d(loss)/d(h), d(loss)/d(w) where needed (else None).

    Per token, not summed: the caller sums outside any compiled code, since a compiled sum over a chunk's rows
    may round differently for another K, and a cell's numbers must not depend on its companions.

    h (K, n, C), w (K or 1, V, C), targets (n,), weights (K, n). In place wherever it can be: two (K, n, V)
    float32 buffers live at once, whatever the vocabulary.
    """
    t = (h @ w.mT).float().div_(softcap).tanh_()
    logits = t * softcap
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    safe_targets = targets.clamp(min=0).view(1, -1, 1).expand(h.shape[0], -1, 1)
    target_logit = logits.gather(-1, safe_targets)
    loss = (lse - target_logit).squeeze(-1) * weights
    if not (need_h or need_w):
        return loss, None, None
    # d loss / d logits = (softmax - onehot) * weight; through the softcap: * (1 - tanh^2)
    grad = logits.sub_(lse).exp_()
    grad.scatter_add_(-1, safe_targets, -torch.ones_like(target_logit))
    grad.mul_(weights.unsqueeze(-1)).mul_(t.mul_(t).neg_().add_(1.0))  # square_ has no vmap rule: mul_
    dz = grad.to(h.dtype)
    return loss, dz @ w if need_h else None, dz.mT @ h if need_w else None


def _chunk_loss_and_grads_two_pass(h, w, targets, weights, softcap: float, need_h: bool, need_w: bool):
    """The same arithmetic as `_chunk_loss_and_grads`, written for torch.compile: no in-place op and no scatter,
    so that the compiler keeps no float32 (K, n, V) buffer and reads the bf16 logits twice, once for the
    log-sum-exp and once for their gradient (the one-hot is a comparison with the vocabulary index). Eager, it
    would hold several float32 copies of the logits, which the in-place version avoids."""
    z = h @ w.mT
    t = torch.tanh(z.float() / softcap)
    logits = t * softcap
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    safe_targets = targets.clamp(min=0).view(1, -1, 1).expand(h.shape[0], -1, 1)
    target_logit = softcap * torch.tanh(z.gather(-1, safe_targets).float() / softcap)
    loss = (lse - target_logit).squeeze(-1) * weights
    if not (need_h or need_w):
        return loss, None, None
    onehot = (torch.arange(z.shape[-1], device=z.device) == safe_targets).float()
    dz = ((torch.exp(logits - lse) - onehot) * weights.unsqueeze(-1) * (1.0 - t * t)).to(h.dtype)
    return loss, dz @ w if need_h else None, dz.mT @ h if need_w else None


_compiled_chunk = None


def _chunk_fn(compiled: bool):
    """The chunk's arithmetic: in place when eager (least memory), the two-pass form when compiled (15-30% faster
    on an H100 than the in-place form compiled)."""
    global _compiled_chunk
    if not compiled:
        return _chunk_loss_and_grads
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_loss_and_grads_two_pass, dynamic=False)
    return _compiled_chunk


class _FusedLinearSoftcapCE(torch.autograd.Function):
    generate_vmap_rule = True  # plain torch ops only, so torch.func can vmap it

    @staticmethod
    def forward(h, w, targets, weights, softcap, chunk, compiled, need_h, need_w):
        device = h.device.type
        if torch.is_autocast_enabled(device):
            # one cast of the weights per call, not three per chunk as autocast would do
            dtype = torch.get_autocast_dtype(device)
            h, w = h.to(dtype), w.to(dtype)
        step = _chunk_fn(compiled)
        n = h.shape[1]
        loss = h.new_zeros(h.shape[0], dtype=torch.float32)
        grad_h = []  # concatenated, not written into a buffer: h may be shared while the weights are per model
        grad_w = None  # float32 sum over chunks; taken from the first chunk (a fresh buffer under vmap too)
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            l, gh, gw = step(h[:, sl], w, targets[sl], weights[:, sl], softcap, need_h, need_w)
            loss = loss + l.sum(-1)
            if need_h:
                grad_h.append(gh)
            if need_w:
                grad_w = gw.float() if grad_w is None else grad_w.add_(gw)
        return loss, torch.cat(grad_h, dim=1) if need_h else None, grad_w

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, w = inputs[0], inputs[1]
        _, grad_h, grad_w = output
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, w.dtype)
        ctx.mark_non_differentiable(*[g for g in (grad_h, grad_w) if g is not None])

    @staticmethod
    def backward(ctx, grad_loss, _gh, _gw):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss.view(-1, 1, 1)
        h_dtype, w_dtype = ctx.dtypes
        grad_h = None if grad_h is None else (scale * grad_h).to(h_dtype)
        grad_w = None if grad_w is None else (scale * grad_w).to(w_dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None


def stacked_linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                                 softcap: float, chunk: int = 4096, compiled: bool = False) -> torch.Tensor:
    """(K,) sum_i weights[k, i] * CE(softcap(h[k, i] @ w[k].T), targets[i]); targets -1 must carry weight 0.

    h: (K, ..., C) hidden states of K models, w: (K, V, C) their lm_head weights, or (V, C) one shared, frozen
    weight; targets (...) shared; weights (K, ...). compiled: torch.compile each chunk's arithmetic.
    """
    grad = torch.is_grad_enabled()
    # a frozen weight or an evaluation needs no gradient: skip those matmuls
    need_h, need_w = grad and h.requires_grad, grad and w.requires_grad
    if need_w and w.ndim == 2 and h.shape[0] > 1:
        raise ValueError("an lm_head weight shared by several models must be frozen (requires_grad False)")
    return _apply(h, w, targets, weights, softcap, chunk, compiled, need_h, need_w)


def fused_linear_cross_entropy(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, softcap: float, chunk: int = 4096
) -> torch.Tensor:
    """sum_i weights[i] * CE(softcap(h[i] @ w.T), targets[i]) of one model; targets -1 must carry weight 0.

    h: (..., C) hidden states, w: (V, C) lm_head weight, targets/weights: (...) flattened alike. Works under
    vmap, where requires_grad can't be read: with grad mode on, both gradients are computed.
    """
    grad = torch.is_grad_enabled()
    return _apply(h.unsqueeze(0), w.unsqueeze(0), targets, weights.unsqueeze(0), softcap, chunk, False, grad, grad)[0]


def _apply(h, w, targets, weights, softcap, chunk, compiled, need_h, need_w) -> torch.Tensor:
    k = h.shape[0]
    h = h.reshape(k, -1, h.shape[-1])
    w = w if w.ndim == 3 else w.unsqueeze(0)
    loss, _, _ = _FusedLinearSoftcapCE.apply(h, w, targets.reshape(-1), weights.reshape(k, -1), softcap, chunk,
                                             compiled, need_h, need_w)
    return loss
