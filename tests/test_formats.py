"""Formats users hold: nanochat's CustomJSON, a folder of NAME_train / NAME_val files, padded vocabularies, Hub
repos holding both checkpoint layouts, and the 2026 nanochat architecture."""

import json
import re
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import cli, ok
from helpers import (
    TIKTOKEN_VOCAB,
    random_model,
    tiny_config,
    with_bf16_wte,
    write_native_checkpoint,
    write_tokenizer_json,
    write_tokenizer_pkl,
)

from vmap_sweep.data.sources import data_fingerprint, load_conversations
from vmap_sweep.errors import CheckpointError, DataError
from vmap_sweep.model.checkpoint import _pick_hub_files, load_model, weight_files
from vmap_sweep.model.generate import generate
from vmap_sweep.model.gpt import GPT
from vmap_sweep.model.hf_format import save_hf_model
from vmap_sweep.model.tokenizer import load_tokenizer
from vmap_sweep.study.config import preset


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


# ------------------------------------------------------------------------------------------- padded vocabularies


def write_padded_native(folder, model, step: int = 5, multiple: int = 64, lm_rows: int | None = None):
    """A native checkpoint as nanochat writes it since December 2025: wte and lm_head padded with rows up to a
    multiple of 64, meta's vocab_size the tokenizer's. The padding rows of lm_head point far along the hidden
    states' mean, so any forward that kept them would argmax and sample them."""
    v = model.config.vocab_size
    padded = -(-v // multiple) * multiple
    state = {k: t.detach().clone() for k, t in model.state_dict().items()}
    gen = torch.Generator().manual_seed(7)
    wte = torch.randn(padded, model.config.n_embd, generator=gen)
    wte[:v] = state["transformer.wte.weight"]
    lm = torch.full((lm_rows or padded, model.config.n_embd), 50.0)
    lm[:v] = state["lm_head.weight"]
    state["transformer.wte.weight"], state["lm_head.weight"] = wte.to(torch.bfloat16), lm
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"_orig_mod." + k: t for k, t in state.items()}, folder / f"model_{step:06d}.pt")
    c = model.config
    mc = dict(sequence_len=c.sequence_len, vocab_size=v, n_layer=c.n_layer, n_head=c.n_head, n_kv_head=c.n_kv_head,
              n_embd=c.n_embd)
    (folder / f"meta_{step:06d}.json").write_text(json.dumps({"step": step, "model_config": mc}))
    return state


def nanochat_padded_logits(state: dict, config, ids: torch.Tensor) -> torch.Tensor:
    """nanochat's forward on a padded model: every row in the matmul, then the logits sliced to the vocab."""
    padded = GPT(replace(config, vocab_size=state["lm_head.weight"].shape[0]))
    padded.load_state_dict({k: t.float() for k, t in state.items()})
    with torch.no_grad():
        return padded.logits(padded.hidden(ids))[..., : config.vocab_size], padded


def test_padded_vocab_checkpoint_loads_with_nanochats_logits_and_never_yields_padding(tmp_path):
    config = tiny_config(vocab_size=TIKTOKEN_VOCAB)  # 276 tokens: padded to 320 rows
    state = write_padded_native(tmp_path, random_model(config, seed=3))
    write_tokenizer_pkl(tmp_path / "tokenizer.pkl")
    loaded = load_model(tmp_path)
    assert loaded.config.vocab_size == TIKTOKEN_VOCAB and state["lm_head.weight"].shape[0] == 320
    assert loaded.model.lm_head.weight.shape[0] == loaded.model.transformer.wte.weight.shape[0] == TIKTOKEN_VOCAB
    ids = torch.randint(0, TIKTOKEN_VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    ref, padded_model = nanochat_padded_logits(state, config, ids)
    with torch.no_grad():
        got = loaded.model(ids)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        targets = ids.roll(-1, 1)
        loss = F.cross_entropy(ref.flatten(0, 1), targets.flatten())  # nanochat's loss: over the vocab only
        torch.testing.assert_close(loaded.model(ids, targets), loss, rtol=1e-6, atol=1e-6)
        weights = torch.full(targets.shape, 1.0 / targets.numel())
        torch.testing.assert_close(loaded.model(ids, targets, weights), loss, rtol=1e-5, atol=1e-6)
        # the padding rows win most argmaxes of the uncropped model: what loading must never expose
        assert (padded_model(ids).argmax(-1) >= TIKTOKEN_VOCAB).float().mean() > 0.5
    prompt = ids[0].tolist()
    greedy = generate(loaded.model, prompt, stop=set(), max_tokens=8)
    sampled = generate(loaded.model, prompt, stop=set(), max_tokens=8, temperature=5.0,
                       generator=torch.Generator().manual_seed(0))
    assert len(greedy) == len(sampled) == 8 and max(greedy + sampled) < TIKTOKEN_VOCAB


@pytest.mark.parametrize("lm_rows", [300, 384])
def test_padding_that_is_not_nanochats_is_refused_as_before(tmp_path, lm_rows):
    config = tiny_config(vocab_size=TIKTOKEN_VOCAB)
    write_padded_native(tmp_path, random_model(config, seed=3), lm_rows=lm_rows)
    write_tokenizer_pkl(tmp_path / "tokenizer.pkl")
    with pytest.raises(CheckpointError, match=r"has shape \(\d+, 32\) but the config implies \(276, 32\)"):
        load_model(tmp_path)


# ------------------------------------------------------------------------------------------- both layouts


def both_layouts(folder, config):
    """A folder (or Hub snapshot) holding a native checkpoint and a transformers port of another model; returns
    (native model as loaded, port as loaded): different weights, so a test can tell which one came."""
    native, port = random_model(config, seed=11), random_model(config, seed=12)
    write_native_checkpoint(folder, native, step=650)
    write_tokenizer_pkl(folder / "tokenizer.pkl")
    save_hf_model(folder, port, load_tokenizer(folder / "tokenizer.pkl"))
    write_tokenizer_json(folder / "tokenizer.json")  # what a Hub port serves
    assert {"config.json", "model.safetensors", "model_000650.pt", "meta_000650.json"} <= {
        p.name for p in folder.iterdir()}
    return with_bf16_wte(native), port


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_folder_with_both_layouts_loads_native_by_default_and_says_why(tmp_path, capsys):
    native, port = both_layouts(tmp_path / "m", tiny_config(vocab_size=TIKTOKEN_VOCAB))
    loaded = load_model(tmp_path / "m")
    assert same_weights(loaded.model, native) and not same_weights(loaded.model, port)
    line = capsys.readouterr().err.strip()
    assert line == (f"{tmp_path / 'm'}: holds both nanochat's native model_XXXXXX.pt and a transformers port "
                    "(config.json + safetensors); loading the native one (the default: what nanochat trained, "
                    "not a conversion); --model-format transformers loads the other")
    load_model(tmp_path / "m")
    assert capsys.readouterr().err == ""  # said once
    hf = load_model(tmp_path / "m", model_format="transformers")
    assert same_weights(hf.model, port)
    assert "loading the transformers one (--model-format transformers)" in capsys.readouterr().err
    assert same_weights(load_model(tmp_path / "m", model_format="native").model, native)
    assert weight_files(tmp_path / "m") == [tmp_path / "m" / "model_000650.pt"]
    assert weight_files(tmp_path / "m", model_format="transformers") == [tmp_path / "m" / "model.safetensors"]


def test_a_hub_snapshot_with_both_layouts_follows_model_format(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    snapshot = cache / "models--someone--nanochat-d2" / "snapshots" / ("ab" * 20)
    (snapshot.parents[1] / "refs").mkdir(parents=True)
    (snapshot.parents[1] / "refs" / "main").write_text("ab" * 20)
    native, port = both_layouts(snapshot, tiny_config(vocab_size=TIKTOKEN_VOCAB))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert same_weights(load_model("someone/nanochat-d2").model, native)
    assert "someone/nanochat-d2: holds both" in capsys.readouterr().err
    assert same_weights(load_model("someone/nanochat-d2", model_format="transformers").model, port)


def test_hub_file_lists_pick_the_files_of_the_chosen_layout():
    files = ["config.json", "model.safetensors", "tokenizer.json", "README.md",
             "chatsft_checkpoints/d20/model_000650.pt", "chatsft_checkpoints/d20/meta_000650.json",
             "tokenizer/tokenizer.pkl"]
    assert _pick_hub_files("o/n", files, None) == (
        "chatsft_checkpoints/d20", ["chatsft_checkpoints/d20/model_000650.pt",
                                    "chatsft_checkpoints/d20/meta_000650.json", "tokenizer/tokenizer.pkl"])
    assert _pick_hub_files("o/n", files, None, "transformers") == (
        "", ["config.json", "model.safetensors", "tokenizer.json"])


@pytest.mark.parametrize("held, asked, problem", [
    ("native", "transformers", "holds no transformers port (config.json + safetensors), only nanochat's native "
                               "model_XXXXXX.pt; use --model-format native"),
    ("transformers", "native", "holds no nanochat's native model_XXXXXX.pt, only transformers port "
                               "(config.json + safetensors); use --model-format transformers"),
    ("native", "safetensors", "--model-format 'safetensors': choose native or transformers"),
])
def test_a_layout_the_checkpoint_does_not_hold_is_refused_in_one_line(tmp_path, held, asked, problem):
    model = random_model(tiny_config(vocab_size=TIKTOKEN_VOCAB), seed=1)
    write_tokenizer_pkl(tmp_path / "tokenizer.pkl")
    if held == "native":
        write_native_checkpoint(tmp_path, model, step=1)
    else:
        save_hf_model(tmp_path, model, load_tokenizer(tmp_path / "tokenizer.pkl"))
    with pytest.raises(CheckpointError, match=re.escape(problem)) as err:
        load_model(tmp_path, model_format=asked)
    assert "\n" not in str(err.value)


def test_cli_model_format_reaches_the_loader_and_is_checked(tmp_path):
    both_layouts(tmp_path / "m", tiny_config(vocab_size=TIKTOKEN_VOCAB, sequence_len=1024))
    common = ["run", "--preset", "tiny", "--model", tmp_path / "m", "--resolution", "2", "--y", "tokens:256:512:log",
              "--device", "cpu", "--dry-run", "--out", tmp_path / "s"]
    result = ok(*common, "--model-format", "transformers")
    assert "loading the transformers one (--model-format transformers)" in result.stderr
    result = cli(*common, "--model-format", "pt")
    assert result.exit_code == 2 and "--model-format 'pt': choose native or transformers" in result.output
    assert "--model-format" not in preset("tiny").to_dict()  # left out, a study's hash is as before
    assert preset("tiny").with_overrides(model_format="native").to_dict()["model_format"] == "native"
