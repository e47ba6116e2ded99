"""Shared test helpers: bitwise and on-disk comparisons, a small study store, the full-logits loss reference,
tiny models and tokenizer files, and a token stream and single-model reference training for the stacked trainer.

(The in-process CLI helpers live apart, in cli_helpers.py, so that these tests don't import the CLI.)
"""

from __future__ import annotations

import copy
import json
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vmap_sweep.model.gpt import GPT, GPTConfig
from vmap_sweep.model.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN
from vmap_sweep.train.stack import group_of

# The trainer, the store and the study grid are imported inside the helpers that use them, so that a model or
# tokenizer test doesn't import (and can't be broken by) them.
if TYPE_CHECKING:
    from vmap_sweep.store.db import StudyStore
    from vmap_sweep.study.grid import Grid
    from vmap_sweep.train.trainer import CellRecord, TrainConfig


# ------------------------------------------------------------------ bitwise and on-disk comparisons
def bits(values) -> np.ndarray:
    """Float64 values (a scalar, None as nan, or a sequence) as their raw uint64 bits, flat: compare with
    np.array_equal to tell -0.0 from 0.0 and one nan payload from another."""
    return np.asarray(values, dtype=np.float64).reshape(-1).view(np.uint64)


def snapshot(folder: Path, *, mtimes: bool = False) -> dict[str, bytes] | dict[str, tuple[bytes, int]]:
    """Every file under `folder` by relative path: its bytes (with mtimes=True, also its st_mtime_ns), to prove
    that something left the folder untouched. A study's lock file is left out: it names whoever last tried to
    train the study (a refused run too), and holds no result."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "study.lock")
    if mtimes:
        return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


# ------------------------------------------------------------------ study stores
# the config, grid and records of a small 4x3 study store
STORE_CONFIG = {"grid": {"x": "lr:1e-5:1e-2:log", "y": "tokens:1000:8000:log", "res": [4, 3]}, "seed": 0,
                "model": {"depth": 1}}
# the same grid as a study's config (what analyses read through analysis/view.py)
STUDY_STORE_CONFIG = {"model": "tiny", "data": "synthetic", "x": "lr:1e-5:1e-2", "y": "tokens:1000:8000",
                      "resolution": "4x3", "seed": 0}


@dataclass
class Rec:
    """Duck-typed CellRecord (see CONTRACTS.md)."""

    initial_loss: float = 5.0
    losses: list[float] = field(default_factory=lambda: [4.0, 3.0, 2.5])
    base_losses: list[float] = field(default_factory=lambda: [4.0, 4.1, 3.9])
    grad_norms: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])
    lrs: list[float] = field(default_factory=lambda: [1e-4, 1e-4, 1e-4])
    steps: int = 3
    steps_done: int = 3
    unstable: bool = False
    unstable_step: int | None = None
    eval_loss: float | None = 2.75
    wall_time: float = 1.5


def store_grid() -> Grid:
    from vmap_sweep.study.axes import parse_axis_spec
    from vmap_sweep.study.grid import Grid

    return Grid(parse_axis_spec("lr:1e-5:1e-2"), parse_axis_spec("tokens:1000:8000"), 4, 3)


def rec_for(i: int, j: int) -> Rec:
    """Distinct, exactly representable-or-not values per cell, incl. nan/inf in some trajectories."""
    base = 5.0 + i / 7 + j / 3
    losses = [base * 0.9, base * 0.7 + 1e-17, base / 3]
    if (i + j) % 3 == 0:
        losses[-1] = float("nan")
    if (i + j) % 3 == 1:
        losses[1] = float("inf")
    return Rec(initial_loss=base, losses=losses, base_losses=[base, base * 1.1, base / 7],
               grad_norms=[0.1 * i, -0.0, 1e300], lrs=[1e-4 / (j + 1)] * 3,
               unstable=(i + j) % 3 == 0, unstable_step=2 if (i + j) % 3 == 0 else None,
               eval_loss=None if i == 0 else base / 4, wall_time=0.1 * (i + 1))


def new_store(tmp_path: Path, name: str = "study", config: dict | None = None) -> StudyStore:
    from vmap_sweep.store.db import StudyStore

    return StudyStore.create_or_open(tmp_path / name, STORE_CONFIG if config is None else config,
                                     store_grid().cells())


# ------------------------------------------------------------------ the loss reference
def reference_linear_cross_entropy(h, w, targets, weights, softcap: float) -> torch.Tensor:
    """The same quantity with full logits: the reference the fused version is tested against."""
    logits = softcap * torch.tanh((h @ w.t()).float() / softcap)
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).clamp(min=0), reduction="none"
    )
    return (ce * weights.reshape(-1)).sum()


# ------------------------------------------------------------------ small models and tokenizer files
# (written the way nanochat and transformers write them)
# A few merges so that BPE really merges: "the", " the", "ing", digits.
MERGES: list[bytes] = [b"th", b"the", b" t", b" the", b"in", b"ing", b"12", b"123", b"he", b"ll", b"llo"]


def tiktoken_state() -> dict:
    """The state nanochat pickles: 256 byte ranks, the merges, then the nine specials after them."""
    ranks = {bytes([i]): i for i in range(256)}
    for m in MERGES:
        ranks[m] = len(ranks)
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return {"name": "rustbpe", "pat_str": SPLIT_PATTERN, "mergeable_ranks": ranks, "special_tokens": specials}


def tiktoken_encoding():
    import tiktoken

    s = tiktoken_state()
    return tiktoken.Encoding(
        s["name"], pat_str=s["pat_str"], mergeable_ranks=s["mergeable_ranks"], special_tokens=s["special_tokens"]
    )


TIKTOKEN_VOCAB = 256 + len(MERGES) + len(SPECIAL_TOKENS)


def write_tokenizer_pkl(path: Path, protocol: int | None = None) -> Path:
    """A real pickled tiktoken.Encoding, as nanochat's tokenizer/tokenizer.pkl."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(tiktoken_encoding(), f, protocol=protocol)
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte -> printable character map, which the ByteLevel pre-tokenizer/decoder use.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def write_tokenizer_json(path: Path) -> Path:
    """A byte-level BPE tokenizer.json with nanochat's split pattern and nine specials (ids 256 + merges ...)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    b2u = _bytes_to_unicode()
    vocab = {b2u[i]: i for i in range(256)}
    merges = []
    for m in MERGES:
        # Split each merge into the two pieces the BPE merged (longest known prefix + rest).
        text = "".join(b2u[b] for b in m)
        for cut in range(len(text) - 1, 0, -1):
            if text[:cut] in vocab and text[cut:] in vocab:
                merges.append((text[:cut], text[cut:]))
                break
        vocab[text] = len(vocab)
    tok = HFTok(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


HF_TOKENIZER_VOCAB = 256 + len(MERGES) + len(SPECIAL_TOKENS)


def tiny_config(**overrides) -> GPTConfig:
    fields = dict(sequence_len=32, vocab_size=288, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    fields.update(overrides)
    return GPTConfig(**fields)


def random_model(config: GPTConfig, seed: int, std: float = 0.2) -> GPT:
    """Every weight random (nanochat's init zeroes some, which would hide mapping mistakes)."""
    model = GPT(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def write_native_checkpoint(folder: Path, model: GPT, step: int, orig_mod: bool = True) -> Path:
    """model_{step:06d}.pt (wte in bf16, optionally `_orig_mod.` keys) + meta_{step:06d}.json, as nanochat."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().clone()
        if k == "transformer.wte.weight":
            v = v.to(torch.bfloat16)
        state[("_orig_mod." if orig_mod else "") + k] = v
    torch.save(state, folder / f"model_{step:06d}.pt")
    c = model.config
    model_config = dict(
        sequence_len=c.sequence_len, vocab_size=c.vocab_size, n_layer=c.n_layer,
        n_head=c.n_head, n_kv_head=c.n_kv_head, n_embd=c.n_embd,
    )  # fmt: skip
    meta = {"step": step, "val_bpb": 1.23, "model_config": model_config, "user_config": {}}
    (folder / f"meta_{step:06d}.json").write_text(json.dumps(meta))
    return folder


def with_bf16_wte(model: GPT) -> GPT:
    """The model as it is after a round trip through a native checkpoint (wte rounded to bf16)."""
    out = GPT(model.config)
    out.load_state_dict(model.state_dict())
    with torch.no_grad():
        w = out.transformer.wte.weight
        w.copy_(w.to(torch.bfloat16).float())
    return out


# ------------------------------------------------------------------ stacked training: models, stream, references
VOCAB = 61


def tiny_model(seed: int = 0, n_kv_head: int = 2) -> GPT:
    cfg = GPTConfig(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=n_kv_head, n_embd=32)
    model = GPT(cfg).init_weights(seed)
    # nanochat's init zeroes lm_head and the output projections; a fine-tune starts from trained weights.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


class RandomStream:
    """A fixed stream of tokens with some unsupervised targets, batched as the trainer asks."""

    def __init__(self, seed: int = 0, length: int = 20_000):
        gen = torch.Generator().manual_seed(seed)
        # a learnable pattern: next token = (token * 3 + 1) mod VOCAB, with noise
        ids = torch.randint(0, VOCAB, (length,), generator=gen)
        for i in range(1, length):
            if torch.rand((), generator=gen) < 0.8:
                ids[i] = (ids[i - 1] * 3 + 1) % VOCAB
        self.ids = ids
        self.supervised = torch.rand(length, generator=gen) < 0.7

    def batch(self, step: int, batch_size: int, seq_len: int):
        n = batch_size * seq_len
        start = step * n
        pos = (start + torch.arange(n + 1)) % (len(self.ids) - 1)
        ids, sup = self.ids[pos], self.supervised[pos]
        x = ids[:-1].view(batch_size, seq_len)
        y = torch.where(sup[1:], ids[1:], torch.full_like(ids[1:], -1)).view(batch_size, seq_len)
        return x, y


def budget_weights(step: int, tokens: int, targets: torch.Tensor) -> torch.Tensor:
    B, T = targets.shape
    position = step * B * T + torch.arange(B * T).view(B, T)
    valid = (position < tokens) & (targets != -1)
    return valid.float() / valid.sum().clamp(min=1).float()


def reference_adamw(base: GPT, stream, cell: dict, batch_size: int, seq_len: int, divergence_ratio: float,
                    betas=(0.9, 0.95), eps=1e-8, schedule="linear"):
    """One cell trained the ordinary way: its own model and torch.optim.AdamW, one step at a time."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    steps = max(1, math.ceil(cell["tokens"] / (batch_size * seq_len)))
    opt = torch.optim.AdamW(model.parameters(), lr=cell["lr"], betas=betas, eps=eps,
                            weight_decay=cell.get("weight_decay", 0.0), foreach=False)
    losses = []
    for step in range(steps):
        x, y = stream.batch(step, batch_size, seq_len)
        weights = budget_weights(step, cell["tokens"], y)
        loss = model(x, y, weights)
        losses.append(loss.item())
        with torch.no_grad():
            base_loss = base(x, y, weights).item()
        if not math.isfinite(loss.item()) or loss.item() > divergence_ratio * base_loss:
            return losses, model, True
        opt.zero_grad()
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = cell["lr"] * ((1 - step / steps) if schedule == "linear" else 1.0)
        opt.step()
    with torch.no_grad():
        x, y = stream.batch(steps - 1, batch_size, seq_len)
        losses.append(model(x, y, budget_weights(steps - 1, cell["tokens"], y)).item())
    return losses, model, False


def newton_schulz_single(g: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(5):
        A = x @ x.T
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.T if tall else x


def reference_nanochat(base: GPT, stream, cell: dict, batch_size: int, seq_len: int, ns_dtype=torch.bfloat16):
    """nanochat's SFT optimizer for one model: Muon (a plain loop) on block matrices, AdamW elsewhere."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    steps = max(1, math.ceil(cell["tokens"] / (batch_size * seq_len)))
    s = (model.config.n_embd / 768) ** -0.5
    lr = cell["lr"]
    named = dict(model.named_parameters())
    adam_groups = [
        {"params": [named["transformer.wte.weight"]], "lr": lr * 10 * s, "initial": lr * 10 * s},
        {"params": [named["lm_head.weight"]], "lr": lr * 0.2 * s, "initial": lr * 0.2 * s},
    ]
    adam = torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, foreach=False)
    matrices = [p for n, p in named.items() if group_of(n) in ("attn", "mlp")]
    bufs = [torch.zeros_like(p) for p in matrices]
    losses = []
    for step in range(steps):
        x, y = stream.batch(step, batch_size, seq_len)
        loss = model(x, y, budget_weights(step, cell["tokens"], y))
        losses.append(loss.item())
        adam.zero_grad()
        for p in matrices:
            p.grad = None
        loss.backward()
        mult = 1 - step / steps
        for g in adam.param_groups:
            g["lr"] = g["initial"] * mult
        adam.step()
        with torch.no_grad():
            for p, buf in zip(matrices, bufs, strict=True):
                buf.lerp_(p.grad, 1 - 0.95)
                g = p.grad.lerp(buf, 0.95)
                scale = max(1, p.size(0) / p.size(1)) ** 0.5
                p.add_(newton_schulz_single(g, ns_dtype).float(), alpha=-lr * mult * scale)
    return losses, model


def train_batch(
    model: GPT,
    stream,
    cells: Sequence[dict],
    cfg: TrainConfig,
    eval_batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    device: str | torch.device = "cpu",
) -> list[CellRecord]:
    """Fine-tune one copy of `model` per cell, all at once; one record per cell, in order."""
    from vmap_sweep.train.trunk import TrunkTrainer

    return TrunkTrainer.separate(model, cells, cfg, device).run(stream, eval_batches)


def train_one_by_one(model: GPT, stream, cell: dict, cfg: TrainConfig,
                     eval_batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> CellRecord:
    """One cell trained by the plainest loop over the stacked step (a stack of one model): step after step until
    its budget ends or it diverges, then the loss of its last batch and its eval loss. The reference the
    training loop's read-outs are held to; it shares no code with them."""
    from vmap_sweep.study.schedule import lr_multiplier
    from vmap_sweep.train.trainer import CellRecord, StackedTrainer

    trainer = StackedTrainer(model, [cell], cfg)
    rec = CellRecord(initial_loss=float("nan"), steps=int(trainer.total_steps[0]))
    active = torch.ones(1, dtype=torch.bool)
    for step in range(rec.steps):
        x, y = stream.batch(step, trainer.cfg.rows_per_step, cfg.seq_len)
        mult = lr_multiplier(step, trainer.total_steps, trainer.warmup_ratio, cfg.schedule)
        taken = trainer._step(step, x, y, trainer._loss_weights(step, y), mult, active)
        taken.record([rec], step, active)
        if rec.unstable:
            break
    if not rec.unstable and rec.steps_done > 0:
        last = rec.steps_done - 1
        x, y = stream.batch(last, trainer.cfg.rows_per_step, cfg.seq_len)
        with torch.no_grad():
            loss = trainer._forward_backward(x, y, trainer._loss_weights(last, y), with_grad=False)
        rec.end_with(loss[0].item())
    if eval_batches:
        rec.eval_loss = trainer.evaluate(eval_batches)[0].item()
    return rec


# ------------------------------------------------------------------ running a study as the CLI does
def local_backend(cfg, **settings):
    """This process's backend on the CPU, with the run settings a CPU run records (compile 0)."""
    from vmap_sweep.run.worker import LocalBackend
    from vmap_sweep.study.settings import RunSettings

    return LocalBackend(cfg, RunSettings(**settings))


def run_local(cfg, out, models_per_batch=8, backend=None, **options):
    """run_study as `vmap-sweep run` calls it (classes by the study's criterion as cells are stored), on the CPU
    in this process unless another backend is given; returns the open store."""
    from vmap_sweep.run.pipeline import run_study
    from vmap_sweep.study.criterion import label as label_record

    return run_study(cfg, out, backend or local_backend(cfg), models_per_batch=models_per_batch,
                     labeller=label_record, **options)


def zoom_local(parent, backend=None, **options):
    """zoom_study as `vmap-sweep zoom` calls it, on the CPU in this process unless another backend is given."""
    from vmap_sweep.run.zoom import zoom_study
    from vmap_sweep.store.study import Study
    from vmap_sweep.study.criterion import label as label_record

    if backend is None:
        with Study.open(parent) as study:
            backend = local_backend(study.config)
    return zoom_study(parent, backend, labeller=label_record, **options)


def _stops_after_one_batch():
    from vmap_sweep.run.worker import LocalBackend

    class StopsAfterOneBatch(LocalBackend):
        """A run that dies after its first batch is stored (as a killed process would)."""

        def run(self, jobs, started, evaluate=True):
            for n, item in enumerate(super().run(jobs, started, evaluate)):
                if n == 1:
                    raise KeyboardInterrupt
                yield item

    return StopsAfterOneBatch


def __getattr__(name):
    # built on first use, so that a model or tokenizer test doesn't import the run layer
    if name == "StopsAfterOneBatch":
        return _stops_after_one_batch()
    raise AttributeError(name)
