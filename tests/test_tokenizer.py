"""Tokenizers: byte, tiktoken pickle (read safely), HF tokenizer.json; one interface."""

from __future__ import annotations

import os
import pathlib
import pickle
import shutil

import pytest
from helpers import (
    HF_TOKENIZER_VOCAB,
    TIKTOKEN_VOCAB,
    tiktoken_encoding,
    tiktoken_state,
    write_tokenizer_json,
    write_tokenizer_pkl,
)

from vmap_sweep.errors import TokenizerError
from vmap_sweep.model.tokenizer import (
    SPECIAL_TOKENS,
    ByteTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    load_tokenizer,
)

TEXTS = [
    "hello the thing",
    "Ünïcödé, emoji 🙂 and CJK 漢字\n\n  trailing  ",
    "numbers 1234567 and 12 and 123",
    "a <|bos|> and <|assistant_end|> are plain text here",
    "",
]


def test_special_tokens_are_nanochats_nine_in_order():
    assert SPECIAL_TOKENS == [
        "<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
        "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>",
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- bytes


def test_byte_tokenizer_ids_and_round_trip():
    tok = ByteTokenizer()
    assert tok.vocab_size == 265
    assert [tok.special_id(n) for n in SPECIAL_TOKENS] == list(range(256, 265))
    assert tok.bos_id == 256
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))  # special-token strings stay bytes
        assert tok.decode(ids) == text
    assert tok.decode([256, *b"hi", 260]) == "<|bos|>hi<|assistant_end|>"
    with pytest.raises(ValueError):
        tok.decode([265])


def test_unknown_special_name_is_a_tokenizer_error():
    with pytest.raises(TokenizerError, match="no special token"):
        ByteTokenizer().special_id("<|nope|>")


# ---------------------------------------------------------------------------------------------- tiktoken


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_tiktoken_pickle_loads_and_matches_tiktoken(tmp_path, protocol):
    path = write_tokenizer_pkl(tmp_path / "tokenizer.pkl", protocol=protocol)
    tok = TiktokenTokenizer.from_pickle(path)
    ref = tiktoken_encoding()
    assert tok.vocab_size == TIKTOKEN_VOCAB == ref.n_vocab
    specials = tiktoken_state()["special_tokens"]
    assert [tok.special_id(n) for n in SPECIAL_TOKENS] == [specials[n] for n in SPECIAL_TOKENS]
    assert tok.bos_id == specials["<|bos|>"]
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode_ordinary(text)
        assert not set(ids) & set(specials.values())  # "<|bos|>" in text is not the bos token
        assert tok.decode(ids) == text
    ranks = tiktoken_state()["mergeable_ranks"]
    assert tok.encode(" the") == [ranks[b" the"]]  # merges are applied


def test_split_pattern_groups_digits_in_twos(tmp_path):
    # nanochat's \p{N}{1,2}: "123" is split "12" + "3" even though the merge "123" exists (GPT-4 would keep it).
    tok = TiktokenTokenizer.from_pickle(write_tokenizer_pkl(tmp_path / "tokenizer.pkl"))
    ranks = tiktoken_state()["mergeable_ranks"]
    assert tok.encode("123") == [ranks[b"12"], ranks[b"3"]]
    assert tok.encode("12345") == [ranks[b"12"], ranks[b"3"], ranks[b"4"], ranks[b"5"]]


class _Payload:
    """Pickles as a call that would create `target` if unpickled by an unrestricted loader."""

    def __init__(self, how: str, target: pathlib.Path):
        self.how, self.target = how, target

    def __reduce__(self):
        if self.how == "os.system":
            return (os.system, (f"touch {self.target}",))
        if self.how == "builtins.open":
            return (open, (str(self.target), "w"))
        if self.how == "pathlib":
            return (pathlib.Path.touch, (pathlib.Path(self.target),))
        raise AssertionError(self.how)


def _malicious_pickle(how: str, target: pathlib.Path, nested: bool) -> bytes:
    if not nested:
        return pickle.dumps(_Payload(how, target))
    # A genuine tiktoken.Encoding pickle whose state carries the payload where pat_str should be.
    enc = tiktoken_encoding()
    state = dict(tiktoken_state(), pat_str=_Payload(how, target))
    enc.__getstate__ = lambda: state
    return pickle.dumps(enc)


@pytest.mark.parametrize("nested", [False, True], ids=["top-level", "inside-encoding-state"])
@pytest.mark.parametrize("how", ["os.system", "builtins.open", "pathlib"])
def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path, how, nested):
    # Control: the payload is real, plain pickle.loads does create the file.
    control = tmp_path / "control"
    try:
        pickle.loads(_malicious_pickle(how, control, nested))
    except Exception:
        pass  # the nested payload lands in tiktoken's __init__ after it already ran
    assert control.exists()

    target = tmp_path / "pwned"
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(_malicious_pickle(how, target, nested))
    with pytest.raises(TokenizerError, match="refused to unpickle") as err:
        TiktokenTokenizer.from_pickle(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not target.exists()


def test_pickle_naming_a_registered_encoding_is_refused(tmp_path):
    # tiktoken would fetch a registered encoding from the Internet by name; nanochat never pickles that.
    enc = tiktoken_encoding()
    enc.__getstate__ = lambda: "cl100k_base"
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(enc))
    with pytest.raises(TokenizerError, match="registered encoding 'cl100k_base'"):
        TiktokenTokenizer.from_pickle(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is not a pickle", "not a readable pickle"),
        (pickle.dumps({"name": "x"}), "holds no tiktoken Encoding"),
        (pickle.dumps(tiktoken_encoding())[:-40], "not a readable pickle"),  # truncated download
    ],
    ids=["garbage", "plain-dict", "truncated"],
)
def test_unreadable_pickles_are_tokenizer_errors(tmp_path, content, message):
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match=message):
        TiktokenTokenizer.from_pickle(path)


def test_pickled_state_with_wrong_types_is_refused(tmp_path):
    enc = tiktoken_encoding()
    bad = dict(tiktoken_state(), mergeable_ranks={"not bytes": 0})
    enc.__getstate__ = lambda: bad
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(enc))
    with pytest.raises(TokenizerError, match="mergeable_ranks must map bytes"):
        TiktokenTokenizer.from_pickle(path)


def test_tiktoken_save_writes_a_loadable_pickle(tmp_path):
    tok = TiktokenTokenizer.from_state(**tiktoken_state())  # built in memory: no file to copy
    (tmp_path / "out").mkdir()
    name = tok.save(tmp_path / "out")
    again = load_tokenizer(tmp_path / "out" / name)
    assert isinstance(again, TiktokenTokenizer)
    assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1]) and again.vocab_size == tok.vocab_size


# ---------------------------------------------------------------------------------------------- HF


def test_hf_tokenizer_json(tmp_path):
    tok = HFTokenizer.from_file(write_tokenizer_json(tmp_path / "tokenizer.json"))
    assert tok.vocab_size == HF_TOKENIZER_VOCAB
    assert [tok.special_id(n) for n in SPECIAL_TOKENS] == list(range(HF_TOKENIZER_VOCAB - 9, HF_TOKENIZER_VOCAB))
    specials = set(range(HF_TOKENIZER_VOCAB - 9, HF_TOKENIZER_VOCAB))
    ref = tiktoken_encoding()  # same bytes, merges and split pattern: the ids must agree
    for text in TEXTS:
        ids = tok.encode(text)
        assert not set(ids) & specials  # "<|bos|>" in text is not the bos token
        assert ids == ref.encode_ordinary(text)
        assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id]) == "<|bos|>"


def test_hf_tokenizer_bad_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        HFTokenizer.from_file(path)


# ---------------------------------------------------------------------------------------------- load_tokenizer


def test_load_tokenizer_picks_by_name(tmp_path):
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    pkl = write_tokenizer_pkl(tmp_path / "a" / "tokenizer.pkl")
    js = write_tokenizer_json(tmp_path / "b" / "tokenizer.json")
    assert isinstance(load_tokenizer(pkl), TiktokenTokenizer)
    assert isinstance(load_tokenizer(js), HFTokenizer)
    # Folders: tokenizer.pkl, then tokenizer/tokenizer.pkl, then tokenizer.json.
    assert isinstance(load_tokenizer(tmp_path / "a"), TiktokenTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "b"), HFTokenizer)
    nested = tmp_path / "c" / "tokenizer" / "tokenizer.pkl"
    nested.parent.mkdir(parents=True)
    shutil.copy(pkl, nested)
    shutil.copy(js, tmp_path / "c" / "tokenizer.json")
    got = load_tokenizer(tmp_path / "c")
    assert isinstance(got, TiktokenTokenizer) and got.source == nested


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing.pkl", "no such tokenizer file"),
        ("vocab.txt", "unknown tokenizer file type"),
        ("empty", "no tokenizer"),
    ],
)
def test_load_tokenizer_errors(tmp_path, name, message):
    path = tmp_path / name
    if name == "vocab.txt":
        path.write_text("a\nb\n")
    if name == "empty":
        path.mkdir()
    with pytest.raises(TokenizerError, match=message) as err:
        load_tokenizer(path)
    assert str(path) in str(err.value)
