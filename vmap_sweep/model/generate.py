"""Answers of a chat model to one question, rendered as nanochat renders a conversation: greedy and sampled."""

from __future__ import annotations

import torch

from vmap_sweep.model.gpt import GPT
from vmap_sweep.model.tokenizer import Tokenizer


def chat_prompt(tokenizer: Tokenizer, question: str) -> list[int]:
    """<|bos|><|user_start|>question<|user_end|><|assistant_start|>: where the model's answer begins."""
    sp = tokenizer.special_id
    return [tokenizer.bos_id, sp("<|user_start|>"), *tokenizer.encode(question), sp("<|user_end|>"),
            sp("<|assistant_start|>")]


@torch.no_grad()
def generate(model: GPT, ids: list[int], stop: set[int], max_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> list[int]:
    """New tokens after `ids` until one in `stop` (left out) or max_tokens. temperature 0: greedy (argmax);
    otherwise sampled from softmax(logits / temperature), over the top_k most likely tokens if given. The
    model sees the last sequence_len tokens (no cache: answers are short, the models small or few)."""
    device = next(model.parameters()).device
    ids, new = list(ids), []
    for _ in range(max_tokens):
        window = torch.tensor([ids[-model.config.sequence_len:]], device=device)
        logits = model(window)[0, -1].float()
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            if top_k is not None and top_k < logits.numel():
                cutoff = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < cutoff, float("-inf"))
            probs = torch.softmax(logits / temperature, dim=-1).cpu()
            token = int(torch.multinomial(probs, 1, generator=generator))
        if token in stop:
            break
        ids.append(token)
        new.append(token)
    return new


def chat_answers(model: GPT, tokenizer: Tokenizer, question: str, samples: int = 3, max_tokens: int = 64,
                 temperature: float = 0.8, top_k: int | None = 50, seed: int = 0) -> list[tuple[str, str]]:
    """(kind, answer) pairs: the greedy answer, then `samples` sampled ones (seeded, so reproducible)."""
    prompt = chat_prompt(tokenizer, question)
    stop = {tokenizer.special_id("<|assistant_end|>"), tokenizer.bos_id}
    answers = [("greedy", tokenizer.decode(generate(model, prompt, stop, max_tokens)))]
    generator = torch.Generator().manual_seed(seed)
    for n in range(samples):
        ids = generate(model, prompt, stop, max_tokens, temperature, top_k, generator)
        answers.append((f"sample {n + 1}", tokenizer.decode(ids)))
    return answers
