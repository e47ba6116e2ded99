"""lm-evaluation-harness adapter: one of our GPTs (with its tokenizer) as an ``lm_eval`` LM.

lm-eval is an optional extra, so importing this module without it raises a ConfigError with the install
hint instead of an ImportError deep inside a command.

Every request starts from ``<|bos|>``, as nanochat's documents do. A context longer than the model's
``sequence_len`` is cut from the left (the continuation, which is what is scored, is kept).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vmap_sweep.errors import ConfigError
from vmap_sweep.model.gpt import GPT
from vmap_sweep.model.tokenizer import Tokenizer

INSTALL_HINT = "pip install 'vmap-sweep[eval]'"


def require_lm_eval():
    """The lm_eval package, or a ConfigError naming the extra that installs it."""
    try:
        import lm_eval
        import lm_eval.api.model
        import lm_eval.evaluator
        import lm_eval.tasks
        import lm_eval.utils
    except ImportError as e:
        raise ConfigError(f"evaluation needs lm-evaluation-harness, which is not installed ({e}); "
                          f"run: {INSTALL_HINT}") from None
    return lm_eval


lm_eval = require_lm_eval()

# One scoring request at token level: (context ids, non-empty continuation ids).
TokenPair = tuple[list[int], list[int]]


class VmapSweepLM(lm_eval.api.model.LM):
    """Our GPT behind lm-eval's three request types. Requests are scored in batches of ``batch_size``
    rows, longest first, right-padded (causal attention makes padding after a row's tokens harmless)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, device: str | torch.device = "cpu", batch_size: int = 16,
                 max_gen_toks: int = 256, autocast: bool = True):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
        self._device = torch.device(device)
        self.model = model.to(self._device).eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = int(model.config.sequence_len)
        self.bos = tokenizer.bos_id
        # bf16 autocast on CUDA as nanochat runs inference; float32 on CPU (exact, and what the tests check).
        self.autocast = autocast and self._device.type == "cuda"

    # ---------------------------------------------------------------------------------------- helpers

    def _ctx(self):
        return torch.autocast(device_type=self._device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def _encode_pair(self, context: str, continuation: str) -> TokenPair:
        """As lm-eval's HF model does: trailing spaces of the context move to the continuation, and the
        continuation's ids are those of the whole string after the context's (BPE merges across the seam)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        if whole[: len(ctx)] != ctx:  # the seam merged into one token: score the continuation on its own
            return [self.bos, *ctx], self.tokenizer.encode(continuation)
        return [self.bos, *ctx], whole[len(ctx):]

    @torch.no_grad()
    def score_tokens(self, pairs: Sequence[TokenPair]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation, whether greedy decoding produces it) per pair."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        rows = []
        for n, (ctx, cont) in enumerate(pairs):
            if not cont:
                results[n] = (0.0, True)
                continue
            full = (list(ctx) + list(cont))[-(self.max_length + 1):]
            n_cont = min(len(cont), len(full) - 1)
            rows.append((n, full[:-1], full[len(full) - n_cont:]))
        rows.sort(key=lambda r: -len(r[1]))
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            width = len(batch[0][1])
            inp = torch.zeros(len(batch), width, dtype=torch.long)
            for b, (_, ids, _) in enumerate(batch):
                inp[b, : len(ids)] = torch.tensor(ids)
            with self._ctx():
                h = self.model.hidden(inp.to(self._device))
            # Only the continuation's positions go through lm_head: a full (B, T, vocab) is too big for d20.
            picked = torch.cat([h[b, len(ids) - len(tgt): len(ids)] for b, (_, ids, tgt) in enumerate(batch)])
            with self._ctx():
                logits = self.model.logits(picked)
            logp = F.log_softmax(logits.float(), dim=-1)
            targets = torch.tensor([t for _, _, tgt in batch for t in tgt], device=self._device)
            token_lp = logp.gather(1, targets[:, None]).squeeze(1).cpu()
            greedy = (logp.argmax(-1) == targets).cpu()
            offset = 0
            for n, _, tgt in batch:
                sl = slice(offset, offset + len(tgt))
                results[n] = (float(token_lp[sl].double().sum()), bool(greedy[sl].all()))
                offset += len(tgt)
        return results  # type: ignore[return-value]

    # ---------------------------------------------------------------------------------------- lm-eval API

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        out = self.score_tokens(pairs)
        for req, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Each text's total log-likelihood after <|bos|>: lm-eval's rolling windows (context_len=1, as its
        HF model uses them), disjoint windows of sequence_len predictions, the first one after <|bos|> and
        the last one filled up with the preceding tokens as context."""
        utils = lm_eval.utils
        pairs: list[TokenPair] = []
        owner: list[int] = []
        for n, req in enumerate(requests):
            (text,) = req.args
            windows = utils.get_rolling_token_windows(
                token_list=self.tokenizer.encode(text), prefix_token=self.bos, max_seq_len=self.max_length,
                context_len=1)
            for ctx, cont in map(utils.make_disjoint_window, windows):
                pairs.append((ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (lp, _) in zip(owner, self.score_tokens(pairs), strict=True):
            totals[n] += lp
        for req, res in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        return totals

    def generate_until(self, requests) -> list[str]:
        args = [(context, dict(gen_kwargs or {})) for context, gen_kwargs in (r.args for r in requests)]
        out: list[str] = []
        for start in range(0, len(args), self.batch_size):
            out += self._generate(args[start:start + self.batch_size])
        for req, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, res)
        return out

    @torch.no_grad()
    def _generate(self, batch: list[tuple[str, dict]]) -> list[str]:
        """Greedy decoding of a batch (sampling options are ignored: the study compares models, not samples)
        until a stop string, <|bos|> (a new document) or max_gen_toks tokens. Rows are right-padded, so each
        row's next token is read at its own last position; the model sees a row's last sequence_len tokens."""
        untils, limits, ids = [], [], []
        for context, kw in batch:
            until = kw.get("until") or []
            untils.append([until] if isinstance(until, str) else [s for s in until if s])
            limits.append(int(kw.get("max_gen_toks", self.max_gen_toks)))
            ids.append([self.bos, *self.tokenizer.encode(context)])
        new: list[list[int]] = [[] for _ in batch]
        texts = [""] * len(batch)
        active = [n for n in range(len(batch)) if limits[n] > 0]
        while active:
            windows = [ids[n][-self.max_length:] for n in active]
            inp = torch.zeros(len(active), max(map(len, windows)), dtype=torch.long)
            for b, w in enumerate(windows):
                inp[b, : len(w)] = torch.tensor(w)
            with self._ctx():
                h = self.model.hidden(inp.to(self._device))
                last = h[torch.arange(len(active)), torch.tensor([len(w) - 1 for w in windows])]
                tokens = self.model.logits(last).float().argmax(-1).tolist()
            still = []
            for n, token in zip(active, tokens, strict=True):
                if token == self.bos:
                    continue
                ids[n].append(token)
                new[n].append(token)
                texts[n] = self.tokenizer.decode(new[n])
                if len(new[n]) < limits[n] and not any(s in texts[n] for s in untils[n]):
                    still.append(n)
            active = still
        out = []
        for text, until in zip(texts, untils, strict=True):
            cuts = [text.index(s) for s in until if s in text]
            out.append(text[: min(cuts)] if cuts else text)
        return out
