"""Rows as nanochat's SFT and the plan author's fine-tuning make them: one conversation per row, truncated to
--seq-len, padded with <|assistant_end|>, loss on assistant tokens only, rows without an answer token dropped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import bits

from vmap_sweep.data.render import render_conversation
from vmap_sweep.data.stream import EvalSet, TokenStream
from vmap_sweep.data.synthetic import synthetic_docqa
from vmap_sweep.errors import ConfigError, DataError
from vmap_sweep.model.gpt import GPT, GPTConfig
from vmap_sweep.model.tokenizer import ByteTokenizer
from vmap_sweep.store.db import config_hash
from vmap_sweep.study.config import StudyConfig, preset
from vmap_sweep.study.grid import Cell
from vmap_sweep.study.plan import trunks
from vmap_sweep.train.trainer import TrainConfig
from vmap_sweep.train.trunk import TrunkTrainer

TOK = ByteTokenizer()
PAD = TOK.special_id("<|assistant_end|>")


def conv(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def test_each_row_is_one_conversation_padded_with_assistant_end_and_trained_on_its_answer_only():
    convs = [conv("q" * n, "a" * (n % 3 + 1)) for n in range(1, 9)]
    T = 24
    s = TokenStream.build(convs, TOK, seed=3, row_len=T)
    assert s.num_tokens == len(convs) * T and s.lengths == (T,) * len(convs) and s.dropped == 0
    inputs, targets = s.batch(0, len(convs), T)
    for r, i in enumerate(s.order):
        ids, mask = render_conversation(TOK, convs[i])
        n = len(ids)
        assert inputs[r, :n].tolist() == ids and inputs[r, n:].eq(PAD).all()  # the row starts with its BOS
        want = [ids[k + 1] if mask[k + 1] else -1 for k in range(n - 1)] + [-1] * (T - n + 1)
        assert targets[r].tolist() == want  # nothing of the padding or of the next row is ever a target
    assert s.padding == sum(T - len(render_conversation(TOK, c)[0]) for c in convs)
    assert s.layout(T)["padding_share"] == pytest.approx(s.padding / s.num_tokens)


def test_a_long_conversation_is_truncated_to_the_row_and_one_left_without_an_answer_is_dropped():
    T = 20
    keeps = conv("ab", "x" * 40)  # its answer starts within T tokens and runs past them
    loses = conv("q" * 30, "yes")  # its answer starts after T tokens
    s = TokenStream.build([keeps, loses, conv("c", "d")], TOK, seed=0, row_len=T)
    assert s.dropped == 1 and len(s.lengths) == 2 and 1 not in s.order
    ids, mask = render_conversation(TOK, keeps)
    row = s.order.index(0)
    inputs, targets = s.batch(0, 2, T)
    assert inputs[row].tolist() == ids[:T]  # truncated to T tokens, as the plan author's ids[:max_seq_len]
    assert targets[row, -1] == -1 and (targets[row] != -1).sum() == sum(mask[1:T])
    assert s.layout(T)["dropped"] == 1


def test_rows_that_all_lose_their_answer_are_refused_naming_seq_len():
    with pytest.raises(DataError, match="--seq-len 8 .*raise --seq-len or use --packing"):
        TokenStream.build([conv("q" * 30, "yes")] * 3, TOK, seed=0, row_len=8)


def test_no_answer_is_trained_without_its_document_in_rows_but_packing_cuts_them():
    convs = synthetic_docqa(200, seed=0)
    T = 256
    rows = TokenStream.build(convs, TOK, seed=1, row_len=T)
    packed = TokenStream.build(convs, TOK, seed=1)
    assert rows.layout(T)["cut_share"] == 0.0
    assert packed.layout(T)["cut_share"] > 0.5  # ~190-token conversations in 256-token rows


def test_row_budgets_count_whole_rows_and_wrap_around_aligned():
    convs = [conv("q" * n, "ans") for n in range(1, 6)]
    T = 16
    s = TokenStream.build(convs, TOK, seed=0, row_len=T)
    sup_per_row = [int(s.window(r * T, T)[1].ne(-1).sum()) for r in range(5)]
    sizes = s.budgets([T, 3 * T, 5 * T, 7 * T]).sizes
    assert [sizes[n].conversations for n in (T, 3 * T, 5 * T, 7 * T)] == [1, 3, 5, 7]
    assert sizes[7 * T].supervised == sum(sup_per_row) + sum(sup_per_row[:2])
    # a second epoch starts on a row boundary: step 5's first row is row 0 again
    assert torch.equal(s.batch(5, 1, T)[0], s.batch(0, 1, T)[0])


def test_eval_set_takes_the_same_rows():
    convs = synthetic_docqa(20, seed=2)
    ev = EvalSet.build(convs, TOK, n_tokens=4 * 256, row_len=256)
    inputs, targets = ev.batches(2, 256)[0]
    assert inputs[:, 0].eq(TOK.bos_id).all()  # every row starts a conversation
    assert ev.stream.row_len == 256


def test_new_studies_default_to_rows_and_old_ones_still_read_as_packed():
    new = StudyConfig(model="tiny", data="synthetic")
    assert new.packing is False and new.to_dict()["packing"] is False
    assert StudyConfig.from_dict(new.to_dict()) == new
    # a study stored before the option existed: no `packing`, no `budget_unit` field
    old = preset("tiny").to_dict()
    assert "packing" not in old and "budget_unit" not in old
    read = StudyConfig.from_dict(old)
    assert read.packing is True and read.budget_unit == "tokens" and read.row_len is None
    assert config_hash(read.to_dict()) == config_hash(old)  # it resumes: the same hash as stored


def test_a_config_is_checked_where_it_is_made_and_a_stored_one_can_be_read_unchecked():
    with pytest.raises(ConfigError, match="--budget-unit 'answers'"):
        StudyConfig(model="tiny", data="synthetic", budget_unit="answers")
    with pytest.raises(ConfigError, match="--seq-len must be at least 1"):
        preset("tiny").with_overrides(seq_len=0)
    # a stored config this vmap-sweep would not train: refused as a config, read as it is for its measures
    stored = {**preset("tiny").to_dict(), "resolution": "1", "eval_tokens": -5}
    with pytest.raises(ConfigError, match="resolution"):
        StudyConfig.from_dict(stored)
    read = StudyConfig.from_dict(stored, check=False)
    assert (read.resolution, read.eval_tokens, read.packing, read.budget_unit) == ("1", -5, True, "tokens")
    assert read.fixed == {} and read.tokenizer is None and read.axes[0].name == "lr"


def _model(vocab: int) -> GPT:
    model = GPT(GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights(0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def test_rows_keep_read_outs_bitwise_equal_to_cells_trained_alone():
    """Shared trajectories and partial last steps are the same on a rows stream as on a packed one."""
    T, B = 64, 2
    convs = [conv("doc " + "x" * (k % 23), "answer " + "y" * (k % 7)) for k in range(12)]
    stream = TokenStream.build(convs, TOK, seed=5, row_len=T)
    base = _model(TOK.vocab_size)
    cfg = TrainConfig(optimizer="adamw", schedule="constant", rows_per_step=B, seq_len=T, divergence_ratio=3.0)
    cells = [Cell(0, j, 1e-2, n, {"lr": 1e-2, "tokens": n}) for j, n in enumerate([40, 128, 200, 384])]
    (lane,) = trunks(cells, "constant", B * T)
    got = TrunkTrainer(base, [[c.hparams for c in lane]], cfg).run(stream)
    for cell, rec in zip(lane, got, strict=True):
        alone = TrunkTrainer.separate(base, [cell.hparams], cfg, "cpu").run(stream)[0]
        for field in ("losses", "base_losses", "grad_norms"):
            assert np.array_equal(bits(getattr(rec, field)), bits(getattr(alone, field))), (cell.y, field)
