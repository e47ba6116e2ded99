"""Hostile and mistaken input: files and values a user (or an attacker) hands the CLI.

Every case is made here, in a copy of one small finished study whose model (own format, or replaced by a
transformers or native nanochat folder) and data file sit beside it under relative names, so a resume of the study
(`run --out study --dry-run`) reads them. Each must be one `error:` line naming the file or value, exit code 2,
with no code from a file executed, the Python heap's peak bounded (tracemalloc; the huge-size cases also in a
child process, by its peak RSS), and the study byte-for-byte as it was.
"""

from __future__ import annotations

import copyreg
import importlib
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from cli_helpers import cli
from helpers import (
    random_model,
    snapshot,
    tiktoken_state,
    tiny_config,
    write_native_checkpoint,
    write_tokenizer_json,
    write_tokenizer_pkl,
)

from vmap_sweep.data.synthetic import synthetic_docqa
from vmap_sweep.model.checkpoint import load_model, save_model
from vmap_sweep.model.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]
RESUME = ("run", "--out", "study", "--dry-run")
HEAP_LIMIT = 32 << 20  # bytes of Python heap a refusal may use at its peak
RSS_LIMIT = 100 << 20  # bytes a refusal may add to a process's peak resident memory
BOMB = "[" * 100_000 + "]" * 100_000  # JSON nested far past any parser's recursion limit
MODEL = dict(sequence_len=256)  # the tiny test config, long enough for a synthetic conversation


# ---------------------------------------------------------------------------------------------- the study
@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A finished 2x2 study of a random own-format model on a small local data file, all under one folder."""
    root = tmp_path_factory.mktemp("hostile")
    save_model(root / "model", random_model(tiny_config(**MODEL), seed=3), ByteTokenizer())
    with open(root / "data.jsonl", "w") as f:
        for row in synthetic_docqa(60, 5):
            f.write(json.dumps(row) + "\n")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = cli("run", "--preset", "tiny", "--model", "model", "--data", "data.jsonl", "--x", "lr:1e-3:1e-2",
                     "--y", "tokens:512:1024", "--resolution", "2", "--rows-per-step", "2", "--seq-len", "64",
                     "--eval-tokens", "1024", "--out", "study", "--quiet")
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, (result.stderr, result.exception)
    # what the refusals import lazily, imported once here so their import isn't counted as a case's memory
    for module in ("regex", "safetensors.torch", "tiktoken", "tokenizers"):
        importlib.import_module(module)
    return root


@pytest.fixture
def root(made, tmp_path, monkeypatch):
    """A private copy of the study folder, made the working directory."""
    case = tmp_path / "case"
    shutil.copytree(made, case, symlinks=True)
    monkeypatch.chdir(case)
    return case


def refused(root: Path, *names: str, args=RESUME, marker: Path | None = None) -> str:
    """Run the CLI on the case; check everything a refusal promises and return the error line."""
    before = snapshot(root / "study", mtimes=True)
    tracemalloc.start()
    start = time.process_time()  # CPU time: a busy machine's wall clock says nothing about the refusal
    result = cli(*args)
    cpu = time.process_time() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    line = result.stderr.strip()
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    assert line.startswith("error: ") and "\n" not in line, line
    for name in names:
        assert name in line, (name, line)
    assert peak < HEAP_LIMIT, f"Python heap peaked at {peak >> 20} MiB"
    assert cpu < 5, f"took {cpu:.1f} s of CPU"
    assert snapshot(root / "study", mtimes=True) == before
    if marker is not None:
        assert not marker.exists(), "code from the file ran"
    return line


# ---------------------------------------------------------------------------------------------- the files
def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))  # NaN and Infinity are written as JavaScript would: JSON's parsers read them


def own_config(**fields):
    return lambda root: edit_json(root / "model" / "vmap_sweep.json", lambda m: m["model_config"].update(fields))


_TO_HF = [(r"transformer\.wte\.", "model.embed_tokens."),
          (r"transformer\.h\.(\d+)\.attn\.c_q\.", r"model.layers.\1.self_attn.q_proj."),
          (r"transformer\.h\.(\d+)\.attn\.c_k\.", r"model.layers.\1.self_attn.k_proj."),
          (r"transformer\.h\.(\d+)\.attn\.c_v\.", r"model.layers.\1.self_attn.v_proj."),
          (r"transformer\.h\.(\d+)\.attn\.c_proj\.", r"model.layers.\1.self_attn.o_proj."),
          (r"transformer\.h\.(\d+)\.mlp\.c_fc\.", r"model.layers.\1.mlp.fc1."),
          (r"transformer\.h\.(\d+)\.mlp\.c_proj\.", r"model.layers.\1.mlp.fc2.")]


def hf_folder(folder: Path, **overrides) -> Path:
    """A transformers NanoChat folder (config.json, model.safetensors in bf16, tokenizer.json), written by hand."""
    from safetensors.torch import save_file

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    c = tiny_config(**MODEL)
    state = {}
    for key, value in random_model(c, seed=4).state_dict().items():
        for pattern, name in _TO_HF:
            key = re.sub(pattern, name, key)
        state[key] = value.to(torch.bfloat16).contiguous()
    save_file(state, str(folder / "model.safetensors"))
    config = {"model_type": "nanochat", "hidden_size": c.n_embd, "num_hidden_layers": c.n_layer,
              "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "intermediate_size": 4 * c.n_embd,
              "vocab_size": c.vocab_size, "max_position_embeddings": c.sequence_len, "rms_norm_eps": 1e-6,
              "final_logit_softcapping": 15.0, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    (folder / "config.json").write_text(json.dumps({**config, **overrides}))
    write_tokenizer_json(folder / "tokenizer.json")
    return folder


def hf(**overrides):
    return lambda root: hf_folder(root / "model", **overrides)


def native_folder(folder: Path, **model_config) -> Path:
    """A native nanochat folder: model_000001.pt, meta_000001.json and tokenizer.pkl."""
    shutil.rmtree(folder, ignore_errors=True)
    write_native_checkpoint(folder, random_model(tiny_config(**MODEL), seed=5), step=1)
    write_tokenizer_pkl(folder / "tokenizer.pkl")
    edit_json(folder / "meta_000001.json", lambda m: m["model_config"].update(model_config))
    return folder


def native(**model_config):
    return lambda root: native_folder(root / "model", **model_config)


def native_2026(**model_config):
    """A native folder of the 2026 architecture saved before resid/x0 lambdas existed (the loader adds them, one
    per layer, as nanochat does), with its meta edited."""
    def make(root: Path) -> None:
        folder = root / "model"
        config = tiny_config(**MODEL, architecture="nanochat-2026", window_pattern="SL", rope_base=100000.0)
        native_folder(folder)
        state = {k: v for k, v in random_model(config, seed=5).state_dict().items()
                 if k not in ("resid_lambdas", "x0_lambdas")}
        torch.save(state, folder / "model_000001.pt")
        edit_json(folder / "meta_000001.json",
                  lambda m: m["model_config"].update({"window_pattern": "SL", **model_config}))
    return make


def write(relative: str, content: str | bytes):
    def make(root: Path) -> None:
        path = root / relative
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return make


def safetensors_with_header(header: object, data: bytes = b"") -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(text)) + text + data


def truncated_weights(root: Path) -> None:
    path = root / "model" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def weights_of_another_shape(root: Path) -> None:
    from safetensors.torch import save_file

    other = random_model(tiny_config(**MODEL, n_embd=64, n_head=4, n_kv_head=2), seed=6)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(root / "model" / "model.safetensors"))


def tokenizer_pkl(state_edit=None, obj=None):
    """The own model's tokenizer replaced by tokenizer.pkl: a nanochat state with an edit, or any object."""
    def make(root: Path) -> None:
        if obj is None:
            payload = pickle.dumps(_EncodingLike({**tiktoken_state(), **(state_edit or {})}), protocol=2)
        else:
            payload = pickle.dumps(obj(root))
        (root / "model" / "tokenizer.pkl").write_bytes(payload)
        edit_json(root / "model" / "vmap_sweep.json", lambda m: m.update(tokenizer="tokenizer.pkl"))
    return make


class _EncodingLike:
    """Pickles as a tiktoken.Encoding (class tiktoken.core.Encoding, then its state), with any state: tiktoken
    itself would refuse to build some of the states written here."""

    def __init__(self, state: dict):
        self.state = state

    def __reduce__(self):
        from tiktoken.core import Encoding

        return (copyreg._reconstructor, (Encoding, object, None), self.state)


class RunsCode:
    """Unpickling it would run a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def code_in_tokenizer(root: Path) -> None:
    tokenizer_pkl(obj=lambda r: RunsCode(r / "ran"))(root)


def code_in_weights(root: Path) -> None:
    native_folder(root / "model")
    torch.save({"lm_head.weight": RunsCode(root / "ran")}, root / "model" / "model_000001.pt")


def tokenizer_link_out(root: Path) -> None:
    write_tokenizer_pkl(root / "outside.pkl")
    os.symlink(root / "outside.pkl", root / "model" / "tok.pkl")
    edit_json(root / "model" / "vmap_sweep.json", lambda m: m.update(tokenizer="tok.pkl"))


def own_tokenizer(name: str):
    def make(root: Path) -> None:
        write_tokenizer_pkl(root / "tokenizer.pkl")  # a tokenizer there, to be found if the name were followed
        edit_json(root / "model" / "vmap_sweep.json", lambda m: m.update(tokenizer=name))
    return make


def shard_outside(root: Path) -> None:
    hf_folder(root / "model")
    shutil.move(root / "model" / "model.safetensors", root / "stolen.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "../stolen.safetensors"}}
    (root / "model" / "model.safetensors.index.json").write_text(json.dumps(index))


def linked_out(name: str, make_folder=None):
    """The model folder's file `name` moved out of it and replaced by a link to where it went."""
    def make(root: Path) -> None:
        if make_folder is not None:
            make_folder(root / "model")
        shutil.move(root / "model" / name, root / f"elsewhere-{name}")
        os.symlink(root / f"elsewhere-{name}", root / "model" / name)
    return make


def tensor_in_two_shards(root: Path) -> None:
    from safetensors.torch import save_file

    hf_folder(root / "model")
    save_file({"lm_head.weight": torch.zeros(288, 32)}, str(root / "model" / "extra.safetensors"))


def data_row(row: str):
    def make(root: Path) -> None:
        lines = (root / "data.jsonl").read_text().splitlines()
        lines[7] = row
        (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return make


USER = '{"role": "user", "content": "Q"}'

# (id, what the case writes, what the error line must name)
FILE_CASES = [
    # the project's own format: vmap_sweep.json's model_config
    ("own-heads-zero", own_config(n_head=0), ["vmap_sweep.json", "n_head", "0"]),
    ("own-heads-negative", own_config(n_head=-4), ["vmap_sweep.json", "n_head"]),
    ("own-width-string", own_config(n_embd="32"), ["vmap_sweep.json", "n_embd", "'32'"]),
    ("own-layers-float", own_config(n_layer=2.0), ["vmap_sweep.json", "n_layer", "2.0"]),
    ("own-vocab-bool", own_config(vocab_size=True), ["vmap_sweep.json", "vocab_size"]),
    ("own-vocab-1e12", own_config(vocab_size=10**12), ["model.safetensors", "transformer.wte.weight"]),
    ("own-layers-1e6", own_config(n_layer=10**6), ["model.safetensors", "1000000"]),
    ("own-width-1e9", own_config(n_embd=10**9), ["model.safetensors", "has shape"]),
    ("own-sequence-1e12", own_config(sequence_len=10**12), ["model.safetensors", "sequence_len"]),
    ("own-eps-string", own_config(norm_eps="1e-6"), ["vmap_sweep.json", "norm_eps", "'1e-6'"]),
    ("own-eps-nan", own_config(norm_eps=float("nan")), ["vmap_sweep.json", "norm_eps", "nan"]),
    ("own-eps-negative", own_config(norm_eps=-1e-6), ["vmap_sweep.json", "norm_eps"]),
    ("own-rope-infinite", own_config(rope_base=float("inf")), ["vmap_sweep.json", "rope_base", "inf"]),
    ("own-softcap-zero", own_config(softcap=0), ["vmap_sweep.json", "softcap"]),
    ("own-width-indivisible", own_config(n_embd=30), ["vmap_sweep.json", "not divisible by n_head 4"]),
    ("own-kv-heads-indivisible", own_config(n_kv_head=3), ["vmap_sweep.json", "not a multiple of n_kv_head 3"]),
    ("own-head-dim-odd", own_config(n_embd=36), ["vmap_sweep.json", "head_dim 9"]),
    ("own-unknown-field", own_config(n_experts=8), ["vmap_sweep.json", "unknown model config fields n_experts"]),
    ("own-windows-without-2026", own_config(window_pattern="SSSL"), ["vmap_sweep.json", "window_pattern", "SSSL"]),
    ("own-architecture-unknown", own_config(architecture="nanochat-2030"), ["vmap_sweep.json", "nanochat-2030"]),
    ("own-window-letters", own_config(architecture="nanochat-2026", window_pattern="SQL"),
     ["vmap_sweep.json", "window_pattern", "'SQL'"]),
    ("own-window-huge", own_config(architecture="nanochat-2026", window_pattern="S" * 10**6),
     ["vmap_sweep.json", "window_pattern", "letters S and L"]),
    ("own-window-not-text", own_config(architecture="nanochat-2026", window_pattern=["S"]),
     ["vmap_sweep.json", "window_pattern"]),
    ("own-2026-over-2025-weights", own_config(architecture="nanochat-2026"),
     ["model.safetensors", "missing keys", "resid_lambdas"]),
    ("own-missing-field",
     lambda root: edit_json(root / "model" / "vmap_sweep.json", lambda m: m["model_config"].pop("vocab_size")),
     ["vmap_sweep.json", "lacks vocab_size"]),
    ("own-meta-bomb", write("model/vmap_sweep.json", '{"format": "vmap-sweep", "model_config": ' + BOMB + "}"),
     ["vmap_sweep.json", "nested too deeply"]),
    ("own-meta-surrogate", write("model/vmap_sweep.json", '{"format": "\\ud800"}'), ["vmap_sweep.json", "format"]),
    # the weights file
    ("weights-empty", write("model/model.safetensors", b""), ["model.safetensors", "can't be read as safetensors"]),
    ("weights-truncated", truncated_weights, ["model.safetensors", "can't be read as safetensors"]),
    ("weights-garbage-header", write("model/model.safetensors", safetensors_with_header("not json at all")),
     ["model.safetensors", "can't be read as safetensors"]),
    ("weights-header-length-2e40", write("model/model.safetensors", struct.pack("<Q", 2**40) + b"{}"),
     ["model.safetensors", "header too large"]),
    ("weights-header-lies-about-size",
     write("model/model.safetensors", safetensors_with_header(
         {"transformer.wte.weight": {"dtype": "F32", "shape": [10**12, 32], "data_offsets": [0, 128]}}, b"\0" * 128)),
     ["model.safetensors", "can't be read as safetensors"]),
    ("weights-header-bomb", write("model/model.safetensors", safetensors_with_header(BOMB[:20_000] + BOMB[-20_000:])),
     ["model.safetensors", "can't be read as safetensors"]),
    ("weights-other-shape", weights_of_another_shape, ["model.safetensors", "has shape"]),
    # a transformers folder's config.json
    ("hf-heads-zero", hf(num_attention_heads=0), ["config.json", "num_attention_heads"]),
    ("hf-width-string", hf(hidden_size="32"), ["config.json", "hidden_size"]),
    ("hf-vocab-1e12", hf(vocab_size=10**12), ["model.safetensors", "transformer.wte.weight"]),
    ("hf-layers-1e7", hf(num_hidden_layers=10**7), ["model.safetensors", "num_hidden_layers", "10000000"]),
    ("hf-positions-1e12", hf(max_position_embeddings=10**12), ["model.safetensors", "max_position_embeddings"]),
    ("hf-eps-string", hf(rms_norm_eps="1e-6"), ["config.json", "rms_norm_eps"]),
    ("hf-intermediate-float", hf(intermediate_size=128.0), ["config.json", "intermediate_size"]),
    ("hf-rope-parameters-string", hf(rope_parameters="yes"), ["config.json", "rope_parameters"]),
    ("hf-config-bomb", lambda root: (hf_folder(root / "model"), write("model/config.json", BOMB)(root)),
     ["config.json", "nested too deeply"]),
    ("hf-tokenizer-bomb", lambda root: (hf_folder(root / "model"), write("model/tokenizer.json", BOMB)(root)),
     ["tokenizer.json", "can't read it"]),
    ("hf-rope-theta-string", hf(rope_parameters={"rope_type": "default", "rope_theta": "1e4"}),
     ["config.json", "rope_theta", "'1e4'"]),
    ("hf-tensor-in-two-shards", tensor_in_two_shards, ["model.safetensors", "lm_head.weight", "another shard"]),
    ("hf-shard-outside-folder", shard_outside, ["model.safetensors.index.json", "outside its folder"]),
    ("own-weights-link-out", linked_out("model.safetensors"),
     ["model.safetensors", "not a file of the model's folder", "elsewhere-model.safetensors"]),
    ("own-meta-link-out", linked_out("vmap_sweep.json"), ["vmap_sweep.json", "not a file of the model's folder"]),
    ("hf-shard-link-out", linked_out("model.safetensors", hf_folder),
     ["model.safetensors", "not a file of the model's folder"]),
    ("hf-config-link-out", linked_out("config.json", hf_folder), ["config.json", "not a file of the model's folder"]),
    ("hf-tokenizer-link-out", linked_out("tokenizer.json", hf_folder),
     ["tokenizer.json", "not a file of the model's folder"]),
    ("native-weights-link-out", linked_out("model_000001.pt", native_folder),
     ["model_000001.pt", "not a file of the model's folder"]),
    # a native nanochat folder
    ("native-heads-zero", native(n_head=0), ["meta_000001.json", "n_head"]),
    ("native-vocab-1e12", native(vocab_size=10**12), ["model_000001.pt", "transformer.wte.weight"]),
    ("native-layers-string", native(n_layer="2"), ["meta_000001.json", "n_layer", "'2'"]),
    ("native-layers-1e12", native(n_layer=10**12), ["model_000001.pt", "1000000000000", "2 layers"]),
    ("native-2026-layers-1e12", native_2026(n_layer=10**12), ["model_000001.pt", "1000000000000", "2 layers"]),
    ("native-2026-window-letters", native_2026(window_pattern="SLX"), ["meta_000001.json", "window_pattern", "SLX"]),
    ("native-meta-bomb", lambda root: (native_folder(root / "model"), write("model/meta_000001.json", BOMB)(root)),
     ["meta_000001.json", "nested too deeply"]),
    ("native-weights-run-code", code_in_weights, ["model_000001.pt", "can't be read"]),
    # tokenizers
    ("tokenizer-pickle-runs-code", code_in_tokenizer, ["tokenizer.pkl", "refused to unpickle", "posix.system"]),
    ("tokenizer-pat-str-empty", tokenizer_pkl({"pat_str": ""}), ["tokenizer.pkl", "pat_str ''"]),
    ("tokenizer-pat-str-invalid", tokenizer_pkl({"pat_str": "(["}), ["tokenizer.pkl", "not a valid split pattern"]),
    ("tokenizer-pat-str-drops-text", tokenizer_pkl({"pat_str": r"\p{L}+"}), ["tokenizer.pkl", "cover it"]),
    ("tokenizer-name-dotdot", own_tokenizer(".."), ["vmap_sweep.json", "'..'"]),
    ("tokenizer-name-absolute", own_tokenizer("/etc/passwd"), ["vmap_sweep.json", "'/etc/passwd'"]),
    ("tokenizer-link-out", tokenizer_link_out, ["tok.pkl", "outside.pkl", "not a file of this folder"]),
    # the data file
    ("data-bomb", data_row('{"messages": ' + BOMB + "}"), ["data.jsonl:8", "nested too deeply"]),
    ("data-surrogate", data_row('{"messages": [' + USER + ', {"role": "assistant", "content": "a\\ud800b"}]}'),
     ["data.jsonl:8", "surrogate", "\\ud800"]),
    ("data-role-nested", data_row('{"messages": [{"role": ' + BOMB[:500] + BOMB[-500:] + ', "content": "Q"}]}'),
     ["data.jsonl:8", "role is a list"]),
    ("data-content-number", data_row('{"messages": [' + USER + ', {"role": "assistant", "content": 1e999}]}'),
     ["data.jsonl:8", "content is a float"]),
    ("data-integer-100k-digits", data_row('{"messages": [' + USER + '], "n": ' + "9" * 100_000 + "}"),
     ["data.jsonl:8", "an integer of 100,000 digits"]),
    ("data-line-9-mib", data_row('{"messages": [' + USER + '], "pad": "' + "x" * (9 << 20) + '"}'),
     ["data.jsonl:8", "a line longer than 8 MiB"]),
    ("data-line-9-mib-no-newline", lambda root: (root / "data.jsonl").write_bytes(b"x" * (9 << 20)),
     ["data.jsonl:1", "a line longer than 8 MiB"]),
    ("data-fifo", lambda root: ((root / "data.jsonl").unlink(), os.mkfifo(root / "data.jsonl")),
     ["data.jsonl", "not a regular file"]),
    ("data-link-to-dev-zero",
     lambda root: ((root / "data.jsonl").unlink(), os.symlink("/dev/zero", root / "data.jsonl")),
     ["data.jsonl", "not a regular file"]),
]

SET_CASES = [
    ("tokens=nan", ["tokens=nan", "> 0"]),
    ("tokens=inf", ["tokens=inf", "> 0"]),
    ("tokens=-inf", ["tokens=-inf", "> 0"]),
    ("tokens=1e30", ["tokens=1e+30", "100,000"]),
    ("tokens=1e12", ["tokens=1e+12", "optimizer steps"]),
    ("tokens=2.5", ["tokens=2.5", "whole number"]),
    ("tokens=0x10", ["'0x10' is not a number"]),
    ("lr=nan", ["lr=nan", "> 0"]),
    ("warmup_ratio=1e30", ["warmup_ratio=1e+30", "[0, 1]"]),
    ("weight_decay=-1e-300", ["weight_decay", ">= 0"]),
    ("tokens", ["write KEY=VALUE"]),
]


def weights_edited(edit):
    """The study's own-format model saved again with one tensor edited (finite or not)."""
    def make(root: Path) -> None:
        loaded = load_model(root / "model")
        with torch.no_grad():
            edit(dict(loaded.model.named_parameters()))
        save_model(root / "model", loaded.model, loaded.tokenizer)
    return make


@pytest.mark.parametrize("edit, names", [
    (lambda p: p["transformer.h.0.attn.c_q.weight"][0, 0].fill_(float("nan")),
     ["model.safetensors", "transformer.h.0.attn.c_q.weight", "holds NaN or inf"]),
    (lambda p: p["transformer.h.0.mlp.c_fc.weight"].mul_(1e30),
     ["model.safetensors", "logits on the first training row"]),
], ids=["nan-weight", "weights-overflow"])
def test_weights_that_give_a_non_finite_loss_are_named_before_the_first_batch(root, edit, names):
    """A new study of those weights is refused before its first batch, naming the model's file (and the tensor),
    and leaves no folder behind."""
    weights_edited(edit)(root)
    refused(root, *names, args=("run", "--preset", "tiny", "--model", "model", "--data", "data.jsonl", "--x",
                                "lr:1e-3:1e-2", "--y", "tokens:512:1024", "--resolution", "2", "--rows-per-step", "2",
                                "--seq-len", "64", "--eval-tokens", "1024", "--out", "new", "--quiet"))
    assert not (root / "new").exists()


# options of `run` out of any study's bounds, refused before anything is loaded
OPTION_CASES = [
    ("seed-past-64-bits", ["--seed", "99999999999999999999"], ["--seed 99999999999999999999", "2**63 - 1"]),
    ("seed-negative", ["--seed", "-1"], ["--seed -1", "[0, 2**63 - 1]"]),
    ("eval-tokens-1e12", ["--eval-tokens", "1000000000000"], ["--eval-tokens 1,000,000,000,000", "at most"]),
    ("eval-tokens-negative", ["--eval-tokens", "-1"], ["--eval-tokens must be 0 (no eval pass) or more"]),
]


@pytest.mark.parametrize("options, names", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_an_option_out_of_bounds_is_one_line_before_any_work(root, options, names):
    refused(root, *names, args=("run", "--out", "study", *options, "--dry-run"))


@pytest.mark.parametrize("make, names", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_a_hostile_file_is_one_line_and_changes_nothing(root, make, names):
    make(root)
    refused(root, *names, marker=root / "ran")


@pytest.mark.parametrize("value, names", SET_CASES, ids=[c[0] for c in SET_CASES])
def test_a_hostile_set_value_is_one_line_and_changes_nothing(root, value, names):
    refused(root, *names, args=("run", "--out", "study", "--set", value, "--dry-run"))


def test_there_are_at_least_forty_hostile_cases():
    assert len(FILE_CASES) + len(SET_CASES) >= 40


def test_the_unedited_files_load(root):
    """The cases fail because of their edit: every folder they start from loads."""
    for make in (lambda r: None, hf(), native()):
        make(root)
        loaded = load_model(root / "model")
        assert loaded.config == tiny_config(**MODEL, norm_eps=loaded.config.norm_eps)


def test_a_folder_of_links_like_the_hub_cache_still_loads(tmp_path):
    """Confining the tokenizer to the model's folder still lets a Hugging Face cache snapshot load: there every
    file is a link into the repo's blobs/ folder."""
    from vmap_sweep.model.tokenizer import load_tokenizer

    saved = save_model(tmp_path / "saved", random_model(tiny_config(**MODEL), seed=7),
                       load_tokenizer(write_tokenizer_pkl(tmp_path / "tokenizer.pkl")))
    blobs, snapshot_dir = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot_dir.mkdir(parents=True)
    for n, file in enumerate(sorted(saved.iterdir())):
        shutil.move(file, blobs / f"blob{n}")
        os.symlink(Path("../../blobs") / f"blob{n}", snapshot_dir / file.name)
    assert load_model(snapshot_dir).tokenizer.source == snapshot_dir / "tokenizer.pkl"


# ---------------------------------------------------------------------------------------------- memory of a process
# The CLI in a child process that reports how much its peak RSS grew while the command ran (imports done first).
_CHILD = """
import json, resource, sys
import vmap_sweep.cli, vmap_sweep.model.checkpoint, vmap_sweep.run.worker, vmap_sweep.run.estimate
import vmap_sweep.store.study, regex, safetensors.torch, tiktoken, tokenizers
report, sys.argv = sys.argv[1], ["vmap-sweep", *sys.argv[2:]]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    vmap_sweep.cli.app()
    code = 0
except SystemExit as e:
    code = e.code
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
open(report, "w").write(json.dumps({"code": code, "added_kib": after - before}))
"""


@pytest.mark.parametrize("make", [own_config(vocab_size=10**12), own_config(n_layer=10**6),
                                  hf(num_hidden_layers=10**7), native(sequence_len=10**12),
                                  native_2026(n_layer=10**12), tokenizer_pkl({"pat_str": ""})],
                         ids=["own-vocab-1e12", "own-layers-1e6", "hf-layers-1e7", "native-sequence-1e12",
                              "native-2026-layers-1e12", "pat-str-empty"])
def test_a_refusal_in_a_real_process_is_one_line_and_costs_no_memory(root, make):
    """In a real process: nothing but the error line reaches stderr (no Rust panic message either), and the
    refusal adds less than RSS_LIMIT to the peak resident memory."""
    make(root)
    out = root / "rss.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(out), *RESUME], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text())
    assert report["code"] == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert report["added_kib"] * 1024 < RSS_LIMIT, f"peak RSS grew by {report['added_kib'] >> 10} MiB"
