"""Formats users hold: nanochat's CustomJSON, a folder of NAME_train / NAME_val files, padded vocabularies, Hub
repos holding both checkpoint layouts, and the 2026 nanochat architecture."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vmap_sweep.data.sources import data_fingerprint, load_conversations
from vmap_sweep.errors import DataError


def messages(i: int, tag: str = "") -> list[dict]:
    return [{"role": "user", "content": f"{tag}question {i}"}, {"role": "assistant", "content": f"{tag}answer {i}"}]


def write_customjson(path, conversations: list[list[dict]]) -> None:
    """nanochat's tasks/customjson.py format: every line is a JSON array of {role, content} messages."""
    path.write_text("".join(json.dumps(m) + "\n" for m in conversations), encoding="utf-8")


def write_jsonl(path, conversations: list[list[dict]]) -> None:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations), encoding="utf-8")


def write_parquet(path, conversations: list[list[dict]]) -> None:
    pq.write_table(pa.table({"messages": conversations}), path)


# ------------------------------------------------------------------------------------------- CustomJSON


def test_customjson_lines_load_as_conversations_for_training_and_eval(tmp_path):
    path = tmp_path / "identity_conversations.jsonl"
    data = [messages(i) for i in range(40)]
    write_customjson(path, data)
    train, val = load_conversations(str(path), "train"), load_conversations(str(path), "validation")
    assert len(train) == 38 and len(val) == 2
    assert sorted([c["messages"] for c in train + val], key=str) == sorted(data, key=str)
    assert all(set(c) == {"messages"} for c in train + val)


def test_customjson_and_messages_rows_render_the_same(tmp_path):
    data = [messages(i) for i in range(5)]
    write_customjson(tmp_path / "a.jsonl", data)
    write_jsonl(tmp_path / "b.jsonl", data)
    assert load_conversations(str(tmp_path / "a.jsonl")) == load_conversations(str(tmp_path / "b.jsonl"))


def test_customjson_malformed_line_names_file_line_and_problem(tmp_path):
    path = tmp_path / "c.jsonl"
    write_customjson(path, [messages(0), [{"role": "assistant", "content": "no question"}, messages(1)[0]]])
    with pytest.raises(DataError, match=rf"{path}:2: message 0 has role 'assistant', expected 'user'"):
        load_conversations(str(path))
    path.write_text(json.dumps(messages(0)) + "\n" + json.dumps([1, 2]) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: message 0 lacks `role` or `content`"):
        load_conversations(str(path))


# ------------------------------------------------------------------------------------------- data folders


@pytest.mark.parametrize("val_name", ["docvqa_val", "docvqa_validation"])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_folder_of_name_train_and_val_uses_its_validation_split(tmp_path, val_name, suffix):
    write = write_jsonl if suffix == ".jsonl" else write_parquet
    train, val = [messages(i, "t") for i in range(30)], [messages(i, "v") for i in range(7)]
    write(tmp_path / f"docvqa_train{suffix}", train)
    write(tmp_path / f"{val_name}{suffix}", val)
    assert [c["messages"] for c in load_conversations(str(tmp_path), "train")] == train  # all of it, in order
    assert [c["messages"] for c in load_conversations(str(tmp_path), "validation")] == val  # not 5% of train
    fingerprint = data_fingerprint(str(tmp_path))
    write(tmp_path / f"{val_name}{suffix}", val[:3])
    assert data_fingerprint(str(tmp_path)) != fingerprint  # the validation file is part of the data


def test_folder_with_only_name_train_holds_out_a_tail_of_it(tmp_path):
    write_customjson(tmp_path / "docvqa_train.jsonl", [messages(i) for i in range(40)])
    (tmp_path / "notes.jsonl").write_text("not data\n")
    train, val = load_conversations(str(tmp_path), "train"), load_conversations(str(tmp_path), "validation")
    assert len(train) == 38 and len(val) == 2


@pytest.mark.parametrize("files, problem", [
    (["a_train.jsonl", "b_train.jsonl"], r"2 train files \(a_train.jsonl, b_train.jsonl\); keep one"),
    (["train.jsonl", "docvqa_train.parquet"], r"2 train files \(docvqa_train.parquet, train.jsonl\)"),
    (["x_train.jsonl", "x_val.jsonl", "x_validation.jsonl"], r"2 validation files"),
    (["x_train.jsonl", "y_val.jsonl"], r"y_val.jsonl is not the validation split of x_train.jsonl"),
])
def test_ambiguous_folders_are_refused_in_one_line(tmp_path, files, problem):
    for name in files:
        (write_jsonl if name.endswith(".jsonl") else write_parquet)(tmp_path / name, [messages(0), messages(1)])
    for split in ("train", "validation"):
        with pytest.raises(DataError, match=problem) as err:
            load_conversations(str(tmp_path), split)
        assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=problem):
        data_fingerprint(str(tmp_path))


def test_folder_without_a_training_file_names_the_names_it_reads(tmp_path):
    write_jsonl(tmp_path / "docvqa_val.jsonl", [messages(0)])
    with pytest.raises(DataError, match="no training file in this directory; expected train.jsonl/.parquet or "
                                        "NAME_train.jsonl/.parquet"):
        load_conversations(str(tmp_path))
