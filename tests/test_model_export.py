"""`vmap-sweep model`: one cell re-trained (refused unless it reproduces its stored trajectory) and written in the
transformers layout and the project's own; loaded by transformers and by `load_model`, the same logits; its
tokenizer and chat template as transformers reads them; `--sample`'s greedy answer equals transformers' own
greedy generation."""

from __future__ import annotations

import json
import shutil
import sqlite3

import numpy as np
import pytest
import torch
from cli_helpers import cli, ok
from helpers import run_local

from vmap_sweep.eval.ood import retrain_cells
from vmap_sweep.model.checkpoint import load_model
from vmap_sweep.model.generate import chat_prompt
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.config import preset

transformers = pytest.importorskip("transformers")

# 2 x 2 cells of 4 and 8 steps: the lower learning rate converges, the higher diverges
CFG = preset("tiny").with_overrides(resolution="2", x="lr:1e-3:1:log", y="tokens:1024:2048:log", eval_tokens=512)
QUESTION = "Document:\nInvoice total: 40 EUR\n\nQuestion: What is the total?"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    with run_local(CFG, out, 4) as store:
        assert store.done_count() == 4
    return out


@pytest.fixture(scope="module")
def exported(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "cell"
    result = ok("model", study, "--cell", "0,1", "-o", out, "--device", "cpu", "--sample", QUESTION,
                "--samples", "2", "--max-tokens", "12")
    return out, result.stdout


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


def test_the_exported_cell_loads_in_transformers_and_load_model_with_its_logits(study, exported):
    out, _ = exported
    with StudyStore.open(study) as store:
        cell = next(c for c in store.cells() if c.key == (0, 1))
        label = store.labels_array()[1, 0]
    reference = next(retrain_cells(study, [cell], device="cpu")).model  # the cell's model, re-trained here
    ids = torch.randint(0, 265, (2, 48), generator=torch.Generator().manual_seed(0))
    want = _logits(reference, ids)
    base = load_model(out / "vmap-sweep").model
    assert torch.equal(_logits(base, ids), want)  # the own format: bitwise
    assert torch.equal(_logits(load_model(out / "transformers").model, ids), want)  # float32 in, float32 out
    hf = transformers.NanoChatForCausalLM.from_pretrained(out / "transformers").eval()
    with torch.no_grad():
        got = hf(input_ids=ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    from vmap_sweep.train.tiny import tiny_base_model

    assert not torch.equal(_logits(tiny_base_model().model, ids), want)  # a fine-tune, not the base model
    info = json.loads((out / "cell.json").read_text())
    assert (info["i"], info["j"], info["label"], info["retrain_max_rel_diff"]) == (0, 1, label, 0.0)
    assert info["hparams"] == cell.hparams


def test_the_chat_template_and_sample_answers_agree_with_transformers(exported):
    out, stdout = exported
    tok = transformers.AutoTokenizer.from_pretrained(out / "transformers")
    ours = load_model(out / "vmap-sweep").tokenizer
    prompt = chat_prompt(ours, QUESTION)
    templated = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                        tokenize=True)
    assert list(templated["input_ids"] if hasattr(templated, "keys") else templated) == prompt

    hf = transformers.NanoChatForCausalLM.from_pretrained(out / "transformers").eval()
    generated = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                            eos_token_id=[ours.special_id("<|assistant_end|>"), ours.bos_id])[0, len(prompt):]
    stop = {ours.special_id("<|assistant_end|>"), ours.bos_id}
    greedy = ours.decode([t for t in generated.tolist() if t not in stop])
    lines = stdout.splitlines()
    assert f"greedy: {json.dumps(greedy, ensure_ascii=False)}" in lines
    assert sum(line.startswith(("sample 1: ", "sample 2: ")) for line in lines) == 2


def test_a_cell_that_does_not_reproduce_is_refused_and_nothing_is_written(study, tmp_path):
    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    with sqlite3.connect(copy / "study.db") as conn:
        (blob,) = conn.execute("SELECT trajectory FROM cells WHERE i=0 AND j=0").fetchone()
        changed = (np.frombuffer(blob, dtype="<f8") * (1 + 1e-4)).astype("<f8").tobytes()
        conn.execute("UPDATE cells SET trajectory=? WHERE i=0 AND j=0", (changed,))
    conn.close()  # as a sqlite3 shell would: the edit is folded into study.db, no log is left
    result = cli("model", copy, "--cell", "0,0", "-o", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 2 and "does not reproduce its stored trajectory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, needle", [
    (["--cell", "5,0"], "has cells 0..1 along x"),
    (["--cell", "one"], "give I,J"),
    (["--cell", "0,0", "--temperature", "0"], "--temperature > 0"),
])
def test_bad_options_are_one_line(study, tmp_path, args, needle):
    result = cli("model", study, "-o", tmp_path / "out", "--device", "cpu", *args)
    assert result.exit_code == 2 and needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_occupied_output_folder_is_refused(study, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    result = cli("model", study, "--cell", "0,0", "-o", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 2 and "choose a new -o folder" in result.stderr
