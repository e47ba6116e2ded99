"""load_model / save_model: native nanochat folders, transformers folders, the Hub cache, our own format."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from helpers import (
    TIKTOKEN_VOCAB,
    random_model,
    tiny_config,
    with_bf16_wte,
    write_native_checkpoint,
    write_tokenizer_json,
    write_tokenizer_pkl,
)

from vmap_sweep.errors import CheckpointError, TokenizerError
from vmap_sweep.model.checkpoint import MissingTokenizerWarning, _pick_hub_files, load_model, save_model
from vmap_sweep.model.gpt import GPT
from vmap_sweep.model.tokenizer import ByteTokenizer, HFTokenizer, TiktokenTokenizer, load_tokenizer


def _ids(vocab: int, T: int = 16, B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _one_line_naming(err: pytest.ExceptionInfo, name: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert name in msg, msg


# ---------------------------------------------------------------------------------------------- HF


def _hf_model(seed: int):
    """A random tiny transformers NanoChatForCausalLM (GQA in most draws), every weight N(0, 0.2)."""
    transformers = pytest.importorskip("transformers")
    rng = random.Random(seed)
    n_head = rng.choice([2, 4])
    n_kv_head = rng.choice([h for h in (1, 2, 4) if n_head % h == 0 and h <= n_head])
    head_dim = rng.choice([8, 16])
    cfg = transformers.NanoChatConfig(
        vocab_size=rng.randint(280, 320),
        hidden_size=n_head * head_dim,
        intermediate_size=4 * n_head * head_dim,
        num_hidden_layers=rng.choice([1, 2]),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv_head,
        max_position_embeddings=32,
        rms_norm_eps=rng.choice([1e-6, 1e-5]),
        final_logit_softcapping=rng.choice([15.0, 30.0]),
        rope_parameters={"rope_type": "default", "rope_theta": rng.choice([10000.0, 500.0])},
    )
    torch.manual_seed(seed)
    model = transformers.NanoChatForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _assert_logits_match(ours: GPT, hf, vocab: int) -> None:
    ids = _ids(vocab, T=24)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
        got = ours(ids)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-5, rel


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_hf_folder_parity_with_transformers(tmp_path, seed):
    hf = _hf_model(seed)
    hf.save_pretrained(tmp_path)
    write_tokenizer_json(tmp_path / "tokenizer.json")
    if seed == 3:  # older config.json spelling: rope_theta at top level
        cfg = json.loads((tmp_path / "config.json").read_text())
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        (tmp_path / "config.json").write_text(json.dumps(cfg))

    model, tok, config = load_model(tmp_path)

    c = hf.config
    assert (config.n_layer, config.n_head, config.n_kv_head, config.n_embd, config.vocab_size) == (
        c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.vocab_size,
    )  # fmt: skip
    assert config.norm_eps == c.rms_norm_eps and config.softcap == c.final_logit_softcapping
    assert config.rope_base == c.rope_parameters["rope_theta"] and config.sequence_len == 32
    assert isinstance(tok, HFTokenizer)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    _assert_logits_match(model, hf, c.vocab_size)


def test_gqa_is_exercised_by_parity_draws():
    # The parity test is only meaningful for n_kv_head < n_head if some draw has it.
    pytest.importorskip("transformers")
    cfgs = [_hf_model(s).config for s in range(4)]
    assert any(c.num_key_value_heads < c.num_attention_heads for c in cfgs)


def test_hf_sharded_bf16_checkpoint(tmp_path):
    hf = _hf_model(1)
    with torch.no_grad():
        for p in hf.parameters():  # the float32 reference holds exactly the bf16 values that get saved
            p.copy_(p.to(torch.bfloat16).float())
    # A separate copy goes to bf16: .to() would also round the reference's rotary inv_freq buffer.
    _hf_model(1).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    write_tokenizer_json(tmp_path / "tokenizer.json")
    model, _, _ = load_model(tmp_path)
    # bf16 weights are loaded exactly (then held in float32).
    assert torch.equal(model.transformer.wte.weight, hf.model.embed_tokens.weight)
    assert torch.equal(model.transformer.h[0].mlp.c_proj.weight, hf.model.layers[0].mlp.fc2.weight)
    _assert_logits_match(model, hf, hf.config.vocab_size)


# ---------------------------------------------------------------------------------------------- native


@pytest.mark.parametrize("layout", ["beside", "subfolder", "basedir"])
def test_native_folder_newest_step_and_step_argument(tmp_path, layout):
    config = tiny_config()
    old, new = random_model(config, seed=1), random_model(config, seed=2)
    if layout == "basedir":  # nanochat's cache: BASE/chatsft_checkpoints/d20 + BASE/tokenizer/
        folder = tmp_path / "chatsft_checkpoints" / "d20"
        write_tokenizer_pkl(tmp_path / "tokenizer" / "tokenizer.pkl")
    else:
        folder = tmp_path / "ckpt"
        write_tokenizer_pkl(folder / ("tokenizer.pkl" if layout == "beside" else "tokenizer/tokenizer.pkl"))
    write_native_checkpoint(folder, old, step=50)
    write_native_checkpoint(folder, new, step=100)
    (folder / "optim_000100.pt").write_bytes(b"ignored")

    model, tok, loaded_config = load_model(folder)
    assert isinstance(tok, TiktokenTokenizer) and tok.vocab_size == TIKTOKEN_VOCAB
    assert loaded_config == config and loaded_config.norm_eps is None  # native: machine epsilon
    assert model.transformer.wte.weight.dtype == torch.float32
    expected = with_bf16_wte(new)
    assert _same_weights(model, expected)
    ids = _ids(config.vocab_size)
    torch.testing.assert_close(model(ids), expected(ids), rtol=0, atol=0)

    assert _same_weights(load_model(folder, step=50).model, with_bf16_wte(old))
    # A model file stands for its folder and step.
    assert _same_weights(load_model(folder / "model_000050.pt").model, with_bf16_wte(old))


def test_native_without_orig_mod_prefix(tmp_path):
    model = random_model(tiny_config(), seed=3)
    write_native_checkpoint(tmp_path, model, step=7, orig_mod=False)
    write_tokenizer_pkl(tmp_path / "tokenizer.pkl")
    assert _same_weights(load_model(tmp_path).model, with_bf16_wte(model))


# ---------------------------------------------------------------------------------------------- own format


@pytest.mark.parametrize("kind", ["bytes", "tiktoken", "hf"])
def test_own_format_round_trip(tmp_path, kind):
    config = tiny_config(norm_eps=1e-5, rope_base=500.0, softcap=20.0, n_kv_head=4)
    model = random_model(config, seed=4)
    if kind == "bytes":
        tok = ByteTokenizer()
    elif kind == "tiktoken":
        tok = load_tokenizer(write_tokenizer_pkl(tmp_path / "src" / "tokenizer.pkl"))
    else:
        tok = load_tokenizer(write_tokenizer_json(tmp_path / "src" / "tokenizer.json"))

    out = save_model(tmp_path / "saved", model, tok)
    meta = json.loads((out / "vmap_sweep.json").read_text())
    assert meta["format"] == "vmap-sweep" and meta["model_config"] == config.to_dict()
    assert meta["tokenizer"] == {"bytes": "bytes", "tiktoken": "tokenizer.pkl", "hf": "tokenizer.json"}[kind]
    if kind != "bytes":  # the tokenizer file is copied verbatim beside the weights
        assert (out / meta["tokenizer"]).read_bytes() == tok.source.read_bytes()

    loaded, tok2, config2 = load_model(out)
    assert config2 == config
    assert _same_weights(loaded, model)
    assert type(tok2) is type(tok)
    text = "hello the <|bos|> thing 12345"
    assert tok2.encode(text) == tok.encode(text) and tok2.vocab_size == tok.vocab_size


def test_save_model_refuses_tokenizer_bigger_than_vocab(tmp_path):
    model = GPT(tiny_config(vocab_size=260))
    with pytest.raises(TokenizerError, match="265 tokens"):
        save_model(tmp_path, model, ByteTokenizer())


# ---------------------------------------------------------------------------------------------- Hub cache


def _hub_snapshot(cache, repo_id: str, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """huggingface_hub's cache layout: models--owner--name/{refs/main, snapshots/<commit>/, blobs/}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return repo, snapshot


def _as_blobs(repo, snapshot) -> None:
    """Move files into blobs/ and leave symlinks in the snapshot, as huggingface_hub stores them."""
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(p for p in snapshot.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"blob{i:04d}"
        f.rename(blob)
        f.symlink_to(os.path.relpath(blob, f.parent))


def test_hub_repo_from_offline_cache_hf_layout(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    _, snapshot = _hub_snapshot(cache, "nanochat-students/nanochat-d20")
    hf = _hf_model(2)
    hf.save_pretrained(snapshot)
    write_tokenizer_json(snapshot / "tokenizer.json")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    model, tok, _ = load_model("nanochat-students/nanochat-d20")
    assert isinstance(tok, HFTokenizer)
    _assert_logits_match(model, hf, hf.config.vocab_size)


def test_hub_repo_from_offline_cache_native_layout_under_hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf-home"
    repo, snapshot = _hub_snapshot(home / "hub", "someone/nanochat-d2")
    config = tiny_config()
    net = random_model(config, seed=5)
    write_native_checkpoint(snapshot, random_model(config, seed=6), step=10)
    write_native_checkpoint(snapshot, net, step=20)
    write_tokenizer_pkl(snapshot / "tokenizer.pkl")
    _as_blobs(repo, snapshot)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    loaded = load_model("someone/nanochat-d2")
    assert isinstance(loaded.tokenizer, TiktokenTokenizer)
    assert _same_weights(loaded.model, with_bf16_wte(net))


def test_hub_repo_not_cached_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache") as err:
        load_model("nobody/no-such-model")
    _one_line_naming(err, "nobody/no-such-model")


def test_hub_online_lists_files_then_downloads_only_what_the_layout_needs(tmp_path, monkeypatch):
    # The two network calls are replaced; everything after them is the real code path.
    import huggingface_hub

    cache = tmp_path / "cache"
    _, snapshot = _hub_snapshot(cache, "someone/native")
    write_native_checkpoint(snapshot, random_model(tiny_config(), seed=10), step=20)
    write_tokenizer_pkl(snapshot / "tokenizer.pkl")
    listing = ["model_000020.pt", "meta_000020.json", "optim_000020.pt", "tokenizer.pkl", "token_bytes.pt"]
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id: listing)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    assert isinstance(load_model("someone/native").tokenizer, TiktokenTokenizer)
    assert calls == [
        (
            "someone/native",
            {"cache_dir": str(cache), "allow_patterns": ["model_000020.pt", "meta_000020.json", "tokenizer.pkl"]},
        )
    ]


def test_hub_unreachable_falls_back_to_the_cache(tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(self, repo_id):
        raise ConnectionError("no route to host")

    cache = tmp_path / "cache"
    _, snapshot = _hub_snapshot(cache, "someone/native")
    model = random_model(tiny_config(), seed=11)
    write_native_checkpoint(snapshot, model, step=3)
    write_tokenizer_pkl(snapshot / "tokenizer.pkl")
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_network)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    assert _same_weights(load_model("someone/native").model, with_bf16_wte(model))
    with pytest.raises(CheckpointError, match="the Hub can't be reached") as err:
        load_model("someone/not-cached")
    _one_line_naming(err, "someone/not-cached")


def test_hub_layout_choice_from_file_listing():
    hf = ["README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "pytorch_model.bin", "generation_config.json"]  # fmt: skip
    assert _pick_hub_files("o/n", hf, None) == (
        "",
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"],
    )
    native = ["meta_000650.json", "model_000650.pt", "meta_000100.json", "model_000100.pt", "optim_000650.pt",
              "tokenizer.pkl", "token_bytes.pt"]  # fmt: skip
    assert _pick_hub_files("o/n", native, None) == ("", ["model_000650.pt", "meta_000650.json", "tokenizer.pkl"])
    assert _pick_hub_files("o/n", native, 100)[1][:2] == ["model_000100.pt", "meta_000100.json"]
    base_dir = ["base_checkpoints/d20/model_000010.pt", "base_checkpoints/d20/meta_000010.json",
                "chatsft_checkpoints/d20/model_000005.pt", "chatsft_checkpoints/d20/meta_000005.json",
                "tokenizer/tokenizer.pkl"]  # fmt: skip
    assert _pick_hub_files("o/n", base_dir, None) == (
        "chatsft_checkpoints/d20",
        ["chatsft_checkpoints/d20/model_000005.pt", "chatsft_checkpoints/d20/meta_000005.json",
         "tokenizer/tokenizer.pkl"],
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="not a nanochat checkpoint repo"):
        _pick_hub_files("o/n", ["README.md", "weights.bin"], None)
    with pytest.raises(CheckpointError, match="no model file for step 3"):
        _pick_hub_files("o/n", native, 3)


# ---------------------------------------------------------------------------------------------- strictness


@pytest.fixture
def native_dir(tmp_path):
    folder = tmp_path / "native"
    write_native_checkpoint(folder, random_model(tiny_config(), seed=7), step=100)
    write_tokenizer_pkl(folder / "tokenizer.pkl")
    return folder


def _edit_state(folder, edit) -> None:
    path = folder / "model_000100.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def _edit_meta(folder, edit) -> None:
    path = folder / "meta_000100.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def test_native_missing_key(native_dir):
    _edit_state(native_dir, lambda s: s.pop("_orig_mod.lm_head.weight"))
    with pytest.raises(CheckpointError, match="missing keys lm_head.weight") as err:
        load_model(native_dir)
    _one_line_naming(err, "model_000100.pt")


def test_native_extra_key(native_dir):
    _edit_state(native_dir, lambda s: s.update({"transformer.resid_lambdas": torch.ones(2)}))
    with pytest.raises(CheckpointError, match="unexpected keys transformer.resid_lambdas") as err:
        load_model(native_dir)
    _one_line_naming(err, "model_000100.pt")


def test_native_wrong_shape(native_dir):
    key = "_orig_mod.transformer.h.0.attn.c_q.weight"
    _edit_state(native_dir, lambda s: s.update({key: s[key][:8]}))
    with pytest.raises(CheckpointError, match=r"transformer.h.0.attn.c_q.weight has shape \(8, 32\)") as err:
        load_model(native_dir)
    _one_line_naming(err, "model_000100.pt")


def test_native_meta_without_model_config(native_dir):
    _edit_meta(native_dir, lambda m: m.pop("model_config"))
    with pytest.raises(CheckpointError, match="no model_config") as err:
        load_model(native_dir)
    _one_line_naming(err, "meta_000100.json")


def test_native_meta_of_unknown_architecture(native_dir):
    _edit_meta(native_dir, lambda m: m["model_config"].update(n_experts=8))
    with pytest.raises(CheckpointError, match="model_config has n_experts, from a nanochat architecture this "
                                              "version does not know") as err:
        load_model(native_dir)
    _one_line_naming(err, "meta_000100.json")


def test_native_meta_of_2026_over_weights_without_its_parameters(native_dir):
    # January to March 2026: window_pattern, but no smear/backout, and a forward unlike today's
    _edit_meta(native_dir, lambda m: m["model_config"].update(window_pattern="SSSL"))
    with pytest.raises(CheckpointError, match="a 2026 nanochat checkpoint without smear_gate.weight, smear_lambda, "
                                              "backout_lambda: from a version between January and March") as err:
        load_model(native_dir)
    _one_line_naming(err, "model_000100.pt")


def test_native_missing_meta(native_dir):
    (native_dir / "meta_000100.json").unlink()
    with pytest.raises(CheckpointError, match="missing") as err:
        load_model(native_dir)
    _one_line_naming(err, "meta_000100.json")


def test_native_corrupt_weights(native_dir):
    (native_dir / "model_000100.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="can't be read") as err:
        load_model(native_dir)
    _one_line_naming(err, "model_000100.pt")


def test_native_missing_tokenizer(native_dir):
    (native_dir / "tokenizer.pkl").unlink()
    with pytest.raises(TokenizerError, match="no tokenizer.pkl") as err:
        load_model(native_dir)
    _one_line_naming(err, str(native_dir))


def test_native_tokenizer_larger_than_model_vocab(tmp_path):
    write_native_checkpoint(tmp_path, random_model(tiny_config(vocab_size=TIKTOKEN_VOCAB - 1), seed=8), step=1)
    write_tokenizer_pkl(tmp_path / "tokenizer.pkl")
    with pytest.raises(TokenizerError, match=f"{TIKTOKEN_VOCAB} tokens") as err:
        load_model(tmp_path)
    _one_line_naming(err, "tokenizer.pkl")


def test_native_unknown_step(native_dir):
    with pytest.raises(CheckpointError, match=r"no model file for step 7; steps here: \[100\]") as err:
        load_model(native_dir, step=7)
    _one_line_naming(err, str(native_dir))


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="not a checkpoint") as err:
        load_model(tmp_path)
    _one_line_naming(err, str(tmp_path))


def test_missing_path_that_is_not_a_repo_id(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder") as err:
        load_model(tmp_path / "nope" / "deeper")
    _one_line_naming(err, "nope")


@pytest.fixture
def hf_dir(tmp_path):
    hf = _hf_model(0)
    hf.save_pretrained(tmp_path)
    write_tokenizer_json(tmp_path / "tokenizer.json")
    return tmp_path


def _edit_config(folder, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(model_type="llama"), "model_type is 'llama'"),
        (lambda c: c.update(intermediate_size=c["intermediate_size"] + 4), "not 4 x hidden_size"),
        (lambda c: c.pop("vocab_size"), "lacks vocab_size"),
        (lambda c: c.update(hidden_size=c["hidden_size"] * 2, intermediate_size=c["hidden_size"] * 8), "has shape"),
    ],
    ids=["model-type", "intermediate-size", "incomplete", "shape-mismatch"],
)
def test_hf_config_problems(hf_dir, edit, message):
    _edit_config(hf_dir, edit)
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(hf_dir)
    _one_line_naming(err, "model.safetensors" if message == "has shape" else "config.json")


def test_hf_step_is_refused(hf_dir):
    with pytest.raises(CheckpointError, match="step=3 applies only to native") as err:
        load_model(hf_dir, step=3)
    _one_line_naming(err, "config.json")


def test_hf_folder_saved_without_a_tokenizer_loads_its_weights_and_says_so(hf_dir):
    with_tokenizer = load_model(hf_dir)
    (hf_dir / "tokenizer.json").rename(hf_dir.parent / "elsewhere.json")
    with pytest.warns(MissingTokenizerWarning, match="no tokenizer.json beside config.json") as caught:
        model, tok, _ = load_model(hf_dir)
    assert tok is None and caught[0].filename == __file__  # the warning points at the caller
    assert _same_weights(model, with_tokenizer.model)
    # a tokenizer from elsewhere, checked against the model as its own would be
    assert isinstance(load_model(hf_dir, tokenizer=hf_dir.parent / "elsewhere.json").tokenizer, HFTokenizer)
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        load_model(hf_dir, tokenizer=hf_dir / "missing.json")


def test_hf_tokenizer_without_nanochat_specials(hf_dir):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(hf_dir / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="lacks nanochat's special tokens <|bos|>") as err:
        load_model(hf_dir)
    _one_line_naming(err, "tokenizer.json")


def test_hf_missing_shard(hf_dir):
    hf = _hf_model(0)
    for f in hf_dir.glob("*.safetensors"):
        f.unlink()
    hf.save_pretrained(hf_dir, max_shard_size="20KB")
    shard = sorted(hf_dir.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shards {shard.name} that are missing") as err:
        load_model(hf_dir)
    _one_line_naming(err, "model.safetensors.index.json")


def test_own_format_tokenizer_name_cannot_leave_the_folder(tmp_path):
    out = save_model(tmp_path / "m", random_model(tiny_config(), seed=9), ByteTokenizer())
    meta = json.loads((out / "vmap_sweep.json").read_text())
    meta["tokenizer"] = "../tokenizer.pkl"
    (out / "vmap_sweep.json").write_text(json.dumps(meta))
    with pytest.raises(TokenizerError, match="a file name in this folder") as err:
        load_model(out)
    _one_line_naming(err, "vmap_sweep.json")
