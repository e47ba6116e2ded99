"""The fixed token stream every cell of a study trains on, its token budgets, and the eval set.

The training conversations are put in one order fixed by a seed (random.Random(seed).shuffle, which
depends on nothing else), rendered, and concatenated into one stream of ids and supervision mask.
Step s reads stream positions [s*B*T, (s+1)*B*T) as B rows of T; the target of position k is the token
at k+1, or -1 where that token is unsupervised. Conversations are packed: a row can span several.
A budget of N tokens is the first N positions, so it takes steps_for(N, B*T) steps and the trainer masks
positions >= N of the last step with budget_mask. Every budget's step s is the same tensor.
If a budget is longer than the stream, positions wrap around to the start (a second epoch in the same
order), deterministically.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vmap_sweep.data.render import render_conversation
from vmap_sweep.errors import DataError
from vmap_sweep.model.tokenizer import Tokenizer
from vmap_sweep.study.sizes import Budgets, DatasetSize

EVAL_SEED = 7


def budget_mask(step: int, tokens: int | Sequence[int], batch_size: int, seq_len: int,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Bool (B, T): True where the position of step `step` is inside a budget of the first `tokens` tokens;
    (K, B, T) for K budgets."""
    n = batch_size * seq_len
    position = (step * n + torch.arange(n, device=device)).view(batch_size, seq_len)
    if isinstance(tokens, int):
        return position < tokens
    return position.unsqueeze(0) < torch.tensor(list(tokens), device=device).view(-1, 1, 1)


@dataclass(frozen=True)
class TokenStream:
    ids: torch.Tensor  # (N,) int64
    mask: torch.Tensor  # (N,) bool: supervised tokens
    order: tuple[int, ...]  # indices into the conversations, in stream order
    seed: int
    lengths: tuple[int, ...] = ()  # each conversation's tokens, in stream order; () counts the stream as one

    @classmethod
    def build(
        cls,
        conversations: Sequence[dict],
        tokenizer: Tokenizer,
        seed: int,
        max_len: int | None = None,
        source: str | None = None,
    ) -> TokenStream:
        if not conversations:
            raise DataError(f"{source or 'conversations'}: no conversations to build a token stream from")
        order = list(range(len(conversations)))
        random.Random(seed).shuffle(order)
        ids: list[int] = []
        mask: list[int] = []
        lengths: list[int] = []
        for i in order:
            c_ids, c_mask = render_conversation(tokenizer, conversations[i], max_len, index=i, source=source)
            ids += c_ids
            mask += c_mask
            lengths.append(len(c_ids))
        if not any(mask):
            raise DataError(f"{source or 'conversations'}: no supervised (assistant) tokens after rendering")
        return cls(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool), tuple(order), seed,
                   tuple(lengths))

    @property
    def num_tokens(self) -> int:
        return self.ids.numel()

    def window(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat inputs and targets of positions [start, start+count), wrapping around the stream."""
        pos = torch.arange(start, start + count) % self.num_tokens
        nxt = (pos + 1) % self.num_tokens
        targets = torch.where(self.mask[nxt], self.ids[nxt], torch.full_like(nxt, -1))
        return self.ids[pos], targets

    def budgets(self, budgets: Sequence[int]) -> Budgets:
        """What the first N positions hold, for each budget N: its supervised targets and conversations. The
        target of position k is token k+1, so it belongs to token k+1's conversation; past the end the stream
        starts again (a second epoch), and the counts go on."""
        n = self.num_tokens
        supervised = self.mask.roll(-1)  # target k is supervised where token k+1 is
        before = torch.cat([torch.zeros(1, dtype=torch.long), supervised.long().cumsum(0)])  # before[k]: in [0, k)
        # conversation of each target position, then the first supervised target of each conversation
        ends = torch.tensor(self.lengths or (n,)).cumsum(0)
        owner = torch.bucketize(torch.arange(1, n + 1) % n, ends, right=True)
        first = torch.full((len(ends),), n, dtype=torch.long)
        hits = supervised.nonzero().flatten()
        first.scatter_reduce_(0, owner[hits], hits, reduce="amin")
        first = first[first < n].sort().values  # only conversations with a supervised target count
        sizes = {}
        for budget in budgets:
            epochs, rest = divmod(int(budget), n)
            sizes[int(budget)] = DatasetSize(
                tokens=int(budget),
                supervised=epochs * int(before[n]) + int(before[rest]),
                conversations=epochs * len(first) + int(torch.searchsorted(first, rest)),
            )
        return Budgets(int(hits[0]) + 1 if len(hits) else None, sizes)

    def batch(self, step: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each LongTensor (B, T), of positions [step*B*T, (step+1)*B*T)."""
        inputs, targets = self.window(step * batch_size * seq_len, batch_size * seq_len)
        return inputs.view(batch_size, seq_len), targets.view(batch_size, seq_len)


@dataclass(frozen=True)
class EvalSet:
    """The first num_tokens positions of the held-out conversations' own seeded stream (no wrap-around)."""

    stream: TokenStream
    num_tokens: int

    @classmethod
    def build(
        cls,
        conversations: Sequence[dict],
        tokenizer: Tokenizer,
        n_tokens: int | None = None,
        seed: int = EVAL_SEED,
        max_len: int | None = None,
        source: str | None = None,
    ) -> EvalSet:
        stream = TokenStream.build(conversations, tokenizer, seed, max_len, source)
        available = stream.num_tokens - 1  # the last token has no next token to predict
        num_tokens = available if n_tokens is None else min(n_tokens, available)
        first = stream.budgets([]).first_supervised
        if first is not None and first > num_tokens:  # a mean loss over no token: every eval loss undefined
            raise DataError(f"{source or 'held-out conversations'}: the first {num_tokens} held-out tokens hold no "
                            f"supervised (assistant) token; use --eval-tokens {first} or more")
        return cls(stream, num_tokens)

    def batches(self, batch_size: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) batches of up to batch_size rows of seq_len covering the eval tokens.

        The last row is padded (targets -1) and the last batch may have fewer rows, so an exact mean
        loss weights each batch by its count of targets != -1.
        """
        rows = math.ceil(self.num_tokens / seq_len)
        inputs, targets = self.stream.window(0, rows * seq_len)
        targets[self.num_tokens:] = -1
        inputs, targets = inputs.view(rows, seq_len), targets.view(rows, seq_len)
        return [(inputs[r:r + batch_size], targets[r:r + batch_size]) for r in range(0, rows, batch_size)]
