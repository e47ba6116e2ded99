"""Provenance: a study records the versions, GPU, Hub commits and the base weights' SHA-256 it started with,
pins a Hub model to its commit, refuses a resume on other weights or another revision (one line, nothing
changed), refuses other torch/CUDA/GPU like any run setting and only shows another vmap-sweep version; and a
transformers folder saved without a tokenizer trains once `--tokenizer` names one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
import torch
from cli_helpers import cli, ok
from helpers import snapshot, write_tokenizer_json

from vmap_sweep.data.sources import dataset_commit
from vmap_sweep.errors import DataError
from vmap_sweep.store import extras
from vmap_sweep.store.db import StudyStore

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
# 2 x 2 cells of one or two steps on a one-layer model: seconds per run (packed: a 32-token row holds no whole
# synthetic conversation)
GRID = ["--data", "synthetic", "--x", "lr:1e-3:1e-2:log", "--y", "tokens:256:512:log", "--resolution", "2",
        "--batch-size", "2", "--seq-len", "32", "--packing", "--eval-tokens", "512", "--device", "cpu", "--quiet"]


def save_hf_model(folder: Path, seed: int, tokenizer: bool = False) -> Path:
    """A one-layer nanochat written by transformers' save_pretrained (no tokenizer unless asked for)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.NanoChatConfig(vocab_size=288, hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    transformers.NanoChatForCausalLM(cfg).save_pretrained(folder)
    if tokenizer:
        write_tokenizer_json(folder / "tokenizer.json")
    return folder


@pytest.fixture
def tok(tmp_path) -> Path:
    return write_tokenizer_json(tmp_path / "tok" / "tokenizer.json")


def one_line(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def hub_cache(cache: Path, repo_id: str, commit: str, seed: int) -> Path:
    """huggingface_hub's cache layout with one snapshot of a model, refs/main pointing at it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    save_hf_model(repo / "snapshots" / commit, seed, tokenizer=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo


def test_a_folder_saved_without_a_tokenizer_asks_for_one_then_trains_with_it(tmp_path, tok):
    model = save_hf_model(tmp_path / "m", seed=0)
    out = tmp_path / "s"
    one_line(cli("run", "--model", model, "--out", out, *GRID), "--tokenizer PATH", str(model))
    assert not out.exists()  # refused before a study folder was left behind

    ok("run", "--model", model, "--tokenizer", tok, "--out", out, *GRID)
    with StudyStore.open(out) as store:
        assert store.done_count() == 4 and store.config["tokenizer"] == str(tok)


def test_a_study_records_its_provenance_and_refuses_changed_weights(tmp_path, tok):
    model = save_hf_model(tmp_path / "m", seed=0)
    out = tmp_path / "s"
    ok("run", "--model", model, "--tokenizer", tok, "--out", out, *GRID)
    weights = (model / "model.safetensors").read_bytes()
    with StudyStore.open(out) as store:
        origin, settings = extras.provenance(store), extras.run_settings(store)
    # the documented fingerprint: SHA-256 over each weight file's name and bytes
    assert origin["model"]["sha256"] == hashlib.sha256(b"model.safetensors\0" + weights).hexdigest()
    assert origin["model"]["revision"] is None and origin["data"]["revision"] is None  # local: not from the Hub
    assert origin["vmap_sweep"] and origin["python"]
    assert (settings.torch, settings.cuda, settings.gpu) == (torch.__version__.split("+")[0], "none", "cpu")
    shown = ok("status", out).stdout
    assert origin["model"]["sha256"][:16] in shown and "GPU" in shown and settings.torch in shown

    save_hf_model(model, seed=1)  # the same folder, other weights
    before = snapshot(out)
    one_line(cli("run", "--out", out, *GRID), "its weights changed", origin["model"]["sha256"][:12])
    one_line(cli("zoom", out, "--auto", "--device", "cpu"), "its weights changed")  # a zoom child likewise
    assert snapshot(out) == before
    report = ok("report", out).stdout.strip()
    assert origin["model"]["sha256"] in Path(report).read_text()


def test_a_hub_model_is_pinned_to_its_commit_and_a_changed_revision_is_refused(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = hub_cache(cache, "someone/tiny-chat", COMMIT_A, seed=0)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the real Hub code path, answered by the cache
    out = tmp_path / "s"
    ok("run", "--model", "someone/tiny-chat", "--out", out, *GRID)
    with StudyStore.open(out) as store:
        assert store.config["model_revision"] == COMMIT_A
        assert extras.provenance(store)["model"]["revision"] == COMMIT_A
    assert COMMIT_A in ok("status", out).stdout

    # upstream moves on: main is now another commit with other weights
    save_hf_model(repo / "snapshots" / COMMIT_B, seed=1, tokenizer=True)
    (repo / "refs" / "main").write_text(COMMIT_B)
    before = snapshot(out)
    one_line(cli("run", "--out", out, "--model-revision", COMMIT_B, *GRID), "model_revision", "--out")
    assert snapshot(out) == before
    # the same command resumes on the pinned commit: nothing left to train, nothing refused
    ok("run", "--model", "someone/tiny-chat", "--out", out, *GRID)
    one_line(cli("run", "--model", "someone/tiny-chat", "--model-revision", "c" * 40, "--out", tmp_path / "t", *GRID),
             "someone/tiny-chat", "not in the Hugging Face cache")


def _store_extra(out: Path, key: str, edit) -> None:
    with StudyStore.open(out) as store:
        value = store.get_extra(key)
        edit(value)
        store.put_extra(key, value)


def test_another_torch_is_refused_another_vmap_sweep_only_shown(tmp_path):
    out = tmp_path / "s"
    ok("run", "--preset", "tiny", "--out", out, *GRID)
    with contextlib.closing(sqlite3.connect(out / "study.db")) as conn:  # one cell left to train
        conn.execute("UPDATE cells SET status='pending' WHERE i=1 AND j=1")
        conn.commit()
    _store_extra(out, extras.RUN_SETTINGS, lambda s: s.update(torch="2.0.0"))
    one_line(cli("run", "--out", out, *GRID), "torch: '2.0.0' -> ", "same torch")

    _store_extra(out, extras.RUN_SETTINGS, lambda s: s.update(torch=torch.__version__.split("+")[0]))
    _store_extra(out, extras.PROVENANCE, lambda p: p.update(vmap_sweep="0.1.0"))
    resumed = ok("run", "--out", out, *GRID)
    assert "started with vmap-sweep 0.1.0" in resumed.stderr
    with StudyStore.open(out) as store:
        assert store.done_count() == 4


def test_local_data_has_no_revision_and_a_cached_hub_dataset_resolves_to_its_commit(tmp_path, monkeypatch):
    result = cli("run", "--preset", "tiny", "--data-revision", "v1", "--out", tmp_path / "s", *GRID)
    one_line(result, "synthetic", "drop --data-revision v1")
    repo = tmp_path / "hub" / "datasets--someone--qa"
    (repo / "snapshots" / COMMIT_A).mkdir(parents=True)
    (repo / "snapshots" / COMMIT_A / "train.jsonl").write_text(json.dumps({"messages": []}) + "\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_A)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert dataset_commit("someone/qa") == COMMIT_A
    assert dataset_commit(str(tmp_path / "local.jsonl")) is None
    with pytest.raises(DataError, match="no Hub revision"):
        from vmap_sweep.data.sources import load_conversations

        load_conversations("synthetic", "train", revision="v1")
