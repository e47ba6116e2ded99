"""The study report: Markdown with linked pictures, one-file HTML with embedded ones, optional sections."""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from test_rules import LR_AXIS, build_study, law

import vmap_sweep.analysis
from vmap_sweep.analysis.chain import ChainDimensions, LevelDimension, PooledDimension
from vmap_sweep.analysis.rules import rules_of_thumb
from vmap_sweep.analysis.study import fractal_report
from vmap_sweep.analysis.view import StudyView
from vmap_sweep.errors import ConfigError, StoreError
from vmap_sweep.present.prose import power_law_formula, ten_x_sentence
from vmap_sweep.present.report import write_report
from vmap_sweep.store.extras import ZOOM_OF

PNG = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("## Study", "## Convergence map", "## Fractal dimension of the boundary", "## Rules of thumb")
OOD = {
    "cells": [{"i": i, "j": j, "distance": 0.1 * i, "accuracy": {"arc_easy": 0.30 + 0.01 * i, "hellaswag": 0.41}}
              for i in range(4) for j in range(3)],
    "spearman": {"arc_easy": {"rho": 0.873, "ci_low": 0.61, "ci_high": 0.95, "n": 12},
                 "hellaswag": {"rho": -0.052, "ci_low": -0.6, "ci_high": 0.5, "n": 12}},
}


@pytest.fixture
def study(tmp_path) -> Path:
    directory = tmp_path / "study"
    build_study(directory, law(3e-5, 0.5), nx=16, ny=16).close()
    return directory


def test_markdown_has_the_sections_numbers_and_linked_pictures(study, tmp_path):
    out = write_report(study, tmp_path / "out" / "report.md")
    text = out.read_text()
    for section in SECTIONS:
        assert section in text
    assert "Out-of-distribution" not in text and "Zoom levels" not in text
    box = fractal_report(study).to_dict()  # 16x16: too small a map for a number, and the report says so
    assert f"No dimension: {box['too_small']}." in text and f"D = {box['dimension']:.3f}" not in text
    r = rules_of_thumb(StudyView.load(study))
    assert power_law_formula(r.crit_fit) in text and f"D^{r.opt_fit.exponent:.3f}" in text
    assert f"allows 2x more LR: {r.ten_x.verdict}" in text
    assert f"| x axis | {LR_AXIS} |" in text and "| resolution | 16 × 16 = 256 fine-tunes |" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    names = {Path(link).stem for link in links}
    assert {"score", "final_loss", "eval_loss", "trajectories", "box_counting", "rules"} <= names
    for link in links:
        assert link.startswith("report_files/")
        assert (out.parent / link).read_bytes()[:8] == PNG
    assert len(re.findall(r"\*Figure \d+\.\*", text)) == len(links)  # every picture has a caption
    assert "data:image" not in text


def test_html_is_one_file_with_embedded_pictures(study, tmp_path):
    out = write_report(study, tmp_path / "report.html", fmt="html")
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    for section in SECTIONS:
        assert f"<h2>{section[3:]}</h2>" in text
    images = re.findall(r'<img [^>]*src="([^"]+)"', text)
    assert len(images) == 6 and all(src.startswith("data:image/png;base64,") for src in images)
    assert base64.b64decode(images[0].split(",", 1)[1])[:8] == PNG
    assert len(re.findall("<figcaption>", text)) == 6
    assert not (tmp_path / "report_files").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "report.html", "study"]
    assert fractal_report(study).to_dict()["too_small"] in text and f"<td>{LR_AXIS}</td>" in text


def fake_zoom(seen: list[Path]) -> types.ModuleType:
    """Stands in for vmap_sweep.analysis.chain: a dimension_report of its result type, one level unmeasurable."""
    fake = types.ModuleType("vmap_sweep.analysis.chain")

    def dimension_report(parent_dir):
        seen.append(Path(parent_dir))
        top = LevelDimension(0, Path(parent_dir), (1e-6, 0.1, 1000, 1e6), 1.0, 1.0, 1.0, (16, 16),
                             dimension=1.234, stderr=0.0321, ci_low=1.1, ci_high=1.3, fit_range=(2, 4),
                             box_sizes=(1, 2, 4, 8), box_counts=(30.0, 15.0, 7.0, 3.0))
        zoomed = LevelDimension(1, Path("zoom-1"), (1e-5, 1e-4, 1e4, 1e5), 0.25, 0.25, 0.25, (16, 16),
                                error="one class only")
        pooled = PooledDimension("pooled", dimension=1.2468, stderr=0.0123, ci_low=1.22, ci_high=1.27, n_points=3,
                                 size_range=(2.0, 4.0), levels=(0,), method="pooled")
        return ChainDimensions((top, zoomed), pooled)

    fake.dimension_report = dimension_report
    return fake


def test_ood_and_zoom_sections_appear_only_with_their_data(study, tmp_path, monkeypatch):
    """(Absent without them: see the Markdown test.)"""
    from vmap_sweep.store.db import StudyStore

    with StudyStore.open(study) as store:
        store.put_extra("ood", {**OOD, "samples": {"arc_easy": 500, "hellaswag": 1000}})
        store.add_child((1e-5, 1e-4, 1e4, 1e5), "zoom-1", 1)
    seen: list[Path] = []
    monkeypatch.delattr(vmap_sweep.analysis, "chain", raising=False)
    monkeypatch.setitem(sys.modules, "vmap_sweep.analysis.chain", fake_zoom(seen))
    text = write_report(study, tmp_path / "r.md").read_text()
    assert "## Out-of-distribution skill" in text and "computed when the study was classified" not in text
    assert "| arc_easy | 0.873 | [0.610, 0.950] | 12 |" in text and "| hellaswag | -0.052 |" in text
    assert "12 fine-tunes were evaluated on 2 tasks (arc_easy 500 examples, hellaswag 1000 examples)" in text
    assert (tmp_path / "r_files" / "ood.png").is_file()
    assert seen == [study] and "## Zoom levels" in text and "no zoom analysis" not in text
    assert "| 0 | 1e-06–0.1 × 1,000–1,000,000 | 1 | 1.234 | 0.032 | [1.100, 1.300] | 2–4 |  |" in text
    assert "| 1 | 1e-05–0.0001 × 10,000–100,000 | 0.25 | n/a |" in text and "one class only |" in text
    assert "Pooled over levels 0: D = 1.247 ± 0.012, 95% CI [1.220, 1.270], 3 box counts" in text
    assert (tmp_path / "r_files" / "zoom_box_counting.png").read_bytes()[:8] == PNG

    # a malformed OOD result and no zoom module: both sections say so, the rest of the report stands
    with StudyStore.open(study) as store:
        store.put_extra("ood", {"cells": [{"i": 0}], "spearman": {"arc": {"n": 3}}})
    monkeypatch.setitem(sys.modules, "vmap_sweep.analysis.chain", None)  # import fails
    text = write_report(study, tmp_path / "bad.md").read_text()
    assert "## Out-of-distribution skill" in text and "could not be read" in text
    assert "## Zoom levels" in text and "no zoom analysis" in text and "## Rules of thumb" in text
    assert len(seen) == 1


def test_rules_section_says_why_when_the_axes_do_not_fit(tmp_path):
    directory = tmp_path / "wd"
    build_study(directory, lambda wd: 1e-3, nx=8, ny=8, y="weight_decay:0.001:0.1:log").close()
    text = write_report(directory, tmp_path / "wd.md").read_text()
    assert "## Rules of thumb" in text and "Not applicable" in text and "weight_decay" in text
    assert "## Fractal dimension of the boundary" in text and "report_files" not in text
    assert (tmp_path / "wd_files" / "score.png").is_file() and not (tmp_path / "wd_files" / "rules.png").exists()


def test_refusals(study, tmp_path):
    with pytest.raises(ConfigError, match="md or html"):
        write_report(study, tmp_path / "r.pdf", fmt="pdf")
    with pytest.raises(StoreError):
        write_report(tmp_path / "nothing", tmp_path / "r.md")
    (tmp_path / "adir").mkdir()
    with pytest.raises(ConfigError, match="folder"):
        write_report(study, tmp_path / "adir")
    half = tmp_path / "half"
    build_study(half, law(3e-5, 0.5), nx=6, ny=4, finish=False).close()
    with pytest.raises(ConfigError, match="pending"):
        write_report(half, tmp_path / "h.md")
    assert not (tmp_path / "h.md").exists()


# ----------------------------------------------------------------------------- a real tiny study


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """The tiny preset really trained at 4x4 over a range where its edge lies (~6 s with a cached base model)."""
    from helpers import run_local

    from vmap_sweep.study.config import preset

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("VMAP_SWEEP_CACHE"):
            mp.setenv("VMAP_SWEEP_CACHE", str(tmp_path_factory.mktemp("cache")))
        cfg = preset("tiny").with_overrides(resolution="4", x="lr:1e-3:3:log", y="tokens:256:1024:log")
        directory = tmp_path_factory.mktemp("tiny") / "study"
        run_local(cfg, directory, 16).close()
    torch.set_num_threads(threads)
    return directory


def test_rules_and_report_on_a_real_tiny_study(tiny_study, tmp_path):
    from vmap_sweep.store.db import StudyStore

    with StudyStore.open(tiny_study) as store:
        labels = store.labels_array()
        evals = store.grid_arrays("eval_loss")
        lrs = store.grid_arrays("x")[0]
    r = rules_of_thumb(StudyView.load(tiny_study))
    assert [row.size for row in r.sizes] == [256, 406, 645, 1024]
    assert labels.shape == (4, 4) and set(labels.ravel()) <= {"converged", "not_converged"}
    for row, lab, ev in zip(r.sizes, labels, evals, strict=True):
        conv = lab == "converged"
        assert row.n_converged == conv.sum()
        if conv.any():
            first = int(np.argmax(conv))
            after = [k for k in range(first, 4) if not conv[k]]
            assert row.lr_first_diverging == (lrs[after[0]] if after else None)
            assert row.lr_last_converging == lrs[np.flatnonzero(conv)[-1]]
            assert row.lr_opt == lrs[np.nanargmin(np.where(conv, ev, np.nan))]
    json.dumps(r.to_dict(), allow_nan=False)
    out = write_report(tiny_study, tmp_path / "tiny.html", fmt="html")
    text = out.read_text()
    assert "<h2>Rules of thumb</h2>" in text and "data:image/png;base64," in text
    assert "tiny on synthetic" in text and "4 × 4 = 16 fine-tunes" in text
    assert (power_law_formula(r.crit_fit) if r.crit_fit else "not enough sizes") in text


def test_zoom_section_with_the_real_zoom_module(tmp_path):
    """A synthetic child study registered like `vmap-sweep zoom` does; the real dimension_report reads it."""
    zoom = pytest.importorskip("vmap_sweep.analysis.chain")
    from vmap_sweep.store.db import StudyStore

    parent = tmp_path / "study"
    build_study(parent, law(3e-5, 0.5), nx=16, ny=16).close()
    window = (1e-5, 1e-3, 1e4, 1e6)
    child = build_study(parent / "zoom-1", law(3e-5, 0.5), nx=16, ny=16, x="lr:1e-5:1e-3:log",
                        y="tokens:1e4:1e6:log")
    with child:
        child.put_extra(ZOOM_OF, {"level": 1, "window": list(window), "parent": ".."})
    with StudyStore.open(parent) as store:
        store.add_child(window, "zoom-1", 1)
    rep = zoom.dimension_report(parent)
    text = write_report(parent, tmp_path / "z.md").read_text()
    assert "## Zoom levels" in text and "| 1 | 1e-05–0.001 × 10,000–1,000,000 |" in text
    for level in rep.levels:  # 16x16 levels: each named too small, none pooled into a number
        assert level.too_small in text and f"| {level.dimension:.3f} |" not in text
    assert "Pooled dimension: not measurable (every level is too small" in text


def test_the_report_follows_the_studys_own_criterion(study, tmp_path):
    from vmap_sweep.analysis.study import reclassify
    from vmap_sweep.store.db import StudyStore

    with StudyStore.open(study) as store:
        store.put_extra("ood", {**OOD, "criterion": {"criterion": "ratio"}})
    ratio = write_report(study, tmp_path / "ratio.md").read_text()
    assert "Σ 1/ratio otherwise" in ratio and "lower threshold" not in ratio
    assert "## Out-of-distribution skill" in ratio and "computed when the study was classified by" not in ratio
    with StudyStore.open(study) as store:
        reclassify(store, "threshold", converged_below=1.0)
    threshold = write_report(study, tmp_path / "threshold.md").read_text()
    assert "log(final loss / lower threshold)" in threshold and "Σ 1/ratio" not in threshold
    # the OOD result measured distances to the ratio boundary: the report says it is stale
    assert "computed when the study was classified by {'criterion': 'ratio'}" in threshold


def test_fractal_and_ten_x_wording_cannot_be_misread(tmp_path):
    """The dimension's CI is ± 1.96 standard uncertainties and the report says what they add up; each
    warning about the resolution is in it. The 10x answer shows the interval and R² it rests on."""
    study = tmp_path / "study"  # 96x96: a map large enough (2.7 octaves) to print a number
    build_study(study, law(3e-5, 0.5), nx=96, ny=96).close()
    text = write_report(study, tmp_path / "w.md").read_text()
    box = fractal_report(study).to_dict()
    assert (f"D = {box['dimension']:.3f}, 95% CI [{box['ci_low']:.3f}, {box['ci_high']:.3f}] (± 1.96 standard "
            "uncertainties: the spread of the slope over the admissible fit windows, over box-lattice placements, "
            "the small-box correction in full, the curvature of the counts (the drift of the local slopes across the "
            f"fit) and an end-effect term; standard uncertainty {box['stderr']:.3f}), fit over box sizes "
            f"{box['fit_range'][0]}–{box['fit_range'][1]} at 96×96 over {box['octaves']:.1f} octaves") in text
    for warning in box["warnings"]:
        assert f"Warning: {warning}." in text
    r = rules_of_thumb(StudyView.load(study))
    assert ten_x_sentence(r.ten_x) in text and f"R² {r.crit_fit.r2:.2f}" in text
