"""Out-of-distribution evaluation: the lm-eval adapter against direct computations with the model, the
re-training check, distance to the boundary, Spearman with its CI, and `run_ood_eval` end to end over a
custom multiple-choice task read from a local file (offline: nothing comes from the Hub)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_local

from vmap_sweep.analysis.classify import study_classes
from vmap_sweep.analysis.stats import rankdata, spearman
from vmap_sweep.errors import ConfigError
from vmap_sweep.eval import DEFAULT_LIMITS, DEFAULT_TASKS
from vmap_sweep.eval.ood import (
    distance_to_boundary,
    lattice,
    parse_cells,
    parse_count,
    parse_limits,
    pick_by_distance,
    plan_retraining,
    retrain_cells,
    run_ood_eval,
    select_cells,
    signed_distance,
    solo_cells,
    task_manager,
)
from vmap_sweep.run.worker import Worker
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.config import StudyConfig, preset
from vmap_sweep.study.settings import RunSettings

# The adapter needs the optional extra; everything else here (and the missing-extra error) runs without it.
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval not installed: pip install 'vmap-sweep[eval]'")

# 4 x 4 cells, 1 to 8 steps; at these learning rates the two lowest converge and the two highest diverge.
CFG = preset("tiny").with_overrides(resolution="4x4", y="tokens:256:2048:log", eval_tokens=512)
TASK = "vmap_toy_mc"
ROWS = [  # six multiple-choice questions, correct answer first in two of them, elsewhere in the rest
    {"question": "1 plus 2 is", "choices": ["3", "4", "12"], "label": 0},
    {"question": "The capital of France is", "choices": ["Oslo", "Paris", "Rome"], "label": 1},
    {"question": "Invoice total: 40 EUR. The total is", "choices": ["12 EUR", "7 EUR", "40 EUR"], "label": 2},
    {"question": "Name: Anna Smith. The name is", "choices": ["Anna Smith", "Ben Chen"], "label": 0},
    {"question": "Date: 03 May 2001. The year is", "choices": ["1999", "2001", "2011"], "label": 1},
    {"question": "City: Lyon. The city is", "choices": ["Porto", "Kyoto", "Lyon"], "label": 2},
]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """The tiny base model's cache: $VMAP_SWEEP_CACHE when set (shared, pretrained once), else a temp dir.
    One thread: these tiny models run 5-10x slower when two threads fight other processes for two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("VMAP_SWEEP_CACHE"):
            mp.setenv("VMAP_SWEEP_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(cache):
    from vmap_sweep.train.tiny import tiny_base_model

    return tiny_base_model()


@pytest.fixture(scope="module")
def study(cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study")
    with run_local(CFG, out, 16) as store:
        assert store.done_count() == 16
    return out


@pytest.fixture
def study_copy(study, tmp_path) -> Path:
    dst = tmp_path / "study"
    shutil.copytree(study, dst)
    return dst


@pytest.fixture
def include_path(tmp_path) -> Path:
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data))}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_target: label\n"
        'doc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n")
    return tasks


@pytest.fixture
def two_tasks(include_path) -> tuple[Path, str]:
    """The toy task and a second one over the same six rows, under another name."""
    other = f"{TASK}_b"
    (include_path / "toy_b.yaml").write_text((include_path / "toy.yaml").read_text().replace(TASK, other))
    return include_path, other


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Anything that tried the Hub would fail here instead of downloading."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def req(kind: str, *args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def VmapSweepLM(*args, **kwargs):  # noqa: N802 - stands for the class, imported only where lm-eval is
    from vmap_sweep.eval.adapter import VmapSweepLM as cls

    return cls(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- direct


@torch.no_grad()
def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]) for every t, straight from the model's logits (float64 sum later)."""
    logits = model(torch.tensor([ids[:-1]]))[0]
    return F.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


@torch.no_grad()
def direct_greedy(model, tok, context: str, n: int) -> str:
    ids = [tok.bos_id, *tok.encode(context)]
    out = []
    for _ in range(n):
        t = int(model(torch.tensor([ids[-model.config.sequence_len:]]))[0, -1].argmax())
        if t == tok.bos_id:
            break
        ids.append(t)
        out.append(t)
    return tok.decode(out)


# ---------------------------------------------------------------------------------------------- adapter


@needs_lm_eval
def test_loglikelihood_equals_the_model_and_is_greedy_is_right(tiny):
    model, tok = tiny.model, tiny.tokenizer
    lm = VmapSweepLM(model, tok, batch_size=2)  # 5 requests of different lengths: padded batches
    context = "Invoice No: 4411\nTotal:"
    greedy = direct_greedy(model, tok, context, 4)
    not_greedy = greedy[:-1] + ("x" if greedy[-1] != "x" else "y")
    long_context = "Receipt." * 45  # 360 bytes: more than sequence_len 256, cut from the left
    pairs = [(context, greedy), (context, not_greedy), ("", "Hello"), ("Date:", " 12 May"), (long_context, " ok")]
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    L = model.config.sequence_len
    for (c, x), (lp, _) in zip(pairs, got, strict=True):
        ids = ([tok.bos_id, *tok.encode(c + x)])[-(L + 1):]
        want = direct_logprobs(model, ids)[-len(tok.encode(x)):].double().sum().item()
        assert lp == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert [g for _, g in got[:2]] == [True, False]
    assert got[0][0] > got[1][0]
    # Batching changes nothing: one request per batch gives the same numbers.
    single = VmapSweepLM(model, tok, batch_size=1).loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    np.testing.assert_allclose([s[0] for s in single], [g[0] for g in got], rtol=1e-5)


@needs_lm_eval
def test_loglikelihood_rolling_is_the_whole_text_after_bos(tiny):
    model, tok = tiny.model, tiny.tokenizer
    lm = VmapSweepLM(model, tok, batch_size=4)
    text = "Form 7: Name Elena Rossi, City Porto."
    (got,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    want = direct_logprobs(model, [tok.bos_id, *tok.encode(text)]).double().sum().item()
    assert got == pytest.approx(want, rel=1e-5)
    # Longer than sequence_len (256): lm-eval's disjoint windows, each token predicted once; the first window
    # starts at <|bos|>, the next one right after it, and the last one is filled up with preceding text.
    long = "Letter from Acme Corp to Maya Kim about toner and paper. " * 10  # 570 bytes
    t = tok.encode(long)
    assert len(t) == 570
    (lp_long,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", long)])
    want = (direct_logprobs(model, [tok.bos_id, *t[:256]]).double().sum()
            + direct_logprobs(model, t[255:512]).double().sum()
            + direct_logprobs(model, t[313:570])[-58:].double().sum()).item()
    assert lp_long == pytest.approx(want, rel=1e-5)


@needs_lm_eval
def test_generate_until_stops_at_the_stop_string(tiny):
    model, tok = tiny.model, tiny.tokenizer
    lm = VmapSweepLM(model, tok, batch_size=2)
    contexts = ["Receipt\nStore: Blue Pine Ltd\nItem:", "Invoice No:"]
    free = [direct_greedy(model, tok, c, 30) for c in contexts]
    assert all(len(f) >= 12 for f in free), free
    stop = free[0][8:10]  # two characters from the middle of the first greedy continuation
    got = lm.generate_until([
        req("generate_until", contexts[0], {"until": [stop, "\x00never"], "max_gen_toks": 30}),
        req("generate_until", contexts[1], {"until": "\x00never", "max_gen_toks": 30}),
        req("generate_until", contexts[1], {"until": ["\x00never"], "max_gen_toks": 5}),
    ])
    assert got[0] == free[0][: free[0].index(stop)]
    assert got[1] == free[1]  # no stop string: the full greedy continuation, same in a batch as alone
    assert got[2] == free[1][:5]  # max_gen_toks (bytes = tokens here)
    # Generation stops at the stop string, not just the returned text: count the forward passes.
    calls = []
    forward = model.hidden
    lm_one = VmapSweepLM(model, tok, batch_size=1)
    lm_one.model.hidden = lambda idx: calls.append(1) or forward(idx)
    try:
        (text,) = lm_one.generate_until([req("generate_until", contexts[0], {"until": stop, "max_gen_toks": 30})])
    finally:
        del model.hidden
    assert text == got[0] and len(calls) == free[0].index(stop) + len(stop) < 30


# ---------------------------------------------------------------------------------------------- selection


def test_parse_cells_and_lattice():
    assert parse_cells("10x10") == (10, 10)
    assert parse_cells("3X5") == (3, 5)
    assert parse_cells("8") == (8, 8)
    for bad in ("0x4", "ax3", "4x4x4", ""):
        with pytest.raises(ConfigError, match="--cells"):
            parse_cells(bad)
    assert lattice(10, 128) == [0, 14, 28, 42, 56, 71, 85, 99, 113, 127]
    assert lattice(10, 4) == [0, 1, 2, 3]
    assert lattice(2, 4) == [0, 3]


def test_select_cells_takes_converged_lattice_points(study):
    with StudyStore.open(study) as store:
        converged = study_classes(store)
        assert converged[:, :2].all() and not converged[:, 2:].any()  # the premise of the numbers below
        assert [c.key for c in select_cells(store, 2, 2)] == [(0, 0), (0, 3)]
        assert [c.key for c in select_cells(store, 4, 2)] == [(0, 0), (1, 0), (0, 3), (1, 3)]
        assert len(select_cells(store, 10, 10)) == 8
        store_cells = {c.key: c for c in store.cells()}
        assert all(c == store_cells[c.key] for c in select_cells(store, 4, 4))


# ---------------------------------------------------------------------------------------------- distance


def brute_distance(mask: np.ndarray) -> np.ndarray:
    out = np.full(mask.shape, np.inf)
    for (j, i), v in np.ndenumerate(mask):
        other = np.argwhere(mask != v)
        if len(other):
            out[j, i] = np.sqrt(((other - [j, i]) ** 2).sum(1)).min()
    return out


def test_distance_to_boundary_on_hand_made_grids():
    left = np.zeros((3, 6), bool)
    left[:, :2] = True  # converged in the first two columns
    np.testing.assert_array_equal(distance_to_boundary(left), np.tile([2.0, 1, 1, 2, 3, 4], (3, 1)))
    hole = np.ones((5, 5), bool)
    hole[2, 2] = False  # one diverged cell in the middle
    d = distance_to_boundary(hole)
    assert d[2, 2] == 1.0 and d[0, 0] == pytest.approx(math.sqrt(8)) and d[0, 2] == 2.0 and d[1, 1] == pytest.approx(
        math.sqrt(2))
    rng = np.random.default_rng(3)
    for shape in ((7, 9), (16, 5)):
        mask = rng.random(shape) < 0.2
        np.testing.assert_allclose(distance_to_boundary(mask), brute_distance(mask))
    assert np.isinf(distance_to_boundary(np.ones((4, 4), bool))).all()


def test_signed_distance_is_positive_inside_the_converged_region_and_negative_outside():
    rng = np.random.default_rng(5)
    mask = rng.random((9, 11)) < 0.5
    d = signed_distance(mask)
    np.testing.assert_allclose(np.abs(d), brute_distance(mask))
    assert (d[mask] >= 1).all() and (d[~mask] <= -1).all()
    assert (signed_distance(np.zeros((3, 3), bool)) == -np.inf).all()


def test_boundary_quantiles_spread_the_picks_over_the_distance_distribution():
    """A converged disc in a diverged square: distances 1 to 7 grid steps, most cells near the edge."""
    jj, ii = np.mgrid[:21, :21]
    converged = (jj - 10) ** 2 + (ii - 10) ** 2 <= 8**2
    d = signed_distance(converged)
    inside = np.sort(d[converged])
    for n in (2, 5, 12):
        picks = pick_by_distance(converged, n)
        assert len(picks) == n and len(set(picks)) == n and all(converged[j, i] for i, j in picks)
        got = sorted(float(d[j, i]) for i, j in picks)
        # each pick is the quantile k/(n-1) of all converged cells' distances: nearest and farthest included
        assert got == [inside[round(k * (len(inside) - 1) / (n - 1))] for k in range(n)]
        assert got[0] == 1.0 and got[-1] == inside[-1] >= 7
    # the median pick sits at the median distance, not at the middle of the range: quantiles, not a ruler
    median = sorted(float(d[j, i]) for i, j in pick_by_distance(converged, 5))[2]
    assert median == np.median(inside) < (inside[0] + inside[-1]) / 2
    # asking for more cells than there are converged ones takes all of them, once
    assert sorted(pick_by_distance(converged, 10_000)) == sorted(zip(*np.nonzero(converged.T), strict=True))
    assert pick_by_distance(np.zeros((4, 4), bool), 3) == []


def test_limits_per_task_default_to_the_plan():
    tasks = list(DEFAULT_TASKS)
    assert parse_limits(None, tasks) == DEFAULT_LIMITS == {
        "hellaswag": 1000, "arc_challenge": 1172, "piqa": 1838, "winogrande": 1267}
    assert parse_limits("50", tasks) == parse_limits(50, tasks) == dict.fromkeys(tasks, 50)
    assert parse_limits("hellaswag=200, piqa=100", tasks) == {**DEFAULT_LIMITS, "hellaswag": 200, "piqa": 100}
    assert parse_limits("100,piqa=50", tasks) == {**dict.fromkeys(tasks, 100), "piqa": 50}
    assert parse_limits("all", tasks) == dict.fromkeys(tasks)
    assert parse_limits(None, ["my_task", "piqa"]) == {"my_task": None, "piqa": 1838}  # a task of one's own: all
    for bad, needle in (("mmlu=5", "'mmlu' is not one of the tasks"), ("0", "'0' is not a positive"),
                        ("piqa=x", "'x' is not a positive")):
        with pytest.raises(ConfigError, match=needle):
            parse_limits(bad, tasks)
    assert parse_count("12") == 12 and parse_count("3x4") == 12
    with pytest.raises(ConfigError, match="--cells"):
        parse_count("0")


# ---------------------------------------------------------------------------------------------- spearman


def test_spearman_on_known_data():
    x = np.arange(1.0, 11.0)
    up = spearman(x, np.exp(x))  # monotone, not linear
    assert up.rho == pytest.approx(1.0) and up.n == 10
    assert up.ci_low <= up.rho <= up.ci_high
    down = spearman(x, -(x**3))
    assert down.rho == pytest.approx(-1.0) and down.ci_low <= -1.0 <= down.ci_high
    # Ties get average ranks (reference values from scipy.stats.spearmanr).
    assert rankdata(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3, 4, 5, 6], [5, 6, 7, 8, 7, 2]).rho == pytest.approx(0.028988551782622423)
    tied = spearman([0.5, 1, 1, 2, 3, 3.5, 4], [0.2, 0.1, 0.4, 0.4, 0.9, 0.5, 0.8])
    assert tied.rho == pytest.approx(0.8090909090909091)
    assert -1 <= tied.ci_low <= tied.rho <= tied.ci_high <= 1 and tied.ci_low < tied.ci_high
    assert spearman([0.5, 1, 1, 2, 3, 3.5, 4], [0.2, 0.1, 0.4, 0.4, 0.9, 0.5, 0.8]) == tied  # seeded
    assert spearman([1, 2], [3, 4]).rho is None
    assert spearman([1, 2, 3, 4], [1, 1, 1, 1]).rho is None  # constant accuracy: no correlation defined
    assert spearman([1, 2, math.nan, 4, 5], [2, 3, 9, 5, 6]).n == 4


# ---------------------------------------------------------------------------------------------- re-training


def _final_loss(model, stream, cfg: StudyConfig, tokens: int, steps: int) -> float:
    """The loss of the model's last batch, as the trainer stores it at the end of the trajectory."""
    inputs, targets = stream.batch(steps - 1, cfg.rows_per_step, cfg.seq_len)
    pos = (steps - 1) * targets.numel() + torch.arange(targets.numel()).view(targets.shape)
    valid = (pos < tokens) & (targets != -1)
    with torch.no_grad():
        return model(inputs, targets.masked_fill(~valid, -1)).item()


def test_retraining_reproduces_the_stored_trajectories(study, study_copy):
    with StudyStore.open(study) as store:
        cells = select_cells(store, 4, 4)
        stored = store.trajectories()
        rows = {(r["i"], r["j"]): r for r in store.rows()}
    got = list(retrain_cells(study, cells, device="cpu", models_per_batch=3))  # other companions than the run
    assert [r.cell.key for r in got] == [c.key for c in cells]
    assert all(r.max_rel_diff == 0.0 for r in got)  # bitwise on a CPU
    stream = Worker(CFG, "cpu", RunSettings()).data.stream
    for r in got:  # each yielded model is that cell's fine-tune: it gives the stored final loss
        row = rows[r.cell.key]
        loss = _final_loss(r.model, stream, CFG, int(r.cell.hparams["tokens"]), row["steps_done"])
        assert loss == pytest.approx(stored[r.cell.key][-1], rel=1e-5)
    # Stacks of one get a companion copy of their cell; still one model per cell, still bitwise.
    pairs = list(retrain_cells(study, cells[:2], device="cpu", models_per_batch=1))
    assert [r.cell.key for r in pairs] == [c.key for c in cells[:2]] and all(r.max_rel_diff == 0 for r in pairs)
    for a, b in zip(pairs, got[:2], strict=True):
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # A stored trajectory that re-training can't reproduce is refused, naming the cell.
    with contextlib.closing(sqlite3.connect(study_copy / "study.db")) as conn:  # closed: the edit leaves no log
        blob = np.array(stored[(1, 2)], dtype="<f8")
        blob[1] *= 1.001
        conn.execute("UPDATE cells SET trajectory=? WHERE i=1 AND j=2", (blob.tobytes(),))
        conn.commit()
    with pytest.raises(ConfigError, match=r"cell \(1, 2\).*does not reproduce"):
        list(retrain_cells(study_copy, cells, device="cpu", models_per_batch=8))


def test_plan_retraining_keepssolo_cells_alone_and_never_stacks_one(study, study_copy):
    with StudyStore.open(study) as store:
        cells = select_cells(store, 4, 4)
        assert solo_cells(store) == set()  # one batch of 16 in the fixture's run
    keys = lambda stacks: [[c.key for c in s] for s in stacks]  # noqa: E731
    assert keys(plan_retraining(cells, set(), 3)) == [
        [(0, 0), (1, 0), (0, 1)], [(1, 1), (0, 2), (1, 2)], [(0, 3), (1, 3)]]
    assert keys(plan_retraining(cells[:3], set(), 2)) == [[(0, 0), (1, 0)], [(0, 1), (0, 1)]]
    assert keys(plan_retraining(cells[:3], {(1, 0)}, 8)) == [[(1, 0)], [(0, 0), (0, 1)]]
    with sqlite3.connect(study_copy / "study.db") as conn:  # as if (1, 0) had been the last batch, alone
        conn.execute("UPDATE cells SET batch_index=7 WHERE i=1 AND j=0")
    with StudyStore.open(study_copy) as store:
        assert solo_cells(store) == {(1, 0)}


# ---------------------------------------------------------------------------------------------- end to end


@needs_lm_eval
def test_run_ood_eval_end_to_end_with_a_local_task(study, study_copy, include_path):
    assert task_manager([TASK], include_path).all_tasks == [TASK]  # built-in tasks not indexed: fast
    result = run_ood_eval(study_copy, cells="4x4", tasks=[TASK], limit=4, device="cpu", include_path=include_path,
                          models_per_batch=4, batch_size=8)
    with StudyStore.open(study_copy) as store:
        assert store.get_extra("ood") == json.loads(json.dumps(result))
        distance = distance_to_boundary(study_classes(store))
    assert result["tasks"] == [TASK] and result["criterion"] == {"criterion": "ratio"}
    assert result["limits"] == result["samples"] == {TASK: 4} and result["pick"] == "lattice"
    assert [(c["i"], c["j"]) for c in result["cells"]] == [(i, j) for j in range(4) for i in range(2)]
    for c in result["cells"]:
        assert set(c) == {"i", "j", "x", "y", "distance", "accuracy"}
        assert c["distance"] == distance[c["j"], c["i"]] == (2.0 if c["i"] == 0 else 1.0)
        assert set(c["accuracy"]) == {TASK} and c["accuracy"][TASK] * 4 in (0, 1, 2, 3, 4)
    sp = result["spearman"][TASK]
    assert set(sp) == {"rho", "ci_low", "ci_high", "n"} and sp["n"] == 8
    accs = [c["accuracy"][TASK] for c in result["cells"]]
    want = spearman([c["distance"] for c in result["cells"]], accs)
    assert sp == want.to_dict()

    # The first cell's accuracy by hand: the choice with the highest log-likelihood, over the first 4 rows.
    with StudyStore.open(study) as store:
        origin = [c for c in store.cells() if c.key == (0, 0)]
    first = next(retrain_cells(study, origin, device="cpu"))
    lm = VmapSweepLM(first.model, first.tokenizer)
    hits = []
    for row in ROWS[:4]:
        ctx = f"Question: {row['question']}\nAnswer:"
        lls = [lp for lp, _ in lm.loglikelihood([req("loglikelihood", ctx, " " + ch) for ch in row["choices"]])]
        hits.append(int(np.argmax(lls)) == row["label"])
    assert result["cells"][0]["accuracy"][TASK] == pytest.approx(np.mean(hits))


def test_without_lm_eval_a_config_error_names_the_extra(study_copy, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    monkeypatch.delitem(sys.modules, "vmap_sweep.eval.adapter", raising=False)
    with pytest.raises(ConfigError, match=r"pip install 'vmap-sweep\[eval\]'"):
        run_ood_eval(study_copy, cells="2x2", tasks=["hellaswag"], limit=2, device="cpu")
    with pytest.raises(ConfigError, match="lm-evaluation-harness"):
        import vmap_sweep.eval.adapter  # noqa: F401
    with StudyStore.open(study_copy) as store:
        assert store.get_extra("ood") is None


@pytest.mark.parametrize("option,needle", [({"rtol": -1.0}, "--rtol -1"), ({"models_per_batch": 0}, "--models-per"),
                                           ({"pick": "nearest"}, "--pick 'nearest'"),
                                           ({"limit": "piqa=3"}, "'piqa' is not one of the tasks")])
def test_bad_options_are_refused_before_any_retraining(study_copy, monkeypatch, option, needle):
    from vmap_sweep.eval import ood

    monkeypatch.setattr(ood, "retrain_cells", lambda *a, **k: pytest.fail("re-trained before checking options"))
    with pytest.raises(ConfigError, match=needle):
        run_ood_eval(study_copy, cells="2x2", tasks=["hellaswag"], device="cpu", **{"limit": 2, **option})


def test_eval_command_prints_each_cell_and_stores_the_result(study_copy, include_path):
    from cli_helpers import ok

    result = ok("eval", study_copy, "--cells", "2x2", "--tasks", TASK, "--limit", "4", "--include-path",
                include_path, "--device", "cpu", "--models-per-batch", "4")
    with StudyStore.open(study_copy) as store:
        ood = store.get_extra("ood")
    lines = result.stdout.strip().splitlines()
    cells = [f"cell ({c['i']}, {c['j']}): {TASK} {c['accuracy'][TASK]:.3f}" for c in ood["cells"]]
    # the choice first, then one line per converged cell of the 2x2 subset, the examples scored, the correlation
    assert len(cells) >= 2 and lines == [lines[0], *cells, f"examples per task: {TASK} 4", lines[-1]]
    assert lines[0].startswith(f"evaluating {len(cells)} converged cells (lattice)")
    assert lines[-1].startswith(f"{TASK}: Spearman")


def test_eval_picks_cells_by_distance_and_gives_each_task_its_own_limit(study_copy, two_tasks):
    """--pick boundary-quantiles over the fixture's converged cells (four at 1 grid step from the boundary, four
    at 2), and per-task --limit counts that reach lm-eval: it scores 2 examples of one task, 5 of the other."""
    from cli_helpers import ok

    include, other = two_tasks
    result = ok("eval", study_copy, "--pick", "boundary-quantiles", "--cells", "4", "--tasks", f"{TASK},{other}",
                "--limit", f"{TASK}=2,{other}=5", "--include-path", include, "--device", "cpu",
                "--models-per-batch", "4")
    with StudyStore.open(study_copy) as store:
        ood = store.get_extra("ood")
        d = signed_distance(study_classes(store))
    assert ood["pick"] == "boundary-quantiles" and ood["limits"] == {TASK: 2, other: 5}
    assert ood["samples"] == {TASK: 2, other: 5}  # what lm-eval reports it scored
    assert len(ood["cells"]) == 4 and sorted(c["distance"] for c in ood["cells"]) == [1.0, 1.0, 2.0, 2.0]
    assert all(c["distance"] == d[c["j"], c["i"]] for c in ood["cells"])
    for c in ood["cells"]:  # accuracies over 2 and 5 examples
        assert c["accuracy"][TASK] * 2 in (0, 1, 2) and round(c["accuracy"][other] * 5, 9) in (0, 1, 2, 3, 4, 5)
    lines = result.stdout.strip().splitlines()
    assert lines[0] == ("evaluating 4 converged cells (boundary-quantiles); distance to the boundary in grid steps: "
                        "min 1.00, quartiles 1.00 1.50 2.00, max 2.00")
    assert f"examples per task: {TASK} 2, {other} 5" in lines


def test_a_task_whose_data_cannot_load_is_refused_before_any_retraining(study_copy, include_path, monkeypatch):
    from vmap_sweep.eval import ood

    yaml = include_path / "toy.yaml"
    yaml.write_text(yaml.read_text().replace("toy.jsonl", "missing.jsonl"))
    monkeypatch.setattr(ood, "retrain_cells", lambda *a, **k: pytest.fail("re-trained before loading the tasks"))
    with pytest.raises(ConfigError, match=f"lm-eval task\\(s\\) {TASK}: can't load their data"):
        run_ood_eval(study_copy, cells="2x2", tasks=[TASK], limit=2, device="cpu", include_path=include_path)
    with StudyStore.open(study_copy) as store:
        assert store.get_extra("ood") is None
