"""K fine-tunes of one base model in one vectorized step: functional_call under vmap (the loop: trunk.py).

Data is shared (the input has no model dimension); only the weights and the hyperparameters differ.
Every per-model quantity is a (K,) tensor, and nothing is ever reduced across the model dimension, so a
model's trajectory does not depend on its companions, and one model's divergence never touches another.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from vmap_sweep.data.stream import budget_mask
from vmap_sweep.model.gpt import GPT, Block, causal_attention, norm
from vmap_sweep.model.loss import stacked_linear_cross_entropy
from vmap_sweep.study.config import GROUPS, OPTIMIZERS, SCHEDULES, check_micro_batch_size, tokens_per_step
from vmap_sweep.study.plan import steps_for
from vmap_sweep.train.optim import AdamWHparams, StackedAdamW, StackedMuon
from vmap_sweep.train.stack import group_of, split_params, unstack

# Attention runs outside vmap, on every model's heads at once (the models folded into the batch), where any
# SDPA kernel applies: cuDNN's on an H100, as for a single model. Under vmap, cuDNN's kernel gives NaN gradients
# and the memory-efficient one refuses the batched layout (torch 2.11).
SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
# nanochat's SFT recipe (chat_sft.py, Oct 2025): Muon lr 0.02 on block matrices, AdamW 0.2*s on the
# embedding and 0.004*s on lm_head (s = (n_embd/768)^-0.5), all times init_lr_frac 0.02.
NANOCHAT_INIT_LR_FRAC = 0.02
NANOCHAT_MATRIX_LR = 0.02
NANOCHAT_EMBEDDING_LR = 0.2
NANOCHAT_UNEMBEDDING_LR = 0.004


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "adamw"  # "adamw", or "nanochat": Muon on block matrices + AdamW on (un)embedding
    schedule: str = "constant"  # constant | linear (to zero, nanochat SFT) | cosine
    rows_per_step: int = 8  # rows of seq_len per optimizer step (tokens per step: `tokens_per_step`)
    seq_len: int = 1024
    micro_batch_size: int | None = None  # rows per forward/backward (gradient accumulation); None = all
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    trainable: tuple[str, ...] = GROUPS  # frozen groups are shared across models, never stacked
    # diverged (and frozen) once a model's loss exceeds this many times the base model's loss on the same
    # tokens; relative, since a small model's loss on a few supervised tokens can be high for any model
    divergence_ratio: float = 10.0
    # nanochat runs Newton-Schulz in bf16; float32 makes runs comparable to the ulp (bf16 rounding
    # amplifies float32 rounding differences between any two implementations).
    muon_ns_dtype: str = "bfloat16"
    # Rows of logits each model holds at once (K times this in all); None: ce_chunk_rows(n_embd). Fixed, not
    # shared out by K: the chunking sets the order of the sums, and a cell's numbers must not depend on how many
    # companions it has.
    ce_chunk: int | None = None
    autocast: bool = True  # bf16 autocast on CUDA, fp32 master weights; ignored on CPU
    # Adam moments (and Muon momentum) in bfloat16 halve the optimizer's memory: what lets 8 copies of d20
    # fit on one 80 GB GPU. float32 is the exact reference.
    optimizer_state_dtype: str = "float32"
    # torch.compile the blocks' vmapped forward and backward, the loss's chunks and the optimizer's update: fuses
    # the element-wise work that bounds an eager stacked step (GPU; also runs on CPU, where it gains little)
    compile: bool = False
    # recompute each block's activations in the backward instead of keeping them: less memory, ~1/3 more compute
    checkpoint_activations: bool = False
    # with checkpoint_activations, only the first this many blocks recompute (None: all): spends spare memory on
    # speed; recomputation gives the same numbers (tested bitwise)
    checkpoint_blocks: int | None = None

    @property
    def tokens_per_step(self) -> int:
        return tokens_per_step(self.rows_per_step, self.seq_len)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Programming errors only, on construction: a study's options were checked as a StudyConfig already."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {SCHEDULES}")
        check_micro_batch_size(self.micro_batch_size, self.rows_per_step)
        if self.checkpoint_blocks is not None and (self.checkpoint_blocks < 0 or not self.checkpoint_activations):
            raise ValueError(f"checkpoint_blocks {self.checkpoint_blocks}: give a number >= 0, with "
                             "checkpoint_activations")
        if self.ce_chunk is not None and self.ce_chunk < 1:
            raise ValueError(f"ce_chunk {self.ce_chunk} must be at least 1 (or None: from the model's width)")


def ce_chunk_rows(n_embd: int) -> int:
    """Rows per cross-entropy chunk: 2 * n_embd down to a power of two, at least 512 (d20: 2048; 256 wide: 512).

    Each chunk adds its (V, n_embd) lm_head gradient into a float32 sum, and holds (rows, V) float32 logits.
    Fewer, larger chunks add less; the logits' memory should stay small next to a model's own. On d20, 2048 rows
    are 5% faster than 512 for ~1 GB more at 8 models; on a 256-wide model (0.6 GB of weights and Adam state
    each) they would take 1 GB per model: 52 GB instead of 34 for 32 models (benchmarks/RESULTS.md)."""
    return max(512, 1 << ((2 * n_embd).bit_length() - 1))


@dataclass
class CellRecord:
    """What one fine-tune produced. losses[s] is the training loss of step s's batch before its update,
    and, for a model that finished, one more value: the loss of its last batch after its last update.
    base_losses[s] is the base model's loss on the very tokens of losses[s]: minibatches differ in how hard
    they are, and this reference removes that noise from the ratio losses / base_losses."""

    initial_loss: float
    steps: int
    losses: list[float] = field(default_factory=list)
    base_losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    steps_done: int = 0
    unstable: bool = False
    unstable_step: int | None = None
    eval_loss: float | None = None
    wall_time: float = 0.0

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")

    def copy_from(self, src: CellRecord) -> None:
        """This record becomes what src holds (its own budget's `steps` aside), in lists of its own: a cell read
        out of a trunk, or one that learnt from the same tokens as another."""
        self.losses, self.base_losses = list(src.losses), list(src.base_losses)
        self.grad_norms, self.lrs = list(src.grad_norms), list(src.lrs)
        self.steps_done, self.initial_loss, self.eval_loss = src.steps_done, src.initial_loss, src.eval_loss
        self.unstable, self.unstable_step = src.unstable, src.unstable_step

    def end_with(self, loss: float) -> None:
        """The loss of its last batch after its last update; the reference is that batch's base loss."""
        self.losses.append(loss)
        self.base_losses.append(self.base_losses[-1])


@dataclass
class Step:
    """One step of a stack, (K,) each: what a record keeps of it, and which models diverged there."""

    losses: torch.Tensor
    base: torch.Tensor
    norms: torch.Tensor
    lrs: torch.Tensor
    has_tokens: torch.Tensor  # a model with no supervised token in its share of the step records nothing
    bad: torch.Tensor  # diverged: a non-finite or runaway loss or gradient norm, or non-finite weights

    def record(self, records: Sequence[CellRecord], step: int, active: torch.Tensor) -> None:
        """Each active model's values appended to its record (records[i] for model i)."""
        for i in torch.nonzero(active & self.has_tokens).flatten().tolist():
            rec = records[i]
            rec.losses.append(self.losses[i].item())
            rec.base_losses.append(self.base[i].item())
            rec.grad_norms.append(self.norms[i].item())
            rec.lrs.append(self.lrs[i].item())
            rec.steps_done = step + 1
            if len(rec.losses) == 1:  # the loss before any update, even if step 0 had no token to learn from
                rec.initial_loss = rec.losses[0]
            if self.bad[i]:
                rec.unstable, rec.unstable_step = True, step


def group_lrs(hp: dict, optimizer: str, n_embd: int) -> dict[str, float]:
    """Each parameter group's learning rate for one cell.

    adamw: `lr` for every group. nanochat: `lr` is the Muon (matrix) rate and the (un)embedding rates follow
    nanochat's ratios to it; default lr = 0.02 * init_lr_frac. Then matrix_lr overrides attn and mlp, and
    embedding_lr, unembedding_lr, attn_lr, mlp_lr override their own group.
    """
    if optimizer == "adamw":
        lrs = {g: float(hp["lr"]) for g in GROUPS}
    else:
        base = float(hp.get("lr", NANOCHAT_MATRIX_LR * NANOCHAT_INIT_LR_FRAC))
        s = (n_embd / 768) ** -0.5
        lrs = {
            "embedding": base * NANOCHAT_EMBEDDING_LR * s / NANOCHAT_MATRIX_LR,
            "unembedding": base * NANOCHAT_UNEMBEDDING_LR * s / NANOCHAT_MATRIX_LR,
            "attn": base,
            "mlp": base,
        }
    if "matrix_lr" in hp:
        lrs["attn"] = lrs["mlp"] = float(hp["matrix_lr"])
    for g in GROUPS:
        if f"{g}_lr" in hp:
            lrs[g] = float(hp[f"{g}_lr"])
    return lrs


class _GradInOwnLayout(torch.autograd.Function):
    """The identity, whose backward hands a stacked weight its gradient in the weight's own layout.

    Under vmap a linear layer's weight gradient comes out of the batched matmul transposed, and autograd would
    copy it into `.grad`'s layout after the step's compiled code, with a slow strided copy (6% of a d20 step);
    asked for here, the transposition is fused into the cast to float32 that the compiled backward does anyway.
    A copy changes no value."""

    @staticmethod
    def forward(t):
        return t.view_as(t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _HalfBlock(torch.nn.Module):
    """One half of a block around attention (`Block.before_attention` or `Block.after_attention`), holding the
    block's layers under their own names, so that functional_call takes the block's parameters as they are."""

    def __init__(self, block: Block, half: str):
        super().__init__()
        self.attn, self.mlp, self.eps, self.half = block.attn, block.mlp, block.eps, getattr(Block, half)

    def forward(self, *args):
        return self.half(self, *args)


def _block_stage(halves: tuple[_HalfBlock, _HalfBlock], stacked: dict, shared: dict, h, cos, sin,
                 attention_kernels: list) -> torch.Tensor:
    """One transformer block for every model, h (K, B, T, C): each half under vmap with the given parameters, and
    attention between them outside vmap, on all models' heads at once (the models folded into the batch)."""
    before, after = halves
    stacked = {n: _GradInOwnLayout.apply(t) if t.requires_grad else t for n, t in stacked.items()}
    dims = 0 if stacked else None
    q, k, v = vmap(lambda p, x: functional_call(before, (p, shared), (x, cos, sin)), in_dims=(dims, 0))(stacked, h)
    # inside the stage, so a checkpoint's recomputation in the backward picks the same attention kernel
    with sdpa_kernel(attention_kernels):
        y = causal_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)).unflatten(0, h.shape[:2])
    return vmap(lambda p, x, yy: functional_call(after, (p, shared), (x, yy)), in_dims=(dims, 0, 0))(stacked, h, y)


class _Hidden(torch.nn.Module):
    """A GPT whose forward is its final hidden states, for functional_call (parameters named "gpt.<name>")."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx):
        return self.gpt.hidden(idx)


def _whole_model_stage(hidden: _Hidden, stacked: dict, shared: dict, idx, attention_kernels: list) -> torch.Tensor:
    """The final hidden states (K, B, T, C) of every model, the whole trunk under vmap: the 2026 architecture's
    value embeddings, x0 mixing and backout reach across blocks, so its blocks are not run as separate stages.
    Attention runs inside vmap, where only SDPA's math kernel gives right gradients on every device."""
    stacked = {"gpt." + n: _GradInOwnLayout.apply(t) if t.requires_grad else t for n, t in stacked.items()}
    shared = {"gpt." + n: t for n, t in shared.items()}
    with sdpa_kernel(attention_kernels):
        return vmap(lambda p: functional_call(hidden, (p, shared), (idx,)))(stacked)


def _loss_stage(stacked: dict, shared: dict, h, targets, weights, eps, softcap: float, chunk: int, compiled: bool):
    """(K,) weighted cross-entropy sums of the final norm + lm_head + softcap, on the stacked tensors directly."""
    weight = stacked["weight"] if stacked else shared["weight"]
    return stacked_linear_cross_entropy(norm(h, eps), weight, targets, weights, softcap, chunk, compiled)


@torch.no_grad()
def grad_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """(K,) norms of each model's whole gradient over stacked tensors, one pass over each."""
    return sum(torch.linalg.vector_norm(g.flatten(1), dim=1, dtype=torch.float32).square() for g in grads).sqrt()


@torch.no_grad()
def _all_finite(params: list[torch.Tensor]) -> torch.Tensor:
    """(K,) whether every weight of each model is finite: its largest magnitude is NaN or inf iff one is."""
    return torch.stack([torch.isfinite(torch.linalg.vector_norm(p.flatten(1), ord=float("inf"), dim=1))
                        for p in params]).all(0)


def with_batch_size_of(cells: Sequence[dict], cfg: TrainConfig) -> TrainConfig:
    """cfg with the rows per step of cells that sweep their batch_size (tokens per step, whole rows of seq_len).
    The models of a stack share one input tensor, so they share one batch size."""
    sizes = {int(c["batch_size"]) for c in cells if "batch_size" in c}
    if not sizes:
        return cfg
    if len(sizes) > 1 or not all("batch_size" in c for c in cells):
        raise ValueError(f"a stack holds one batch size; these cells have {sorted(sizes)} tokens per step")
    (tokens,) = sizes
    if tokens % cfg.seq_len:
        raise ValueError(f"batch_size {tokens} is not a whole number of rows of {cfg.seq_len} tokens")
    return replace(cfg, rows_per_step=tokens // cfg.seq_len)


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seeds everything; with deterministic, also asks torch for bitwise-reproducible kernels."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)


class StackedTrainer:
    """The stacked step: K copies of `model`, one cell's hyperparameters (a dict over the axes) each, their
    optimizers, their forward and backward, their update and their evaluation. The loop that drives it, and
    reads cells out of it, is train/trunk.py's TrunkTrainer."""

    def __init__(self, model: GPT, cells: Sequence[dict], cfg: TrainConfig, device: str | torch.device = "cpu",
                 base_cache: dict | None = None):
        """base_cache: the base model's per-token losses by step, shared by the trainers of one model and one
        token stream (a sweep's batches all see the same steps), so that each step's reference is computed once."""
        cfg = with_batch_size_of(cells, cfg)
        self.cfg, self.device = cfg, torch.device(device)
        self.model = model.to(self.device)
        self.k = len(cells)
        if self.k == 0:
            raise ValueError("a batch needs at least one cell")
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.stacked, self.frozen = split_params(self.model, self.k, cfg.trainable)
        self.stacked = {n: t.to(self.device).detach().requires_grad_(True) for n, t in self.stacked.items()}
        self.frozen = {n: t.to(self.device) for n, t in self.frozen.items()}

        def per_model(key: str, default: float) -> torch.Tensor:
            return torch.tensor([float(c.get(key, default)) for c in cells], dtype=torch.float64)

        n_embd = model.config.n_embd
        cell_lrs = [group_lrs(c, cfg.optimizer, n_embd) for c in cells]
        self.group_lr = {g: torch.tensor([lr[g] for lr in cell_lrs], dtype=torch.float64) for g in GROUPS}
        self.base_lr = per_model("lr", float("nan")) if cfg.optimizer == "adamw" else self.group_lr["attn"]
        self.weight_decay = per_model("weight_decay", 0.0)
        self.warmup_ratio = per_model("warmup_ratio", 0.0)
        self.tokens = [int(c["tokens"]) for c in cells]
        self.total_steps = torch.tensor([steps_for(t, cfg.tokens_per_step) for t in self.tokens], dtype=torch.float64)

        self.adamw, self.muon = self._optimizers(self.stacked)

        # (stacked, shared) parameters of each stage, the same tensors every step: embedding, blocks, lm_head
        self._stages = self._stages_of(self.stacked)
        # Each stage is one function for every block (same structure, parameters passed in): torch.compile traces
        # it once for all blocks and all batches, and torch.utils.checkpoint can wrap it from outside vmap.
        # Static shapes: dynamo can't trace vmap's batched matmuls with symbolic sizes (torch 2.11), so each new
        # (models, rows) recompiles once; a study has a few.
        self._block_stage = torch.compile(_block_stage, dynamic=False) if cfg.compile else _block_stage
        if cfg.compile:
            # a study records that it ran compiled: fail rather than fall back to eager kernels without a word
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            torch._dynamo.config.fail_on_recompile_limit_hit = True
        self.ce_chunk = ce_chunk_rows(model.config.n_embd) if cfg.ce_chunk is None else cfg.ce_chunk
        # every block has the same structure: the first one's halves run each block's parameters
        template = model.transformer.h[0]
        self._halves = (_HalfBlock(template, "before_attention"), _HalfBlock(template, "after_attention"))
        self._hidden = _Hidden(model)
        self.base_cache = {} if base_cache is None else base_cache
        self._eval_set: tuple | None = None  # (the held-out batches given, the same on the device): _resident
        self.at_base = True  # every model still holds the base weights (until the first update)
        # Finite weights: one compiled call over every stacked tensor (a maximum is exact in any order). Gradient
        # norms stay eager: compiled, a (K, n) sum is split differently for each K, and a stored norm would then
        # depend on the companions in its last bit.
        self._finite = torch.compile(_all_finite, dynamic=False) if cfg.compile else _all_finite

    def _optimizers(self, stacked: dict) -> tuple[StackedAdamW | None, StackedMuon | None]:
        """The optimizers of a stack: AdamW on everything, or (nanochat) Muon on the block matrices and AdamW on
        the (un)embedding."""
        cfg = self.cfg
        adamw_params, muon = stacked, None
        if cfg.optimizer != "adamw":
            adamw_params = {n: t for n, t in stacked.items() if group_of(n) in ("embedding", "unembedding")}
            matrices = {n: t for n, t in stacked.items() if group_of(n) in ("attn", "mlp")}
            muon = StackedMuon(matrices, ns_dtype=getattr(torch, cfg.muon_ns_dtype),
                               state_dtype=getattr(torch, cfg.optimizer_state_dtype)) if matrices else None
        betas = cfg.adam_betas if cfg.optimizer == "adamw" else (0.8, 0.95)
        eps = cfg.adam_eps if cfg.optimizer == "adamw" else 1e-10
        hp = AdamWHparams(betas, eps, getattr(torch, cfg.optimizer_state_dtype))
        return (StackedAdamW(adamw_params, hp, compile=cfg.compile) if adamw_params else None), muon

    def _stages_of(self, stacked: dict) -> list[tuple[dict, dict]]:
        """(stacked, shared) parameters of each stage, named relative to its submodule: embedding, blocks, lm_head;
        for the 2026 architecture, the whole model, then lm_head."""
        if self.model.config.is_2026:
            head = {n.removeprefix("lm_head."): t for n, t in stacked.items() if n.startswith("lm_head.")}
            return [(stacked, self.frozen), (head, {n.removeprefix("lm_head."): t for n, t in self.frozen.items()
                                                    if n.startswith("lm_head.")})]
        prefixes = ["transformer.wte.", *(f"transformer.h.{i}." for i in range(len(self.model.transformer.h))),
                    "lm_head."]
        return [({n[len(p):]: t for n, t in stacked.items() if n.startswith(p)},
                 {n[len(p):]: t for n, t in self.frozen.items() if n.startswith(p)}) for p in prefixes]

    def _stacked_losses(self, stages, x, y, w) -> torch.Tensor:
        """(K,) losses of the stacked models on shared tokens x, targets y and per-model loss weights w (K, B, T),
        computed stage by stage: embedding, each block (checkpointed if asked), the loss."""
        model, eps, k = self.model, self.model.config.norm_eps, w.shape[0]
        if model.config.is_2026:
            (s, f), (head, head_shared) = stages
            h = _whole_model_stage(self._hidden, s, f, x, [SDPBackend.MATH]) if s else \
                model.hidden(x).expand(k, *x.shape, -1)
            weight = head["weight"] if head else head_shared["weight"]
            return stacked_linear_cross_entropy(h, weight, y, w, model.config.softcap, self.ce_chunk, self.cfg.compile)
        cos, sin = model.cos[: x.size(-1)], model.sin[: x.size(-1)]
        s, f = stages[0]

        def embed(p, idx):
            return norm(functional_call(model.transformer.wte, (p, f), (idx,)), eps)

        # a frozen embedding is shared: computed once, then seen by every model
        h = vmap(embed, in_dims=(0, None))(s, x) if s else embed({}, x).expand(k, *x.shape, -1)
        recomputed = self.cfg.checkpoint_blocks if self.cfg.checkpoint_activations else 0
        kernels = SDPA_BACKENDS
        for i, (s, f) in enumerate(stages[1:-1]):
            if recomputed is None or i < recomputed:
                h = checkpoint(self._block_stage, self._halves, s, f, h, cos, sin, kernels, use_reentrant=False)
            else:
                h = self._block_stage(self._halves, s, f, h, cos, sin, kernels)
        s, f = stages[-1]
        return _loss_stage(s, f, h, y, w, eps, model.config.softcap, self.ce_chunk, self.cfg.compile)

    # -- one step ---------------------------------------------------------------------------------------

    def _autocast(self):
        enabled = self.cfg.autocast and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _loss_weights(self, step: int, targets: torch.Tensor, budgets: Sequence[int] | None = None) -> torch.Tensor:
        """(K, B, T): 1/count on each model's supervised positions inside its token budget, else 0.

        A budget of N tokens is the first N positions of the stream: the last step of a model is partial.
        budgets: one per row of the result (default: the stacked models' own).
        """
        inside = budget_mask(step, self.tokens if budgets is None else list(budgets), *targets.shape, targets.device)
        valid = inside & (targets != -1).unsqueeze(0)
        count = valid.sum(dim=(1, 2), keepdim=True)
        return valid.float() / count.clamp(min=1).float()

    def _rows(self, step: int, budgets: Sequence[int] | None = None) -> int:
        """The rows of step `step` to compute for these budgets (default: the stack's own): those from the first
        to the last that holds a position inside one of them, rounded up to a power of two (so that a compiled
        step sees a few shapes), at most the batch. The rows left out carry no loss weight, and a row's numbers
        never depend on the rows beside it: a budget that ends in a step's first row costs one row, not the step."""
        inside = budget_mask(step, self.tokens if budgets is None else list(budgets), self.cfg.rows_per_step,
                             self.cfg.seq_len, "cpu")
        used = inside.flatten(0, -3).any(0).any(-1).nonzero()
        if not len(used):
            return 0
        return min(self.cfg.rows_per_step, 1 << int(used[-1]).bit_length())

    def _forward_backward(self, inputs, targets, weights, with_grad: bool, stages=None,
                          rows: int | None = None) -> torch.Tensor:
        """(K,) summed weighted losses over micro-batches; gradients accumulated in .grad when asked.
        stages: the parameters to run (default: the whole stack), K = weights.shape[0] models of them.
        rows: only the first this many rows (those past them must carry no weight; default: all)."""
        stages = self._stages if stages is None else stages
        if rows is not None:
            inputs, targets, weights = inputs[:rows], targets[:rows], weights[:, :rows]
        mb = self.cfg.micro_batch_size or inputs.shape[0]
        total = torch.zeros(weights.shape[0], device=self.device)
        for start in range(0, inputs.shape[0], mb):
            sl = slice(start, start + mb)
            with torch.set_grad_enabled(with_grad), self._autocast():
                losses = self._stacked_losses(stages, inputs[sl], targets[sl], weights[:, sl])
            if with_grad:
                # Each model's loss depends only on its own slice of the stack: the gradient of the sum is
                # every model's own gradient.
                losses.sum().backward()
            total += losses.detach().float()
        return total

    def _first_forward_backward(self, inputs, targets, weights, rows: int | None = None) -> torch.Tensor:
        """Step 0's (K,) losses and gradients. Every model still holds the base weights and sees the same tokens,
        so models with the same loss weights have the same loss and gradient: computed once per distinct weights
        row as a stack of one model, and copied to each. A stack of one whatever the companions, so the result
        does not depend on them, for a fraction of the work (cells of a few steps are mostly this step).
        A batch of many token budgets that end inside step 0 would pay a pass for each: it runs the whole stack.
        (Both ways give the same numbers on the CPU; on a GPU they round apart, as stacks of 1 and K models do.)"""
        distinct, row_of = torch.unique(weights.flatten(1), dim=0, return_inverse=True)
        if distinct.shape[0] > self.k // 2:
            return self._forward_backward(inputs, targets, weights, with_grad=True, rows=rows)
        losses = torch.empty(self.k, device=self.device)
        grads = {n: torch.empty_like(p) for n, p in self.stacked.items()}
        for r in range(distinct.shape[0]):
            members = torch.nonzero(row_of == r).flatten()
            first = int(members[0])
            one = {n: p[first:first + 1].detach().requires_grad_(True) for n, p in self.stacked.items()}
            loss = self._forward_backward(inputs, targets, weights[first:first + 1], True, self._stages_of(one),
                                          self._rows(0, [self.tokens[first]]))
            losses[members] = loss
            for n, p in one.items():
                grads[n][members] = p.grad
        for n, p in self.stacked.items():
            p.grad = grads[n]
        return losses

    def _base_losses(self, step: int, inputs, targets, weights) -> torch.Tensor:
        """(K,) the base model's loss under each model's weights: one unstacked forward shared by all, once per
        step of the stream (the base model and the tokens of a step are the same for every batch)."""
        key = (step, *inputs.shape)
        if key not in self.base_cache:
            with self._autocast():
                self.base_cache[key] = self.model.token_losses(inputs, targets, self.ce_chunk)
        return (weights * self.base_cache[key].unsqueeze(0)).flatten(1).sum(1)

    def _grad_norms(self) -> torch.Tensor:
        return grad_norms([p.grad for p in self.stacked.values()])

    def _weights_finite(self) -> torch.Tensor:
        return self._finite([p.detach() for p in self.stacked.values()])

    def _optimizer_step(self, mult: torch.Tensor, active: torch.Tensor, lanes: slice = slice(None),
                        optimizers: tuple | None = None) -> None:
        """One update of the active models; mult: (K,) this step's schedule multiplier of each model.
        lanes, optimizers: the lanes whose hyperparameters to use and the optimizers of other parameters (a
        read-out's copy of a lane), instead of the whole stack's."""
        adamw, muon = (self.adamw, self.muon) if optimizers is None else optimizers
        # (K,) hyperparameters stay on the CPU; the optimizers move them next to each tensor, once per group.
        group_lrs = {g: lr[lanes] * mult[lanes] for g, lr in self.group_lr.items()}
        lrs = {n: group_lrs[group_of(n)] for n in self.stacked}
        if adamw is not None:
            adamw.step(lrs, self.weight_decay[lanes], active)
        if muon is not None:
            muon.step(lrs, active)

    def _step(self, step: int, inputs, targets, weights, mult: torch.Tensor, active: torch.Tensor) -> Step:
        """One step of the active models: losses before the update (and the base model's on the same tokens),
        gradient norms, the update of those that did not diverge, and which diverged."""
        cfg = self.cfg
        has_tokens = (weights.flatten(1).sum(1) > 0).cpu()
        for p in self.stacked.values():
            p.grad = None
        base = self._base_losses(step, inputs, targets, weights).cpu()
        rows = self._rows(step)
        if self.at_base:
            losses = self._first_forward_backward(inputs, targets, weights, rows).cpu()
        else:
            losses = self._forward_backward(inputs, targets, weights, with_grad=True, rows=rows).cpu()
        norms = self._grad_norms().cpu()
        bad = ~torch.isfinite(losses) | (losses > cfg.divergence_ratio * base) | ~torch.isfinite(norms)
        stepping = active & has_tokens & ~bad
        self._optimizer_step(mult, stepping)
        for p in self.stacked.values():
            p.grad = None  # not kept between steps: a trunk's read-outs take that memory for their branch
        self.at_base = False
        bad_weights = ~self._weights_finite().cpu() & stepping
        return Step(losses, base, norms, self.base_lr * mult, has_tokens, bad | bad_weights)

    # -- evaluation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, eval_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], stages=None,
                 k: int | None = None) -> torch.Tensor:
        """(K,) mean loss of every model over the same held-out tokens, all models in one batched pass.
        stages, k: other parameters to evaluate, k models of them (default: the whole stack)."""
        k = self.k if k is None else k
        loss = torch.zeros(k, device=self.device)
        for inputs, targets, w in self._resident(eval_batches):
            loss += self._forward_backward(inputs, targets, w.expand(k, -1, -1), with_grad=False, stages=stages)
        return loss.cpu()

    def _resident(self, eval_batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple]:
        """The held-out batches on the device with their (1, B, T) loss weights, made once per set: a trunk
        evaluates every read-out on them, and copying them over (and counting their tokens) each time would
        wait on the host."""
        if self._eval_set is None or self._eval_set[0] is not eval_batches:
            total_tokens = sum(int((t != -1).sum()) for _, t in eval_batches)
            if total_tokens == 0:
                raise ValueError("the evaluation set has no supervised tokens")
            resident = []
            for inputs, targets in eval_batches:
                inputs, targets = inputs.to(self.device), targets.to(self.device)
                resident.append((inputs, targets, ((targets != -1).float() / total_tokens).unsqueeze(0)))
            self._eval_set = (eval_batches, resident)
        return self._eval_set[1]

    def state_dict_of(self, index: int) -> dict[str, torch.Tensor]:
        return unstack(self.stacked, self.frozen, index)

