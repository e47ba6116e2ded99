"""SFT data layer: rendering, sources and splits, the seeded token stream, budgets, the eval set."""

import json
import math
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vmap_sweep.data import sources
from vmap_sweep.data.render import render_conversation
from vmap_sweep.data.sources import holdout_indices, load_conversations
from vmap_sweep.data.stream import EvalSet, TokenStream, budget_mask
from vmap_sweep.data.synthetic import synthetic_docqa
from vmap_sweep.errors import ConfigError, DataError
from vmap_sweep.model.tokenizer import ByteTokenizer
from vmap_sweep.study.plan import steps_for

TOK = ByteTokenizer()
BOS, US, UE, AS, AE = 256, 257, 258, 259, 260


def conv(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def rows(n: int) -> list[dict]:
    return [conv(("user", f"question {i}"), ("assistant", f"answer {i}")) for i in range(n)]


def write_jsonl(path, data) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))


def user_texts(conversations) -> set[str]:
    return {c["messages"][0]["content"] for c in conversations}


# ------------------------------------------------------------------------------------------- render


def test_render_ids_and_mask_follow_nanochat():
    ids, mask = render_conversation(TOK, conv(("user", "hi"), ("assistant", "yo")), None)
    assert ids == [BOS, US, ord("h"), ord("i"), UE, AS, ord("y"), ord("o"), AE]
    assert mask == [0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_render_multi_turn_masks_only_assistant_content_and_end():
    two_turns = conv(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    ids, mask = render_conversation(TOK, two_turns, None)
    assert ids == [BOS, US, 97, UE, AS, 98, AE, US, 99, UE, AS, 100, AE]
    assert mask == [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1]


def test_render_merges_leading_system_message_into_first_user():
    with_system = conv(("system", "be brief"), ("user", "hi"), ("assistant", "yo"))
    merged = conv(("user", "be brief\n\nhi"), ("assistant", "yo"))
    assert render_conversation(TOK, with_system, None) == render_conversation(TOK, merged, None)


def test_render_truncates_and_keeps_special_strings_as_text():
    ids, mask = render_conversation(TOK, conv(("user", "<|bos|>"), ("assistant", "yo")), None)
    assert ids[2:9] == list(b"<|bos|>")  # content text is never a special token
    short_ids, short_mask = render_conversation(TOK, conv(("user", "<|bos|>"), ("assistant", "yo")), 5)
    assert short_ids == ids[:5] and short_mask == mask[:5]


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"text": "hi"}, "no `messages`"),
        ({"messages": "hi"}, "not a list"),
        ({"messages": [{"role": "user"}]}, "lacks `role` or `content`"),
        (conv(("user", "a"), ("user", "b")), "expected 'assistant'"),
        (conv(("assistant", "a"), ("user", "b")), "expected 'user'"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "not a string"),
        (conv(("user", "a")), "no assistant turn"),
        ({"messages": []}, "no assistant turn"),
        (conv(("system", "s"), ("assistant", "a")), "system message must be followed by a user"),
    ],
)
def test_render_malformed_rows_name_row_source_and_problem(row, problem):
    with pytest.raises(DataError) as e:
        render_conversation(TOK, row, None, index=17, source="mine.jsonl")
    assert "mine.jsonl row 17" in str(e.value) and problem in str(e.value)


# ------------------------------------------------------------------------------------------- sources


def test_synthetic_source_splits_are_deterministic_and_disjoint():
    train, val = load_conversations("synthetic", "train"), load_conversations("synthetic", "validation")
    assert len(train) > len(val) > 0
    assert load_conversations("synthetic", "train") == train
    assert not user_texts(train) & user_texts(val)


def test_jsonl_holdout_tail_is_fixed_disjoint_and_complete(tmp_path):
    path = tmp_path / "data.jsonl"
    data = rows(100)
    write_jsonl(path, data)
    train, val = load_conversations(str(path), "train"), load_conversations(str(path), "validation")
    assert len(val) == 5 and len(train) == 95  # 5% held out
    assert not user_texts(train) & user_texts(val)
    assert user_texts(train) | user_texts(val) == user_texts(data)
    assert train == [r for i, r in enumerate(data) if i not in holdout_indices(100)]  # file order kept
    assert load_conversations(str(path), "validation") == val
    assert val != data[-5:]  # a seeded permutation's tail, not the file's tail


def test_parquet_source_reads_messages_column(tmp_path):
    path = tmp_path / "data.parquet"
    data = rows(40)
    pq.write_table(pa.table({"messages": [r["messages"] for r in data], "id": list(range(40))}), path)
    train, val = load_conversations(str(path), "train"), load_conversations(str(path), "validation")
    assert len(train) + len(val) == 40 and len(val) == 2
    assert all(set(r) == {"messages"} for r in train + val)  # other columns are not carried along
    assert user_texts(train) | user_texts(val) == user_texts(data)


def test_parquet_without_messages_column(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), path)
    with pytest.raises(DataError, match="no `messages` column"):
        load_conversations(str(path))


def test_directory_with_validation_file_uses_it(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", rows(10))
    write_jsonl(tmp_path / "validation.jsonl", rows(13)[10:])
    assert load_conversations(str(tmp_path), "train") == rows(10)
    assert load_conversations(str(tmp_path), "validation") == rows(13)[10:]


def test_jsonl_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rows(1)[0]) + "\n\n{not json\n")
    with pytest.raises(DataError, match=rf"{path}:3: invalid JSON"):
        load_conversations(str(path))
    path.write_text(json.dumps(rows(1)[0]) + "\n" + json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: no `messages` field"):
        load_conversations(str(path))


def test_malformed_rows_name_file_line_or_row_whatever_the_split(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, rows(3) + [conv(("user", "a"), ("user", "b"))] + [{"text": "x"}])
    for split in ("train", "validation"):  # validated before the split: the file's own numbering
        with pytest.raises(DataError, match=rf"{path}:4: message 1 has role 'user', expected 'assistant'"):
            load_conversations(str(path), split)
    path = tmp_path / "bad.parquet"
    data = rows(3) + [conv(("assistant", "a"), ("user", "b"))]
    pq.write_table(pa.table({"messages": [r["messages"] for r in data]}), path)
    with pytest.raises(DataError, match=rf"{path} row 3: message 0 has role 'assistant'"):
        load_conversations(str(path), "validation")


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_dataset_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="empty"):
        load_conversations(str(path))


def test_single_row_file_trains_on_it_and_has_no_validation(tmp_path):
    path = tmp_path / "one.jsonl"
    write_jsonl(path, rows(1))
    assert load_conversations(str(path), "train") == rows(1)
    with pytest.raises(DataError, match="too few to hold out"):
        load_conversations(str(path), "validation")


def test_missing_file_and_unknown_split(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_conversations(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="no such file or directory"):  # a path, not a Hub id
        load_conversations(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="unknown split 'test'"):
        load_conversations("synthetic", "test")


def test_hub_source_goes_through_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{**r, "extra": 1} for r in rows(4)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_conversations(sources.DEFAULT_DATASET, "validation") == rows(4)
    assert calls == [("morgan/docvqa-nanochat", "validation")]


def test_hub_unreachable_is_a_clear_data_error(monkeypatch):
    import datasets

    def offline(name, split):
        raise ConnectionError("Couldn't reach 'morgan/docvqa-nanochat' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        load_conversations("morgan/docvqa-nanochat")
    msg = str(e.value)
    assert "'morgan/docvqa-nanochat'" in msg and "HF_HUB_OFFLINE" in msg and ".jsonl" in msg
    assert "\n" not in msg


# ------------------------------------------------------------------------------------------- stream


def test_stream_is_the_seeded_order_of_rendered_conversations():
    convs = synthetic_docqa(30, seed=0)
    s = TokenStream.build(convs, TOK, seed=11)
    expected = list(range(30))
    random.Random(11).shuffle(expected)
    assert list(s.order) == expected
    rendered = [render_conversation(TOK, convs[i], None) for i in expected]
    assert s.ids.tolist() == [t for ids, _ in rendered for t in ids]
    assert s.mask.tolist() == [bool(m) for _, mask in rendered for m in mask]


def test_order_fixed_by_seed_and_independent_of_content():
    a, b = synthetic_docqa(50, seed=0), synthetic_docqa(50, seed=1)
    assert TokenStream.build(a, TOK, seed=3).order == TokenStream.build(b, TOK, seed=3).order
    assert TokenStream.build(a, TOK, seed=3).order != TokenStream.build(a, TOK, seed=4).order


def test_same_seed_gives_identical_batches_different_seed_different():
    convs = synthetic_docqa(40, seed=0)
    s1, s2, s3 = (TokenStream.build(convs, TOK, seed=k) for k in (5, 5, 6))
    for step in range(12):
        x1, y1 = s1.batch(step, 2, 64)
        x2, y2 = s2.batch(step, 2, 64)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert x1.shape == y1.shape == (2, 64) and x1.dtype == y1.dtype == torch.long
    assert not torch.equal(s1.batch(0, 2, 64)[0], s3.batch(0, 2, 64)[0])


def test_targets_are_next_token_or_minus_one_when_unsupervised():
    s = TokenStream.build(synthetic_docqa(10, seed=0), TOK, seed=0)
    x, y = s.batch(1, 3, 32)
    pos = 96 + torch.arange(96)
    assert torch.equal(x.flatten(), s.ids[pos])
    nxt = pos + 1
    expected = torch.where(s.mask[nxt], s.ids[nxt], -1)
    assert torch.equal(y.flatten(), expected)
    assert (y == -1).any() and (y != -1).any()


def position_stream(length: int) -> TokenStream:
    """A stream whose token at position k is k, so a batch's inputs show which positions it read."""
    return TokenStream(torch.arange(length), torch.ones(length, dtype=torch.bool), (0,), seed=0)


@pytest.mark.parametrize("n_tokens", [1, 63, 64, 100, 500, 1000, 2500])
def test_budget_of_n_tokens_is_exactly_the_first_n_positions(n_tokens):
    B, T, length = 2, 32, 1000
    s = position_stream(length)
    steps = steps_for(n_tokens, B * T)
    assert steps == math.ceil(n_tokens / (B * T))
    seen = []
    for step in range(steps):
        x, _ = s.batch(step, B, T)
        m = budget_mask(step, n_tokens, B, T)
        assert m.shape == (B, T) and m.dtype == torch.bool
        seen += x[m].tolist()
    # Positions wrap around the stream (an epoch) deterministically when the budget is longer.
    assert seen == [k % length for k in range(n_tokens)]
    assert budget_mask(steps, n_tokens, B, T).sum() == 0


def test_wrap_around_repeats_the_stream_in_the_same_order():
    s = TokenStream.build(synthetic_docqa(5, seed=0), TOK, seed=0)
    n = s.num_tokens
    x, y = s.window(n - 3, 6)
    assert x.tolist() == s.ids[[n - 3, n - 2, n - 1, 0, 1, 2]].tolist()
    assert y[2] == -1  # the next conversation's <|bos|> is never a target


def test_steps_for_rejects_empty_budgets():
    assert steps_for(1, 64) == 1 and steps_for(128, 64) == 2 and steps_for(129, 64) == 3
    with pytest.raises(ConfigError):
        steps_for(0, 64)
    with pytest.raises(ConfigError):
        steps_for(10, 0)


def test_empty_conversations_are_a_data_error():
    with pytest.raises(DataError, match="no conversations"):
        TokenStream.build([], TOK, seed=0, source="x.jsonl")


# ------------------------------------------------------------------------------------------- eval set


def test_eval_set_is_the_first_n_tokens_of_its_own_seeded_stream():
    val = load_conversations("synthetic", "validation")
    ev = EvalSet.build(val, TOK, n_tokens=1000)
    assert ev.num_tokens == 1000
    batches = ev.batches(3, 64)
    assert [x.shape[0] for x, _ in batches] == [3, 3, 3, 3, 3, 1]  # ceil(1000/64) = 16 rows
    x = torch.cat([b[0] for b in batches]).flatten()
    y = torch.cat([b[1] for b in batches]).flatten()
    assert torch.equal(x[:1000], ev.stream.ids[:1000])
    assert (y[1000:] == -1).all()
    nxt = torch.arange(1, 1001)
    assert torch.equal(y[:1000], torch.where(ev.stream.mask[nxt], ev.stream.ids[nxt], -1))
    again = EvalSet.build(val, TOK, n_tokens=1000).batches(3, 64)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))


def test_eval_set_is_capped_by_the_available_tokens():
    ev = EvalSet.build(rows(3), TOK, n_tokens=10**6)
    assert ev.num_tokens == ev.stream.num_tokens - 1
    assert sum(int((y != -1).sum()) for _, y in ev.batches(4, 16)) == int(ev.stream.mask[1:].sum())


@pytest.mark.parametrize("kind", ["synthetic", "jsonl"])
def test_train_stream_and_eval_set_share_no_conversation(tmp_path, kind):
    source = "synthetic"
    if kind == "jsonl":
        source = str(tmp_path / "d.jsonl")
        write_jsonl(tmp_path / "d.jsonl", synthetic_docqa(200, seed=9))
    train, val = load_conversations(source, "train"), load_conversations(source, "validation")
    stream = TokenStream.build(train, TOK, seed=0)
    ev = EvalSet.build(val, TOK)
    in_train = {train[i]["messages"][0]["content"] for i in stream.order}
    in_eval = {val[i]["messages"][0]["content"] for i in ev.stream.order}
    assert in_train and in_eval and not in_train & in_eval


def test_data_fingerprint_follows_the_files_a_source_reads(tmp_path):
    from vmap_sweep.data.sources import data_fingerprint

    write_jsonl(tmp_path / "train.jsonl", rows(4))
    folder = data_fingerprint(str(tmp_path))
    assert folder is not None and data_fingerprint(str(tmp_path / "train.jsonl")) == folder  # the same one file
    (tmp_path / "notes.jsonl").write_text("not read by the loader\n")
    assert data_fingerprint(str(tmp_path)) == folder
    write_jsonl(tmp_path / "validation.jsonl", rows(2))
    assert data_fingerprint(str(tmp_path)) != folder
    assert data_fingerprint("synthetic") is None and data_fingerprint("some-org/some-dataset") is None


def test_an_eval_set_without_an_answer_token_is_refused_naming_the_smallest_that_has_one():
    from vmap_sweep.data.stream import EvalSet

    conversations = synthetic_docqa(10, seed=0)
    first = TokenStream.build(conversations, TOK, seed=7).budgets([]).first_supervised
    with pytest.raises(DataError, match=rf"the first 20 held-out tokens hold no supervised .*--eval-tokens {first} or"):
        EvalSet.build(conversations, TOK, n_tokens=20, source="held-out")
    assert EvalSet.build(conversations, TOK, n_tokens=first).num_tokens == first
