"""The plan author's criterion (fractal-llm src/finetune.py) as `classify --criterion last20`: trainable iff the
run stayed finite and the mean of its last 20 training losses (those taken before an update) is below the first;
and `compare` of one study under two criteria, naming what differs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cli_helpers import cli, ok
from test_rules import Rec

from vmap_sweep.analysis.classify import classify_rows
from vmap_sweep.analysis.compare import compare_studies
from vmap_sweep.analysis.study import reclassify
from vmap_sweep.analysis.view import StudyView
from vmap_sweep.errors import ConfigError
from vmap_sweep.present.prose import compare_sentences
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.axes import parse_axis_spec
from vmap_sweep.study.config import StudyConfig
from vmap_sweep.study.criterion import classify, label
from vmap_sweep.study.grid import Grid


def fractal_llm(losses: list[float]) -> bool:
    """fractal-llm's rule, as written there, on its per-step losses (before each update)."""
    stable = bool(losses) and math.isfinite(losses[-1]) and all(math.isfinite(v) for v in losses)
    first = losses[0]
    k = min(20, len(losses))
    ratio = float("inf") if first <= 0 or not math.isfinite(first) else float(np.mean(losses[-k:])) / first
    return stable and math.isfinite(ratio) and ratio < 1.0


@pytest.mark.parametrize("pre", [
    [6.76036],  # one step: its only loss is the first, never below itself
    [6.76036, 6.75982],  # two steps, the second batch's loss barely lower
    [3.0, 3.1, 3.2],  # rising
    [3.0] + [2.9] * 30,  # the window is the last 20
    [3.0] + [5.0] * 5 + [1.0] * 20,  # early bump outside the window
    [3.0] + [1.0] * 19 + [5.0],  # the whole run is in the window
])
def test_last20_is_the_plan_authors_rule_on_the_losses_before_each_update(pre):
    after = pre[-1] * 0.5  # the stored trajectory's last value: after the last update, which fractal-llm never sees
    labels, scores = classify([pre + [after]], [pre[0]], criterion="last20", steps_done=[len(pre)])
    assert (labels[0] == "converged") == fractal_llm(pre)
    assert (scores[0] < 0) == fractal_llm(pre)


def test_a_one_step_barely_moved_cell_is_converged_by_ratio_and_not_by_last20():
    """The issue's cell at lr 1e-6: one step, final loss 6.75982 against the base's 6.76036."""
    losses, base = [6.76036, 6.75982], [6.76036, 6.76036]
    ratio, _ = classify([losses], [6.76036], criterion="ratio", references=[base])
    last20, _ = classify([losses], [6.76036], criterion="last20", steps_done=[1])
    assert ratio[0] == "converged" and last20[0] == "not_converged"


def test_a_run_that_did_not_stay_finite_or_was_stopped_is_not_trainable():
    labels, scores = classify([[3.0, 1.0, float("nan")], [3.0, 1.0, 0.5], [3.0, 1.0]], [3.0] * 3,
                                   criterion="last20", unstable=[False, True, False], steps_done=[3, 2, 2])
    assert labels.tolist() == ["not_converged", "not_converged", "converged"]
    assert scores[0] == scores[1] > 0 > scores[2]
    with pytest.raises(ConfigError, match="steps_done"):
        classify([[3.0, 1.0]], [3.0], criterion="last20")


def test_a_run_labels_each_record_as_classify_recomputes_it():
    rec = Rec(losses=[3.0, 2.0, 2.9, 1.0], base_losses=[3.0] * 4, steps=3, steps_done=3)
    assert label({"criterion": "last20"}, rec)[0] == "converged"  # mean(3, 2, 2.9) < 3
    rec = Rec(losses=[3.0, 3.5, 2.9, 1.0], base_losses=[3.0] * 4, steps=3, steps_done=3)
    assert label({"criterion": "last20"}, rec)[0] == "not_converged"  # mean(3, 3.5, 2.9) > 3


X, Y = "lr:1e-6:1e-2:log", "tokens:1e3:1e5:log"


def _study(path):
    """4x4: columns at the lowest LR take one step and barely move (ratio: converged, last20: not); the highest
    LR diverges; the rest learn."""
    cfg = StudyConfig(model="tiny", data="synthetic", x=X, y=Y, resolution="4")
    grid = Grid(parse_axis_spec(X), parse_axis_spec(Y), 4, 4)
    store = StudyStore.create_or_open(path, cfg.to_dict(), grid.cells())
    results = []
    for c in grid.cells():
        if c.i == 0:
            rec = Rec(losses=[6.76036, 6.75982], base_losses=[6.76036] * 2, steps=1, steps_done=1)
        elif c.i == 3:
            rec = Rec(losses=[3.0, 9.0, 40.0], base_losses=[3.0] * 3, steps=4, steps_done=2, unstable=True,
                      unstable_step=2)
        else:
            rec = Rec(losses=[3.0, 2.2, 1.8, 1.5, 1.4], base_losses=[3.0] * 5)
        results.append((c, rec))
    store.record_batch(results, batch_index=0)
    reclassify(store)
    return store


def test_compare_one_study_across_criteria_names_the_criterion_and_the_cells(tmp_path):
    _study(tmp_path / "s").close()
    r = compare_studies(StudyView.load(tmp_path / "s"), StudyView.load(tmp_path / "s"), None, "last20")
    assert r.differs == "criterion: ratio -> last20"
    assert (r.lost, r.gained) == (4, 0)  # the one-step column
    assert "B differs from A in: criterion: ratio -> last20." in compare_sentences(r)[0]
    with StudyStore.open(tmp_path / "s") as store:
        got = classify_rows(store.rows(arrays=True), "last20")
    assert {k for k, (label, _) in got.items() if label == "converged"} == {(i, j) for i in (1, 2) for j in range(4)}
    with pytest.raises(ConfigError, match="threshold"):
        compare_studies(StudyView.load(tmp_path / "s"), StudyView.load(tmp_path / "s"), None, "threshold")


def test_cli_classifies_by_last20_and_compares_criteria(tmp_path):
    _study(tmp_path / "s").close()
    out = ok("classify", tmp_path / "s", "--criterion", "last20").output
    assert "last20" in out
    with StudyStore.open(tmp_path / "s") as store:
        assert (store.labels_array()[:, 0] == "not_converged").all()  # stored: the one-step column is not trainable
    out = ok("compare", tmp_path / "s", tmp_path / "s", "--criterion-a", "ratio").output
    assert "criterion: ratio -> last20" in out
    assert cli("compare", tmp_path / "s", tmp_path / "s", "--criterion-b", "nope").exit_code == 2


def fractal_llm_lr_mult(step_idx: int, total_steps: int, warmup_frac: float) -> float:
    """fractal-llm's schedule, as written there (final_lr_frac 0)."""
    warmup_steps = max(1, int(total_steps * warmup_frac))
    if step_idx < warmup_steps:
        return (step_idx + 1) / warmup_steps
    progress = (step_idx - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("total", [1, 2, 8, 16, 17, 25, 100, 333])
@pytest.mark.parametrize("ratio", [0.0, 0.06, 0.3])
def test_warmup_cosine_is_the_plan_authors_schedule(total, ratio):
    import torch

    from vmap_sweep.study.schedule import lr_multiplier

    ratios = torch.tensor([ratio], dtype=torch.float64)  # as the trainer and the planner hold it
    got = [float(lr_multiplier(s, torch.tensor([float(total)]), ratios, "warmup-cosine")[0])
           for s in range(total)]
    assert got == pytest.approx([fractal_llm_lr_mult(s, total, ratio) for s in range(total)], rel=1e-12, abs=1e-15)
