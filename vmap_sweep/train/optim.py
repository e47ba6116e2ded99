"""Optimizers on stacked tensors: every tensor has a leading model dimension K, every hyperparameter is (K,).

Updates run in place on slices of the stack that hold only active models, so a frozen model (finished, or
diverged with NaN in its gradients) keeps its weights and optimizer state bit for bit, and no copy of the
stack is ever made. Slices are also capped in size, which bounds the one float32 temporary of an update:
the stacked lm_head of 8 d20 models has 671M elements.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# nanochat's Newton-Schulz quintic coefficients
NS_COEFFS = (3.4445, -4.7750, 2.0315)
MAX_SLICE_ELEMENTS = 2**27


def _per_model(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(K,) -> (K, 1, 1, ...) broadcastable against a stacked tensor, on its device and in its dtype."""
    return x.reshape(-1, *([1] * (like.ndim - 1))).to(device=like.device, dtype=like.dtype)


def active_slices(active: torch.Tensor, per_model: int) -> list[slice]:
    """Runs of consecutive active models along dim 0, each run cut to at most MAX_SLICE_ELEMENTS elements."""
    width = max(1, MAX_SLICE_ELEMENTS // max(1, per_model))
    slices, run = [], []
    for k, on in enumerate(active.tolist() + [False]):
        if on and len(run) < width:
            run.append(k)
            continue
        if run:
            slices.append(slice(run[0], run[-1] + 1))
        run = [k] if on else []
    return slices


@dataclass
class AdamWHparams:
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    state_dtype: torch.dtype = torch.float32


class StackedAdamW:
    """torch.optim.AdamW's update, per model: its own lr and weight decay, its own step count.

    compile: one torch.compile'd call updates every tensor, each in one fused pass over (weights, gradients,
    moments), the inactive models masked out, instead of ten eager element-wise kernels per tensor and slice
    (what torch's own fused AdamW does for one model). Masking keeps the shapes, so a model that stops does not
    make it recompile.
    """

    def __init__(self, params: dict[str, torch.Tensor], hp: AdamWHparams, compile: bool = False):
        self.params, self.hp = params, hp
        self.exp_avg = {n: torch.zeros_like(p, dtype=hp.state_dtype) for n, p in params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p, dtype=hp.state_dtype) for n, p in params.items()}
        k = next(iter(params.values())).shape[0]
        self.steps = torch.zeros(k, dtype=torch.float64)
        self._fused = torch.compile(_adamw_update_all, dynamic=False) if compile else None

    @torch.no_grad()
    def step(self, lrs: dict[str, torch.Tensor], weight_decay: torch.Tensor, active: torch.Tensor) -> None:
        """lrs[name]: (K,) float64 learning rate of each model for that tensor; active: (K,) bool."""
        beta1, beta2 = self.hp.betas
        self.steps = torch.where(active, self.steps + 1, self.steps)
        t = self.steps.clamp(min=1)
        bias1 = 1 - beta1**t
        bias2_sqrt = (1 - beta2**t).sqrt()
        on_device = {}  # tensors share their group's lr: one host-to-device copy per distinct lr vector
        hparams = []
        for name, p in self.params.items():
            lr = lrs[name]
            key = (tuple(lr.tolist()), p.device, p.dtype, p.ndim)
            if key not in on_device:
                on_device[key] = [_per_model(x, p) for x in (1 - lr * weight_decay, bias2_sqrt, lr / bias1)]
            hparams.append(on_device[key])
        names = list(self.params)
        if self._fused is not None:
            self._fused([self.params[n] for n in names], [self.exp_avg[n] for n in names],
                        [self.exp_avg_sq[n] for n in names], [self.params[n].grad for n in names], hparams,
                        active.to(self.params[names[0]].device), beta1, beta2, self.hp.eps)
            return
        for name, (decay, bias2, step_size) in zip(names, hparams, strict=True):
            p, m, v = self.params[name], self.exp_avg[name], self.exp_avg_sq[name]
            for sl in active_slices(active, p[0].numel()):
                self._update(p[sl], m[sl], v[sl], p.grad[sl], decay[sl], bias2[sl], step_size[sl])

    def _update(self, p, m, v, g, decay, bias2_sqrt, step_size) -> None:
        beta1, beta2 = self.hp.betas
        g = g.to(m.dtype)
        p.mul_(decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        # the one float32 temporary (v.float() would alias v itself when v is float32)
        update = (v.sqrt() if v.dtype == torch.float32 else v.float().sqrt_()).div_(bias2_sqrt).add_(self.hp.eps)
        update = torch.div(m, update, out=update) if m.dtype == torch.float32 else m.float().div_(update)
        p.sub_(update.mul_(step_size))


def _adamw_update_all(params, exp_avgs, exp_avg_sqs, grads, hparams, active, beta1: float, beta2: float,
                      eps: float) -> None:
    """StackedAdamW._update on every tensor as expressions, for torch.compile to fuse; inactive models keep
    their weights and moments bit for bit (torch.where picks the old value)."""
    for p, m, v, g, (decay, bias2_sqrt, step_size) in zip(params, exp_avgs, exp_avg_sqs, grads, hparams,
                                                          strict=True):
        on = active.view(-1, *[1] * (p.ndim - 1))
        g = g.to(m.dtype)
        m_new = torch.lerp(m, g, 1 - beta1)
        v_new = v * beta2 + g * g * (1 - beta2)
        update = m_new.float() / (v_new.float().sqrt() / bias2_sqrt + eps)
        p.copy_(torch.where(on, p * decay - update * step_size, p))
        m.copy_(torch.where(on, m_new, m))
        v.copy_(torch.where(on, v_new, v))


def newton_schulz(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """nanochat's orthogonalization of each matrix in a stack (..., rows, cols), in bf16 as nanochat.

    Every operation is per matrix, so a stack gives bitwise the same result as a loop over its matrices.
    """
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = x @ x.mT
        B = b * A + c * A @ A
        x = a * x + B @ x
    if tall:
        x = x.mT
    return x


class StackedMuon:
    """nanochat's Muon (Nesterov momentum, Newton-Schulz) on stacked block matrices, per-model lr."""

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        momentum: float = 0.95,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.bfloat16,
        state_dtype: torch.dtype = torch.float32,
    ):
        self.params, self.momentum, self.ns_steps, self.ns_dtype = params, momentum, ns_steps, ns_dtype
        self.buf = {n: torch.zeros_like(p, dtype=state_dtype) for n, p in params.items()}

    @torch.no_grad()
    def step(self, lrs: dict[str, torch.Tensor], active: torch.Tensor) -> None:
        m = self.momentum
        for name, p in self.params.items():
            buf, grad = self.buf[name], p.grad
            slices = active_slices(active, p[0].numel())
            for sl in slices:
                buf[sl].lerp_(grad[sl].to(buf.dtype), 1 - m)
            # Newton-Schulz runs on the whole stack (each matrix on its own); only active models take it.
            update = newton_schulz(grad.lerp(buf.to(grad.dtype), m), self.ns_steps, self.ns_dtype).to(p.dtype)
            scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
            lr = _per_model(lrs[name] * scale, p)
            for sl in slices:
                p[sl].sub_(update[sl].mul_(lr[sl]))
