"""Small model and tokenizer files for tests, written the way nanochat and transformers write them."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from vmap_sweep.model.gpt import GPT, GPTConfig
from vmap_sweep.model.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN

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
