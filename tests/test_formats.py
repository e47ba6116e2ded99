"""Formats users hold: nanochat's CustomJSON, a folder of NAME_train / NAME_val files, padded vocabularies, Hub
repos holding both checkpoint layouts, and the 2026 nanochat architecture."""

import copy
import json
import math
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
    RandomStream,
    budget_weights,
    random_model,
    tiny_config,
    with_bf16_wte,
    write_native_checkpoint,
    write_tokenizer_json,
    write_tokenizer_pkl,
)

from vmap_sweep.data.sources import data_fingerprint, load_conversations
from vmap_sweep.errors import CheckpointError, DataError
from vmap_sweep.model.checkpoint import _pick_hub_files, load_model, save_model, weight_files
from vmap_sweep.model.generate import generate
from vmap_sweep.model.gpt import ARCH_2026, GPT, GPTConfig
from vmap_sweep.model.hf_format import save_hf_model
from vmap_sweep.model.tokenizer import ByteTokenizer, load_tokenizer
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.config import preset
from vmap_sweep.train.stack import HELD_2026
from vmap_sweep.train.trainer import TrainConfig
from vmap_sweep.train.trunk import TrunkTrainer


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


# ------------------------------------------------------------------------------------------- nanochat, 2026
# nanochat/gpt.py since commit a825e63 (2026-03-14, unchanged in its forward to today), transcribed as a reference
# that reads a checkpoint's state dict directly: padded rows and all, GQA through SDPA's enable_gqa, sliding
# windows as nanochat's SDPA fallback (flash_attention._sdpa_attention) masks them. float32, as NANOCHAT_DTYPE.


def _norm(x):
    return F.rms_norm(x, (x.size(-1),))


def _rotary(x, cos, sin):
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], 3)


def _window_sizes(mc: dict) -> list[int]:
    long, short = mc["sequence_len"], -(-mc["sequence_len"] // 4 // 128) * 128
    pattern = mc["window_pattern"].upper()
    sizes = [short if pattern[i % len(pattern)] == "S" else long for i in range(mc["n_layer"])]
    sizes[-1] = long
    return sizes


def _sdpa(q, k, v, window):
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.size(1) != k.size(1)
    T = q.size(2)
    if window < 0 or window >= T:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        row, col = torch.arange(T).unsqueeze(1), torch.arange(T).unsqueeze(0)
        mask = (col <= row) & ((row - col) <= window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


def nanochat_2026_logits(state: dict, mc: dict, idx: torch.Tensor) -> torch.Tensor:
    """nanochat's GPT.forward(idx) (no targets, no KV cache) on a native state dict and its meta's model_config."""
    sd = {k.removeprefix("_orig_mod."): v.float() for k, v in state.items()}
    n_layer, n_head, n_kv, n_embd = mc["n_layer"], mc["n_head"], mc["n_kv_head"], mc["n_embd"]
    hd = n_embd // n_head
    B, T = idx.shape
    inv_freq = 1.0 / (100000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    cos, sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]
    x = _norm(F.embedding(idx, sd["transformer.wte.weight"]))
    gate = sd["smear_lambda"] * torch.sigmoid(F.linear(x[:, 1:, :24], sd["smear_gate.weight"]))
    x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
    x0, x_backout = x, None
    for i, window in enumerate(_window_sizes(mc)):
        p = f"transformer.h.{i}."
        x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        h = _norm(x)
        q = F.linear(h, sd[p + "attn.c_q.weight"]).view(B, T, n_head, hd)
        k = F.linear(h, sd[p + "attn.c_k.weight"]).view(B, T, n_kv, hd)
        v = F.linear(h, sd[p + "attn.c_v.weight"]).view(B, T, n_kv, hd)
        if f"value_embeds.{i}.weight" in sd:
            ve = F.embedding(idx, sd[f"value_embeds.{i}.weight"]).view(B, T, n_kv, hd)
            g = 3 * torch.sigmoid(F.linear(h[..., :12], sd[p + "attn.ve_gate.weight"]))
            v = v + g.unsqueeze(-1) * ve
        q, k = _rotary(q, cos, sin), _rotary(k, cos, sin)
        q, k = _norm(q) * 1.2, _norm(k) * 1.2
        y = _sdpa(q, k, v, window).contiguous().view(B, T, -1)
        x = x + F.linear(y, sd[p + "attn.c_proj.weight"])
        m = F.relu(F.linear(_norm(x), sd[p + "mlp.c_fc.weight"])).square()
        x = x + F.linear(m, sd[p + "mlp.c_proj.weight"])
        if i == n_layer // 2:
            x_backout = x
    x = _norm(x - sd["backout_lambda"] * x_backout)
    logits = F.linear(x, sd["lm_head.weight"])[..., : mc["vocab_size"]].float()
    return 15 * torch.tanh(logits / 15)


def write_native_2026(folder, *, vocab=TIKTOKEN_VOCAB, n_layer=4, n_head=4, n_kv_head=2, n_embd=32,
                      sequence_len=512, window_pattern: str | None = "SSSL", lambdas=True, seed=0, step=100):
    """A checkpoint as nanochat's save_checkpoint writes one today: vocab rows padded to a multiple of 64,
    embeddings in bf16, `_orig_mod.` keys, meta's model_config = asdict(GPTConfig) (window_pattern left out, or
    resid/x0 lambdas left out, as in checkpoints older than them). Every weight random, scalars away from their
    init. Returns (state, model_config)."""
    gen = torch.Generator().manual_seed(seed)
    padded, hd = -(-vocab // 64) * 64, n_embd // n_head

    def rand(*shape, std=0.2, mean=0.0):
        return torch.randn(shape, generator=gen) * std + mean

    state = {"transformer.wte.weight": rand(padded, n_embd, std=1.0).to(torch.bfloat16),
             "lm_head.weight": rand(padded, n_embd),
             "smear_gate.weight": rand(1, 24), "smear_lambda": rand(1, std=0.5, mean=0.5),
             "backout_lambda": rand(1, std=0.1, mean=0.2)}
    if lambdas:
        state |= {"resid_lambdas": rand(n_layer, std=0.1, mean=1.0), "x0_lambdas": rand(n_layer, std=0.1, mean=0.1)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        state |= {p + "attn.c_q.weight": rand(n_head * hd, n_embd), p + "attn.c_k.weight": rand(n_kv_head * hd, n_embd),
                  p + "attn.c_v.weight": rand(n_kv_head * hd, n_embd), p + "attn.c_proj.weight": rand(n_embd, n_embd),
                  p + "mlp.c_fc.weight": rand(4 * n_embd, n_embd), p + "mlp.c_proj.weight": rand(n_embd, 4 * n_embd)}
        if i % 2 == (n_layer - 1) % 2:
            state |= {f"value_embeds.{i}.weight": rand(padded, n_kv_head * hd, std=0.3).to(torch.bfloat16),
                      p + "attn.ve_gate.weight": rand(n_kv_head, 12)}
    mc = dict(sequence_len=sequence_len, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
              n_embd=n_embd)
    if window_pattern is not None:
        mc["window_pattern"] = window_pattern
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"_orig_mod." + k: v for k, v in state.items()}, folder / f"model_{step:06d}.pt")
    (folder / f"meta_{step:06d}.json").write_text(json.dumps({"step": step, "model_config": mc}))
    write_tokenizer_pkl(folder / "tokenizer.pkl")
    return state, {"window_pattern": "L", **mc}


def ids_of(T: int, B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TIKTOKEN_VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [
    dict(),  # SSSL over 4 layers, GQA 4/2: windows 128, 128, 128, 512
    dict(n_layer=3, n_head=2, n_kv_head=1, window_pattern="SL"),  # MQA; value embeddings on layers 0 and 2
    dict(n_layer=5, n_head=4, n_kv_head=4, n_embd=64, window_pattern="ssl"),  # nanochat upper-cases the pattern
])
def test_2026_checkpoint_forward_equals_nanochats(tmp_path, shape):
    state, mc = write_native_2026(tmp_path, **shape)
    loaded = load_model(tmp_path)
    c = loaded.config
    assert c.is_2026 and c.rope_base == 100000.0 and c.vocab_size == TIKTOKEN_VOCAB
    assert c.window_sizes() == _window_sizes(mc) and 128 in c.window_sizes()
    ids = ids_of(300)  # longer than the short window: the windows cut keys
    with torch.no_grad():
        ref = nanochat_2026_logits(state, mc, ids)
        got = loaded.model(ids)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        targets = ids.roll(-1, 1)
        loss = F.cross_entropy(ref.flatten(0, 1), targets.flatten())
        torch.testing.assert_close(loaded.model(ids, targets), loss, rtol=1e-5, atol=1e-6)
        weights = torch.full(targets.shape, 1.0 / targets.numel())
        torch.testing.assert_close(loaded.model(ids, targets, weights), loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded.model.token_losses(ids, targets).mean(), loss, rtol=1e-5, atol=1e-6)


def test_2026_parity_is_not_a_coincidence_of_its_parts(tmp_path):
    """Each 2026 feature changes the logits: the parity above would fail if the loader left one out."""
    state, mc = write_native_2026(tmp_path)
    model = load_model(tmp_path).model
    ids = ids_of(300)
    with torch.no_grad():
        ref = nanochat_2026_logits(state, mc, ids)

        def differs(**change) -> bool:
            m = GPT(replace(model.config, **change)) if change else model
            if change:
                m.load_state_dict(model.state_dict())
            return not torch.allclose(m(ids), ref, rtol=1e-3, atol=1e-3)

        assert not differs()
        assert differs(window_pattern="L")  # sliding windows
        assert differs(rope_base=10000.0)
        saved = {n: p.clone() for n, p in model.named_parameters()}
        for name, neutral in [("smear_lambda", 0.0), ("backout_lambda", 0.0), ("x0_lambdas", 0.0),
                              ("resid_lambdas", 1.0), ("value_embeds.3.weight", 0.0)]:
            model.get_parameter(name).fill_(neutral)
            assert differs(), name
            model.get_parameter(name).copy_(saved[name])
        assert not differs()


def test_2026_checkpoints_older_than_some_fields_are_patched_as_nanochat_does(tmp_path):
    state, mc = write_native_2026(tmp_path / "a", window_pattern=None)  # meta before window_pattern: "L"
    loaded = load_model(tmp_path / "a")
    assert loaded.config.window_pattern == "L" and set(loaded.config.window_sizes()) == {512}
    ids = ids_of(200)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), nanochat_2026_logits(state, mc, ids), rtol=1e-5, atol=1e-5)
    state, mc = write_native_2026(tmp_path / "b", lambdas=False)  # before resid/x0 lambdas: 1 and 0
    loaded = load_model(tmp_path / "b")
    state |= {"resid_lambdas": torch.ones(4), "x0_lambdas": torch.zeros(4)}
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), nanochat_2026_logits(state, mc, ids), rtol=1e-5, atol=1e-5)


def test_2026_model_under_vmap_equals_each_model_alone(tmp_path):
    """The training core drives the GPT through functional_call under vmap: the 2026 modules must batch."""
    from torch.func import functional_call, stack_module_state, vmap

    write_native_2026(tmp_path / "a", seed=1)
    write_native_2026(tmp_path / "b", seed=2)
    models = [load_model(tmp_path / n).model for n in "ab"]
    params, buffers = stack_module_state(models)
    ids = ids_of(260)
    with torch.no_grad():
        stacked = vmap(lambda p, b: functional_call(models[0], (p, b), (ids,)))(params, buffers)
        for k, m in enumerate(models):
            torch.testing.assert_close(stacked[k], m(ids), rtol=1e-5, atol=1e-5)


def test_2026_model_round_trips_through_the_projects_format_and_has_no_transformers_layout(tmp_path):
    write_native_2026(tmp_path / "n")
    loaded = load_model(tmp_path / "n")
    save_model(tmp_path / "own", loaded.model, loaded.tokenizer)
    again = load_model(tmp_path / "own")
    assert again.config == loaded.config and same_weights(again.model, loaded.model)
    with pytest.raises(CheckpointError, match="has the 2025 architecture only"):
        save_hf_model(tmp_path / "hf", loaded.model, loaded.tokenizer)
    greedy = generate(again.model, ids_of(5, B=1)[0].tolist(), stop=set(), max_tokens=4)
    assert len(greedy) == 4 and max(greedy) < TIKTOKEN_VOCAB


def test_own_format_saved_before_the_2026_fields_loads_as_2025(tmp_path):
    model = random_model(tiny_config(), seed=2)
    save_model(tmp_path, model, ByteTokenizer())
    meta = json.loads((tmp_path / "vmap_sweep.json").read_text())
    for field in ("architecture", "window_pattern"):
        del meta["model_config"][field]
    (tmp_path / "vmap_sweep.json").write_text(json.dumps(meta))
    loaded = load_model(tmp_path)
    assert not loaded.config.is_2026 and same_weights(loaded.model, model)


def model_2026(vocab: int = 61, seed: int = 0) -> GPT:
    """A 2026-architecture model in memory, every weight random (scalars near their trained values), windows of
    128 keys in its short layers."""
    config = GPTConfig(sequence_len=512, vocab_size=vocab, n_layer=4, n_head=4, n_kv_head=2, n_embd=32,
                       architecture=ARCH_2026, window_pattern="SSSL", rope_base=100000.0)
    model = random_model(config, seed=seed)
    with torch.no_grad():
        model.resid_lambdas.add_(1.0)
        model.backout_lambda.fill_(0.2)
    return model


def reference_adamw_held(base: GPT, stream, cell: dict, batch_size: int, seq_len: int):
    """One cell trained the ordinary way, torch.optim.AdamW on every parameter but the held 2026 scalars."""
    model = copy.deepcopy(base)
    trained = [p for n, p in model.named_parameters() if n not in HELD_2026]
    for p in trained:
        p.requires_grad_(True)
    steps = max(1, math.ceil(cell["tokens"] / (batch_size * seq_len)))
    opt = torch.optim.AdamW(trained, lr=cell["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, foreach=False)
    losses = []
    for step in range(steps):
        x, y = stream.batch(step, batch_size, seq_len)
        loss = model(x, y, budget_weights(step, cell["tokens"], y))
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.param_groups[0]["lr"] = cell["lr"] * (1 - step / steps)
        opt.step()
    return losses, model


def test_stacked_training_of_a_2026_model_equals_separate_runs():
    base, stream = model_2026(), RandomStream()
    B, T = 2, 160  # longer than the 128-key windows
    cfg = TrainConfig(optimizer="adamw", schedule="linear", rows_per_step=B, seq_len=T, divergence_ratio=10.0)
    cells = [{"lr": 1e-4, "tokens": 3 * B * T}, {"lr": 3e-3, "tokens": 2 * B * T - 50}]
    trainer = TrunkTrainer.separate(base, cells, cfg)
    assert set(trainer.frozen) == set(HELD_2026)  # the scalars are shared, every other parameter stacked
    records = trainer.run(stream)
    for i, cell in enumerate(cells):
        losses, ref = reference_adamw_held(base, stream, cell, B, T)
        assert not records[i].unstable
        got = torch.tensor(records[i].losses[:-1])
        torch.testing.assert_close(got, torch.tensor(losses), rtol=1e-5, atol=0)
        state = trainer.state_dict_of(i)
        for name, p in ref.named_parameters():
            assert float((state[name] - p.detach()).norm() / p.detach().norm()) <= 1e-5, (i, name)


def test_a_2026_model_trains_with_the_nanochat_optimizer_and_shared_trajectories():
    base, stream = model_2026(), RandomStream(seed=3)
    cfg = TrainConfig(optimizer="nanochat", schedule="constant", rows_per_step=2, seq_len=160)
    lanes = [[{"lr": 1e-3, "tokens": 320}, {"lr": 1e-3, "tokens": 960}], [{"lr": 1e-2, "tokens": 640}]]
    records = TrunkTrainer(base, lanes, cfg).run(stream)
    alone = TrunkTrainer.separate(base, [c for lane in lanes for c in lane], cfg).run(stream)
    for r, a in zip(records, alone, strict=True):
        assert not r.unstable and len(r.losses) == r.steps + 1 and r.losses[-1] < r.losses[0]
        torch.testing.assert_close(torch.tensor(r.losses), torch.tensor(a.losses), rtol=1e-5, atol=0)


def test_a_study_runs_on_a_2026_checkpoint_and_exports_its_cells_in_the_projects_format(tmp_path):
    write_native_2026(tmp_path / "m", sequence_len=1024, n_embd=64)
    ok("run", "--preset", "tiny", "--model", tmp_path / "m", "--data", "synthetic", "--resolution", "2",
       "--y", "tokens:256:512:log", "--eval-tokens", "256", "--device", "cpu", "--out", tmp_path / "s", "--quiet")
    with StudyStore.open(tmp_path / "s") as store:
        rows = list(store.rows())
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    result = ok("model", tmp_path / "s", "--cell", "0,0", "-o", tmp_path / "e", "--device", "cpu")
    assert "no transformers folder: transformers' NanoChat port has no 2026 architecture" in result.stdout
    assert load_model(tmp_path / "e" / "vmap-sweep").config.is_2026 and not (tmp_path / "e" / "transformers").exists()
