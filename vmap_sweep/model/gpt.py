"""nanochat's GPT: the architecture of the Oct-Dec 2025 checkpoints (nanochat-d20 among them), and that of
nanochat since March 2026 (`architecture="nanochat-2026"`).

A plain nn.Module with nanochat's parameter names, so that `torch.func.functional_call` can drive it
with stacked parameters. Notable features, all from nanochat:
- rotary embeddings (half-split), no learned positions
- QK norm after RoPE
- untied weights for token embedding and lm_head
- relu^2 activation in the MLP
- RMS norm without learnable parameters
- no bias in any linear layer
- logit softcap 15 * tanh(logits / 15)
- group-query attention when n_kv_head < n_head
The 2026 architecture (nanochat/gpt.py from commit a825e63, 2026-03-14, to today) adds, each where nanochat has it:
- sliding-window attention per layer (window_pattern of S = a quarter of sequence_len rounded up to 128 tokens,
  L = sequence_len, tiled over the layers, the last layer always L), RoPE base 100000
- per-layer scalars resid_lambdas and x0_lambdas mixing the residual stream with the normed embedding x0
- smear: each position adds smear_lambda * sigmoid(smear_gate(x[:24])) of the previous position's embedding
- value embeddings on alternating layers (the last always), added to v through a per-head gate 3 * sigmoid
- queries and keys scaled by 1.2 after the QK norm
- backout: backout_lambda times the residual stream after layer n_layer // 2 subtracted before the final norm
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vmap_sweep.model.loss import fused_linear_cross_entropy

ARCH_2025, ARCH_2026 = "nanochat-2025", "nanochat-2026"
ARCHITECTURES = (ARCH_2025, ARCH_2026)
SMEAR_CHANNELS, VE_GATE_CHANNELS, QK_SCALE = 24, 12, 1.2  # nanochat's constants of the 2026 architecture


def has_value_embedding(layer: int, n_layer: int) -> bool:
    """nanochat's alternating value embeddings: every other layer, the last one always."""
    return layer % 2 == (n_layer - 1) % 2


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    # None = the dtype's machine epsilon (what native nanochat's F.rms_norm does); the HF port sets 1e-6.
    norm_eps: float | None = None
    rope_base: float = 10000.0
    softcap: float = 15.0
    architecture: str = ARCH_2025
    window_pattern: str = "L"  # the 2026 architecture's attention windows (see the module doc)

    @classmethod
    def from_depth(cls, depth: int, **overrides) -> GPTConfig:
        """nanochat's sizing rule: width 64 per layer, heads of 128 dims."""
        n_embd = 64 * depth
        n_head = max(1, (n_embd + 127) // 128)
        fields = dict(n_layer=depth, n_embd=n_embd, n_head=n_head, n_kv_head=n_head)
        fields.update(overrides)
        return cls(**fields)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def is_2026(self) -> bool:
        return self.architecture == ARCH_2026

    def window_sizes(self) -> list[int | None]:
        """Each layer's attention window, in keys before the query (None: the whole causal context), as nanochat
        computes them from window_pattern (the 2025 architecture: None everywhere)."""
        if not self.is_2026:
            return [None] * self.n_layer
        short = -(-self.sequence_len // 4 // 128) * 128
        sizes = [short if self.window_pattern.upper()[i % len(self.window_pattern)] == "S" else self.sequence_len
                 for i in range(self.n_layer)]
        sizes[-1] = self.sequence_len
        return sizes

    def to_dict(self) -> dict:
        return asdict(self)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """nanochat's estimate of a training step's FLOPs per token: 6 per matrix parameter (lm_head included,
        the embedding lookup not) plus 12 * layers * width * sequence for attention."""
        per_layer = 2 * self.n_embd * self.n_embd + 2 * self.n_embd * self.n_kv_head * self.head_dim
        per_layer += 8 * self.n_embd * self.n_embd  # MLP
        matrices = self.n_layer * per_layer + self.vocab_size * self.n_embd
        seq = seq_len or self.sequence_len
        if self.is_2026:  # the gates' matmuls, and attention over at most each layer's window
            matrices += SMEAR_CHANNELS + sum(VE_GATE_CHANNELS * self.n_kv_head for i in range(self.n_layer)
                                             if has_value_embedding(i, self.n_layer))
            return 6 * matrices + sum(12 * self.n_embd * min(w, seq) for w in self.window_sizes())
        return 6 * matrices + 12 * self.n_layer * self.n_embd * seq

    def validate(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; choose from {ARCHITECTURES}")
        if self.is_2026 and (self.n_embd < SMEAR_CHANNELS or not self.window_pattern
                             or set(self.window_pattern.upper()) - set("SL")):
            raise ValueError(f"the 2026 architecture needs n_embd >= {SMEAR_CHANNELS} and a window_pattern of S "
                             f"and L, not {self.n_embd} and {self.window_pattern!r}")


def norm(x: torch.Tensor, eps: float | None) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, D); cos/sin: (T, D/2) kept in float32 and cast to the activation dtype, as nanochat
    # (which stores them in bf16 and runs under bf16 autocast) sees them.
    d = x.shape[-1] // 2
    cos = cos[None, :, None, :].to(x.dtype)
    sin = sin[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], dim=-1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Causal attention of (B, H, T, D) queries, keys and values; with a window, each query sees itself and at most
    `window` keys before it (nanochat's sliding window, as its SDPA path computes it)."""
    T = q.size(-2)
    if window is None or window >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    pos = torch.arange(T, device=q.device)
    back = pos[:, None] - pos[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(back >= 0) & (back <= window))


class CausalSelfAttention(nn.Module):
    """The attention layer's weights; Block runs it in two halves around `causal_attention`."""

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.eps = config.norm_eps
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.qk_scale = QK_SCALE if config.is_2026 else None
        if config.is_2026 and has_value_embedding(layer, config.n_layer):
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ve: torch.Tensor | None = None):
        """Queries, keys and values (B, H, T, D) of x (B, T, C), keys and values expanded to every query head;
        ve (B, T, n_kv_head * D): the 2026 architecture's value embedding of the tokens, gated into v."""
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, n_kv_head)
            # under autocast v is bf16 and the embedding float32: added in v's dtype, as nanochat's bf16 model does
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim).to(v.dtype)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q, self.eps), norm(k, self.eps)  # QK norm, after RoPE
        if self.qk_scale is not None:
            q, k = q * self.qk_scale, k * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if self.n_kv_head != self.n_head:
            # Query head h reads kv head h // group. Expanding keeps the SDPA call on its fused kernels.
            group = self.n_head // self.n_kv_head
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        return q, k, v

    def project(self, y: torch.Tensor) -> torch.Tensor:
        """The output projection of the heads' outputs y (B, H, T, D) -> (B, T, C)."""
        B, H, T, D = y.shape
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.eps = config.norm_eps
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ve: torch.Tensor | None = None,
                window: int | None = None) -> torch.Tensor:
        return self.after_attention(x, causal_attention(*self.before_attention(x, cos, sin, ve), window))

    # The two halves around attention: a stack of models runs each half under vmap and attention in between
    # for all models at once (vmap_sweep/train/trainer.py).
    def before_attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ve: torch.Tensor | None = None):
        return self.attn.qkv(norm(x, self.eps), cos, sin, ve)

    def after_attention(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.project(y)
        return x + self.mlp(norm(x, self.eps))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.is_2026:
            n = config.n_layer
            self.resid_lambdas = nn.Parameter(torch.ones(n))
            self.x0_lambdas = nn.Parameter(torch.zeros(n))
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
            self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
            kv_dim = config.n_kv_head * config.head_dim
            self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim) for i in range(n)
                                               if has_value_embedding(i, n)})
        self.windows = config.window_sizes()
        cos, sin = self._rotary_tables(config.sequence_len)
        # Non-persistent buffers: never in a checkpoint, and functional_call reads them from the module,
        # so a stacked forward shares one copy across all models.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.ce_chunk = 4096  # rows of logits held at once by the fused cross-entropy

    def _rotary_tables(self, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        hd = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        return freqs.cos(), freqs.sin()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> GPT:
        """nanochat's init: embeddings N(0, 1), linears scaled by fan-in, output projections zero."""
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.mlp.c_proj.weight)
            nn.init.zeros_(block.attn.c_proj.weight)
        return self

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states (B, T, n_embd): everything before lm_head."""
        T = idx.size(-1)
        if T > self.cos.size(0):
            raise ValueError(f"sequence of {T} tokens is longer than the model's sequence_len {self.cos.size(0)}")
        cos, sin = self.cos[:T], self.sin[:T]
        eps = self.config.norm_eps
        x = norm(self.transformer.wte(idx), eps)
        if self.config.is_2026:
            return self._hidden_2026(idx, x, cos, sin)
        for block in self.transformer.h:
            x = block(x, cos, sin)
        return norm(x, eps)

    def _hidden_2026(self, idx: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The 2026 architecture's trunk after the normed embedding x, as nanochat's GPT.forward runs it."""
        eps = self.config.norm_eps
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., 1:, :SMEAR_CHANNELS]))
        x = torch.cat([x[..., :1, :], x[..., 1:, :] + gate * x[..., :-1, :]], dim=-2)
        x0, backout_layer, x_backout = x, self.config.n_layer // 2, None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, cos, sin, ve, self.windows[i])
            if i == backout_layer:
                x_backout = x
        if x_backout is not None:
            x = x - self.backout_lambda * x_backout
        return norm(x, eps)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        cap = self.config.softcap
        logits = self.lm_head(h)
        return cap * torch.tanh(logits / cap)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, T, vocab) without targets; with targets the mean cross-entropy over supervised ones
        (ignore_index -1); with loss_weights too, sum(weights * CE) through the fused chunked path, which
        never holds the full logits (targets -1 must carry weight 0)."""
        h = self.hidden(idx)
        if targets is None:
            return self.logits(h)
        if loss_weights is not None:
            w = self.lm_head.weight
            return fused_linear_cross_entropy(h, w, targets, loss_weights, self.config.softcap, self.ce_chunk)
        logits = self.logits(h)
        return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=-1)

    @torch.no_grad()
    def token_losses(self, idx: torch.Tensor, targets: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Per-token cross-entropy (B, T), 0 where the target is -1; logits are held a chunk of rows at a time."""
        h = self.hidden(idx).flatten(0, -2)
        flat = targets.flatten()
        out = torch.zeros(flat.shape, dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            sl = slice(start, start + chunk)
            # float32 after the matmul, as the fused loss computes it: the two are compared step by step
            cap = self.config.softcap
            logits = cap * torch.tanh((h[sl] @ self.lm_head.weight.t()).float() / cap)
            out[sl] = F.cross_entropy(logits, flat[sl].clamp(min=0), reduction="none") * (flat[sl] != -1)
        return out.view(targets.shape)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
