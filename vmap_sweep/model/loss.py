"""Cross-entropy over a large vocabulary without holding full logits.

The lm_head matmul, the softcap and the cross-entropy are fused chunk by chunk: the forward computes the
gradients with respect to the hidden states and the lm_head weight while it has a chunk's logits in hand,
so no chunk's logits outlive the loop and the backward is a scale of the saved gradients. Under vmap every
model's logits are chunked the same way, so K stacked models never hold K full (tokens, vocab) fp32 tensors.
"""

from __future__ import annotations

import torch


def _chunk_loss_and_grads(h, w, targets, weights, softcap: float):
    """Weighted CE sum of one chunk, and d(loss)/d(h), d(loss)/d(w). h (n, C), w (V, C), targets (n,).

    In place wherever it can be: two (n, V) float32 buffers live at once, whatever the vocabulary.
    """
    t = (h @ w.t()).float().div_(softcap).tanh_()
    logits = t * softcap
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    safe_targets = targets.clamp(min=0).unsqueeze(-1)
    target_logit = logits.gather(-1, safe_targets)
    loss = ((lse - target_logit).squeeze(-1) * weights).sum()
    # d loss / d logits = (softmax - onehot) * weight; through the softcap: * (1 - tanh^2)
    grad = logits.sub_(lse).exp_()
    grad.scatter_add_(-1, safe_targets, -torch.ones_like(target_logit))
    grad.mul_(weights.unsqueeze(-1)).mul_(t.mul_(t).neg_().add_(1.0))  # square_ has no vmap rule: mul_
    dz = grad.to(h.dtype)
    return loss, dz @ w, dz.t() @ h


class _FusedLinearSoftcapCE(torch.autograd.Function):
    generate_vmap_rule = True  # plain torch ops only, so torch.func can vmap it

    @staticmethod
    def forward(h, w, targets, weights, softcap, chunk):
        n = h.shape[0]
        loss = h.new_zeros((), dtype=torch.float32)
        grad_h = []  # concatenated, not written into a buffer: h may be shared while the weights are per model
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            l, gh, gw = _chunk_loss_and_grads(h[sl], w, targets[sl], weights[sl], softcap)
            loss = loss + l
            grad_h.append(gh)
            grad_w = grad_w + gw.float()
        return loss, torch.cat(grad_h), grad_w.to(w.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, grad_h, grad_w = output
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(grad_h, grad_w)

    @staticmethod
    def backward(ctx, grad_loss, _gh, _gw):
        grad_h, grad_w = ctx.saved_tensors
        return grad_loss * grad_h, grad_loss * grad_w, None, None, None, None


def fused_linear_cross_entropy(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, softcap: float, chunk: int = 4096
) -> torch.Tensor:
    """sum_i weights[i] * CE(softcap(h[i] @ w.T), targets[i]); targets -1 must carry weight 0.

    h: (..., C) hidden states, w: (V, C) lm_head weight, targets/weights: (...) flattened alike.
    """
    h = h.reshape(-1, h.shape[-1])
    loss, _, _ = _FusedLinearSoftcapCE.apply(h, w, targets.reshape(-1), weights.reshape(-1), softcap, chunk)
    return loss


def reference_linear_cross_entropy(h, w, targets, weights, softcap: float) -> torch.Tensor:
    """The same quantity with full logits: the reference the fused version is tested against."""
    logits = softcap * torch.tanh((h @ w.t()).float() / softcap)
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).clamp(min=0), reduction="none"
    )
    return (ce * weights.reshape(-1)).sum()
