"""An embedded tiny base model: a nanochat-architecture GPT over bytes, pretrained here on first use.

The project ships no weights, yet tests, examples and the quick start need a base model to fine-tune.
tiny_base_model() pretrains one deterministically (a few hundred AdamW steps on plain synthetic
documents, seconds on a CPU) and caches it in the user cache dir ($VMAP_SWEEP_CACHE overrides), under
a name holding TINY_VERSION and a hash of the recipe and its training text. The cache entry is written
to a temporary directory and renamed into place, so a crash never leaves a half-written model there.

The pretraining text comes from vmap_sweep.data.synthetic, a standard-library-only leaf module: importing
it here makes no cycle, and the base model's text and the SFT conversations share one generator.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import platformdirs
import torch

from vmap_sweep.data.synthetic import synthetic_documents
from vmap_sweep.errors import CheckpointError
from vmap_sweep.model.checkpoint import LoadedModel, load_model, save_model
from vmap_sweep.model.gpt import GPT, GPTConfig
from vmap_sweep.model.tokenizer import ByteTokenizer

TINY_VERSION = "1"
TINY_CONFIG = GPTConfig(sequence_len=256, vocab_size=265, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


@dataclass(frozen=True)
class TinyRecipe:
    config: GPTConfig = field(default_factory=lambda: TINY_CONFIG)
    data_seed: int = 424242  # pretraining documents; the SFT sets use other seeds
    n_docs: int = 3000
    init_seed: int = 0
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-2  # AdamW, linear decay to 10% over the run

    def documents(self) -> list[str]:
        return synthetic_documents(self.n_docs, self.data_seed)

    def digest(self, documents: list[str] | None = None) -> str:
        """Hash of the recipe and its training text, so a changed generator never reuses a stale cache."""
        text = "\x00".join(self.documents() if documents is None else documents)
        recipe = json.dumps({"version": TINY_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256((recipe + "\x00" + text).encode()).hexdigest()[:16]


def cache_root() -> Path:
    """$VMAP_SWEEP_CACHE, else the platform's user cache dir for vmap-sweep."""
    return Path(os.environ.get("VMAP_SWEEP_CACHE") or platformdirs.user_cache_dir("vmap-sweep"))


def document_stream(documents: list[str], tokenizer: ByteTokenizer) -> torch.Tensor:
    """<|bos|> doc <|bos|> doc ... as one LongTensor."""
    ids: list[int] = []
    for doc in documents:
        ids.append(tokenizer.bos_id)
        ids += tokenizer.encode(doc)
    return torch.tensor(ids, dtype=torch.long)


def lm_batch(stream: torch.Tensor, step: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [step*B*T, (step+1)*B*T) of the stream (wrapping) and their next tokens, all supervised."""
    pos = (step * batch_size * seq_len + torch.arange(batch_size * seq_len)) % stream.numel()
    x, y = stream[pos], stream[(pos + 1) % stream.numel()]
    return x.view(batch_size, seq_len), y.view(batch_size, seq_len)


def pretrain_tiny(recipe: TinyRecipe, documents: list[str] | None = None) -> GPT:
    """Deterministic: fixed init seed, fixed data order, no other randomness, one CPU thread.

    One thread makes the result independent of the machine's core count; it takes ~10 s where two idle
    cores take ~6 s, but stays ~10 s when other processes hold the cores (two threads then took 80 s).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain(recipe, recipe.documents() if documents is None else documents)
    finally:
        torch.set_num_threads(threads)


def _pretrain(recipe: TinyRecipe, documents: list[str]) -> GPT:
    stream = document_stream(documents, ByteTokenizer())
    model = GPT(recipe.config).init_weights(recipe.init_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0)
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = recipe.lr * (1.0 - 0.9 * step / recipe.steps)
        x, y = lm_batch(stream, step, recipe.batch_size, recipe.seq_len)
        loss = model(x, y)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"tiny base model pretraining diverged at step {step}")  # a bug, not user input
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def tiny_base_dir(recipe: TinyRecipe | None = None) -> Path:
    """The tiny base model's folder (the project's own format), pretrained into the cache on first use."""
    tiny_base_model(recipe=recipe)
    return _cache_dir(recipe or TinyRecipe())


def _cache_dir(recipe: TinyRecipe, documents: list[str] | None = None) -> Path:
    return cache_root() / "models" / f"tiny-base-v{TINY_VERSION}-{recipe.digest(documents)}"


def tiny_base_model(device: str | torch.device = "cpu", recipe: TinyRecipe | None = None) -> LoadedModel:
    """The tiny byte-level base model (model, tokenizer, config), pretrained once and then read from cache."""
    recipe = recipe or TinyRecipe()
    documents = recipe.documents()
    path = _cache_dir(recipe, documents)
    if path.is_dir():
        try:
            return load_model(path, device=device)
        except CheckpointError:
            shutil.rmtree(path, ignore_errors=True)  # an unreadable cache entry is rebuilt, not fatal
    path.parent.mkdir(parents=True, exist_ok=True)
    model = pretrain_tiny(recipe, documents)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        save_model(tmp, model, ByteTokenizer())
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():  # lost a race to another process: theirs is as good as ours
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_model(path, device=device)
