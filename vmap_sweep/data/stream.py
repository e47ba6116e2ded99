"""The fixed token stream every cell of a study trains on, its token budgets, and the eval set.

The training conversations are put in one order fixed by a seed (random.Random(seed).shuffle, which
depends on nothing else), rendered, and laid out as one stream of ids and supervision mask, in one of two layouts:
- rows (nanochat's SFT and the plan author's fine-tuning): one conversation per row of T = --seq-len positions,
  truncated to T tokens and padded with <|assistant_end|> (never a target); a conversation left with no
  supervised target after truncation is dropped (counted in `dropped`). A row attends to its own conversation only.
- packed: conversations concatenated, so a row can span several and an answer can be trained with its document
  in an earlier row, out of view, and an unrelated conversation in view instead (`cut_share` measures how often).
Step s reads stream positions [s*B*T, (s+1)*B*T) as B rows of T; the target of position k is the token
at k+1, or -1 where that token is unsupervised. A budget of N tokens is the first N positions, so it takes
steps_for(N, B*T) steps and the trainer masks positions >= N of the last step with budget_mask. Every budget's
step s is the same tensor. If a budget is longer than the stream, positions wrap around to the start (a second
epoch in the same order), deterministically; under rows the stream is whole rows, so rows stay aligned.
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
    row_len: int | None = None  # rows layout: the row length T (every conversation padded to it); None: packed
    dropped: int = 0  # rows layout: conversations dropped for holding no supervised target within T tokens
    padding: int = 0  # rows layout: positions that are padding

    @classmethod
    def build(
        cls,
        conversations: Sequence[dict],
        tokenizer: Tokenizer,
        seed: int,
        max_len: int | None = None,
        source: str | None = None,
        row_len: int | None = None,
    ) -> TokenStream:
        """The stream of `conversations` in the order of `seed`: packed, or with `row_len` one conversation per row
        of row_len positions (truncated, padded, rows without a supervised target dropped)."""
        if not conversations:
            raise DataError(f"{source or 'conversations'}: no conversations to build a token stream from")
        order = list(range(len(conversations)))
        random.Random(seed).shuffle(order)
        ids: list[int] = []
        mask: list[int] = []
        lengths: list[int] = []
        kept: list[int] = []
        dropped = padding = 0
        pad = tokenizer.special_id("<|assistant_end|>") if row_len is not None else None
        for i in order:
            c_ids, c_mask = render_conversation(tokenizer, conversations[i], max_len, index=i, source=source)
            if row_len is not None:
                c_ids, c_mask = c_ids[:row_len], c_mask[:row_len]
                if not any(c_mask[1:]):  # no supervised target left: nothing to learn from this row
                    dropped += 1
                    continue
                padding += row_len - len(c_ids)
                c_ids = c_ids + [pad] * (row_len - len(c_ids))
                c_mask = c_mask + [0] * (row_len - len(c_mask))
            ids += c_ids
            mask += c_mask
            lengths.append(len(c_ids))
            kept.append(i)
        if not any(mask):
            if row_len is not None and dropped:
                raise DataError(f"{source or 'conversations'}: none of its {dropped} conversations keeps an assistant "
                                f"token within --seq-len {row_len} tokens; raise --seq-len or use --packing")
            raise DataError(f"{source or 'conversations'}: no supervised (assistant) tokens after rendering")
        return cls(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool), tuple(kept), seed,
                   tuple(lengths), row_len, dropped, padding)

    def layout(self, seq_len: int) -> dict:
        """What rows of seq_len positions hold: `rows` (conversations, rows layout), `dropped`, `padding_share`
        (of positions), `supervised_share` (of positions whose target is an answer token), and `cut_share`: of
        the answer targets, those whose row does not hold their conversation's first token (packed: the model
        learns the answer without the document and question in view)."""
        n = self.num_tokens
        supervised = self.mask.roll(-1)
        starts = torch.tensor((0,) + tuple(self.lengths or (n,))).cumsum(0)[:-1]
        owner = torch.bucketize(torch.arange(1, n + 1) % n, starts, right=True) - 1  # conversation of target k
        k = supervised.nonzero().flatten()
        cut = (starts[owner[k]] // seq_len) != (k // seq_len)
        return {"layout": "rows" if self.row_len is not None else "packed",
                "rows": len(self.lengths) if self.row_len is not None else None,
                "dropped": self.dropped, "padding_share": self.padding / n,
                "supervised_share": float(supervised.float().mean()),
                "cut_share": float(cut.float().mean()) if len(k) else 0.0}

    @property
    def num_tokens(self) -> int:
        return self.ids.numel()

    def window(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat inputs and targets of positions [start, start+count), wrapping around the stream."""
        pos = torch.arange(start, start + count) % self.num_tokens
        nxt = (pos + 1) % self.num_tokens
        targets = torch.where(self.mask[nxt], self.ids[nxt], torch.full_like(nxt, -1))
        return self.ids[pos], targets

    def budgets(self, budgets: Sequence[int], unit: str = "tokens") -> Budgets:
        """What each budget holds, by budget. A budget counts `unit`: N tokens are the first N positions; N
        supervised (answer) targets or N conversations (with an answer target) are the shortest prefix of whole
        positions holding that many (`positions`). The target of position k is token k+1, so it belongs to token
        k+1's conversation; past the end the stream starts again (a second epoch), and the counts go on."""
        if unit != "tokens":
            at = self.positions(budgets, unit)
            held = self.budgets(sorted(set(at.values())))
            return Budgets(1 if held.first_supervised is not None else None,
                           {int(n): held.sizes[at[int(n)]] for n in budgets})
        n = self.num_tokens
        hits, first = self._firsts()
        before = torch.cat([torch.zeros(1, dtype=torch.long), self.mask.roll(-1).long().cumsum(0)])
        sizes = {}
        for budget in budgets:
            epochs, rest = divmod(int(budget), n)
            sizes[int(budget)] = DatasetSize(
                tokens=int(budget),
                supervised=epochs * int(before[n]) + int(before[rest]),
                conversations=epochs * len(first) + int(torch.searchsorted(first, rest)),
            )
        return Budgets(int(hits[0]) + 1 if len(hits) else None, sizes)

    def _firsts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The supervised target positions, and each conversation's first one (conversations without one left
        out), ascending."""
        n = self.num_tokens
        supervised = self.mask.roll(-1)  # target k is supervised where token k+1 is
        ends = torch.tensor(self.lengths or (n,)).cumsum(0)
        owner = torch.bucketize(torch.arange(1, n + 1) % n, ends, right=True)
        first = torch.full((len(ends),), n, dtype=torch.long)
        hits = supervised.nonzero().flatten()
        first.scatter_reduce_(0, owner[hits], hits, reduce="amin")
        return hits, first[first < n].sort().values

    def positions(self, counts: Sequence[int], unit: str) -> dict[int, int]:
        """Each count of `unit` as the positions of the shortest prefix holding it: N supervised targets end at
        the N-th one; N conversations end where the N-th with an answer target does (its last token)."""
        if unit == "tokens":
            return {int(c): int(c) for c in counts}
        n = self.num_tokens
        hits, first = self._firsts()
        if unit == "supervised":
            ends = hits + 1
        elif unit == "conversations":
            starts = torch.tensor((0,) + tuple(self.lengths or (n,))).cumsum(0)
            owner = torch.bucketize(first + 1, starts, right=True) - 1  # the conversation of each first target
            ends = starts[owner + 1]
        else:
            raise ValueError(f"unit {unit!r}: tokens, supervised or conversations")
        out = {}
        for c in counts:
            if int(c) < 1 or not len(ends):
                raise DataError(f"a budget of {c} {unit}: give at least 1, in data that holds an answer token")
            epochs, rest = divmod(int(c) - 1, len(ends))
            out[int(c)] = epochs * n + int(ends[rest])
        return out

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
        row_len: int | None = None,
    ) -> EvalSet:
        """row_len: the rows layout's row length, as the training stream's (None: packed)."""
        stream = TokenStream.build(conversations, tokenizer, seed, max_len, source, row_len)
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
