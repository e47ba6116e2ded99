"""Refinement: nested grids trained only where the coarse neighbourhood holds both classes.

The plan's rule against the cell-by-cell definition on random maps; and on the tiny preset, a coarse study refined
two levels against the full grid trained directly: every stored cell of the refined study bit for bit the full
grid's, every new cell whose coarse neighbourhood was mixed trained, a kill mid-level resumed to the same result.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from cli_helpers import cli
from helpers import StopsAfterOneBatch, local_backend, run_local

from vmap_sweep.analysis.refined import refined_map
from vmap_sweep.analysis.study import fractal_report
from vmap_sweep.errors import ConfigError
from vmap_sweep.present.tables import refined_lines
from vmap_sweep.run.refine import REFINE, level_dir, refine_study, study_map
from vmap_sweep.store.db import RESULT_COLUMNS, StudyStore
from vmap_sweep.study.config import StudyConfig, preset
from vmap_sweep.study.criterion import label as label_record
from vmap_sweep.study.plan import build_grid
from vmap_sweep.study.refine import (
    UNKNOWN,
    level_points,
    neighbourhood_mixed,
    plan_level,
    simulate,
    trace_targets,
)

# ------------------------------------------------------------------------------------------------ the rule


@pytest.mark.parametrize("margin", [0, 1, 2])
def test_every_new_cell_with_a_mixed_neighbourhood_is_a_target_and_no_other(margin):
    rng = np.random.default_rng(margin)
    for _ in range(60):
        ny, nx = (int(v) for v in rng.integers(2, 9, 2))
        coarse = (rng.random((ny, nx)) < rng.random()).astype(np.int64) + (rng.random((ny, nx)) < 0.1)
        plan = plan_level(coarse, margin)
        assert plan.codes.shape == (2 * ny - 1, 2 * nx - 1)
        assert np.array_equal(plan.codes[::2, ::2], coarse)  # nested: every coarse cell stays a cell
        for fj in range(2 * ny - 1):
            for fi in range(2 * nx - 1):
                if fi % 2 == 0 and fj % 2 == 0:
                    assert not plan.targets[fj, fi]
                    continue
                mixed = neighbourhood_mixed(coarse, fi, fj, margin)
                assert plan.targets[fj, fi] == mixed, (fi, fj)
                assert (plan.codes[fj, fi] == UNKNOWN) == mixed
                if not mixed:  # inferred: the one class its neighbourhood holds
                    assert plan.codes[fj, fi] == coarse[min(fj // 2, ny - 1), min(fi // 2, nx - 1)]


def test_a_margin_sees_a_boundary_that_the_square_s_corners_miss():
    coarse = np.zeros((5, 5), dtype=np.int64)
    coarse[2, 4] = 1  # a crossing one coarse cell to the right of the square (2..3, 1..2)
    assert not plan_level(coarse, 0).targets[3, 5]
    assert plan_level(coarse, 1).targets[3, 5]


def test_a_margin_wider_than_the_map_sees_the_whole_map_and_allocates_no_more(studies):
    codes = np.random.default_rng(3).integers(0, 2, size=(5, 7))
    whole = plan_level(codes, 7)
    huge = plan_level(codes, 10**12)  # a pad of 10**12 cells would exhaust memory
    assert np.array_equal(huge.codes, whole.codes) and np.array_equal(huge.targets, whole.targets)
    root, _, _ = studies
    for dry in ([], ["--dry-run"]):
        out = cli("refine", str(root / "coarse"), "--levels", "3", "--margin", "5", *dry)
        assert out.exit_code == 2 and "--margin 5: at most 4 for" in out.output, out.output
    assert not level_dir(root / "coarse", 3).exists()


def test_levels_double_the_points_per_axis():
    assert [level_points(128, k) for k in range(4)] == [128, 255, 509, 1017]


def test_simulation_of_a_straight_edge_trains_a_band_and_infers_the_rest_exactly():
    truth = np.zeros((33, 33), dtype=np.int64)
    truth[:, 17:] = 1
    levels = simulate(truth, 2, margin=1)
    finest = levels[-1]
    assert np.array_equal(finest["codes"], truth)  # a smooth edge: nothing inferred wrongly
    assert finest["inferred"] > 0 and 0 < finest["trained"] < finest["inferred"]


def test_a_map_with_unknown_cells_is_refused():
    with pytest.raises(ConfigError, match="unknown class"):
        plan_level(np.array([[0, -1], [1, 1]]))


# ------------------------------------------------------------------------------------------------ on the tiny preset
# 5 x 5 -> 9 x 9 -> 17 x 17; budgets of 1-4 steps, several of which hold the same answer tokens (repeats)
CFG = preset("tiny").with_overrides(resolution="5", y="tokens:256:1024:log", eval_tokens=256)


@pytest.fixture(scope="module")
def studies(tmp_path_factory, shared_model_cache):
    root = tmp_path_factory.mktemp("refine")
    backend = local_backend(CFG)
    run_local(CFG, root / "coarse", models_per_batch=2, backend=backend).close()
    # level 1 killed after its first batch, then resumed; then a second level added
    stops = StopsAfterOneBatch(CFG, backend.settings)
    with pytest.raises(KeyboardInterrupt):
        refine_study(root / "coarse", stops, 1, models_per_batch=2, labeller=label_record)
    first = refine_study(root / "coarse", backend, 1, models_per_batch=2, labeller=label_record)
    levels = refine_study(root / "coarse", backend, 2, models_per_batch=2, labeller=label_record)
    full = CFG.with_overrides(resolution="17")
    run_local(full, root / "full", models_per_batch=8, backend=backend).close()
    return root, first, levels


def _results(folder):
    with StudyStore.open(folder) as store:
        return {(r["i"], r["j"]): r for r in store.rows(arrays=True) if r["status"] == "done"}


def _same_records(stored: dict, full: dict, evaluated: bool) -> None:
    """Every stored cell bitwise the full grid's; its eval loss too where it has one (`evaluated`: every cell)."""
    for key, row in stored.items():
        for col in (*RESULT_COLUMNS, "label", "score"):
            a, b = row[col], full[key][col]
            if isinstance(a, np.ndarray):
                assert a.tobytes() == b.tobytes(), (key, col)
            elif col == "eval_loss" and not evaluated and a != a:
                continue
            else:
                assert a == b or (a != a and b != b), (key, col, a, b)


def test_refined_cells_are_bitwise_the_full_grid_s(studies):
    root, _, _ = studies
    refined, full = _results(level_dir(root / "coarse", 2)), _results(root / "full")
    assert len(refined) < len(full) == 17 * 17
    _same_records(refined, full, evaluated=False)


def test_a_begun_level_goes_on_as_it_began(studies, tmp_path):
    """A level killed before it finished is not in the study's record yet: its own config says how it began."""
    import shutil
    import sqlite3

    from vmap_sweep.store.db import DB_NAME

    root, _, _ = studies
    copy = shutil.copytree(root / "coarse", tmp_path / "coarse")
    with sqlite3.connect(copy / DB_NAME) as con:  # as if level 1 were still training: no level recorded
        con.execute("DELETE FROM extra WHERE key = ?", (REFINE,))
    before = (copy / DB_NAME).read_bytes()
    with pytest.raises(ConfigError, match="without --eval \\(its level 1 began so\\)"):
        refine_study(copy, local_backend(CFG), 1, labeller=label_record, evaluate=True)
    assert (copy / DB_NAME).read_bytes() == before


def test_a_level_takes_no_eval_pass_unless_asked(studies):
    """Classes never read the eval loss: a level's own cells have none; the cells copied from the 5 x 5 study keep
    theirs (and the traced refinement below, with evaluate=True, checks every eval loss bitwise)."""
    root, _, _ = studies
    refined = _results(level_dir(root / "coarse", 2))
    coarse = {k: r for k, r in refined.items() if k[0] % 4 == 0 and k[1] % 4 == 0}
    assert coarse and all(r["eval_loss"] == r["eval_loss"] for r in coarse.values())
    assert any(r["eval_loss"] != r["eval_loss"] for r in refined.values())
    with StudyStore.open(level_dir(root / "coarse", 2)) as store:
        assert store.config["eval_tokens"] == 0
    with pytest.raises(ConfigError, match="without --eval"):
        refine_study(root / "coarse", local_backend(CFG), 3, labeller=label_record, evaluate=True)


def test_no_level_skips_a_mixed_neighbourhood(studies):
    root, _, _ = studies
    with StudyStore.open(root / "coarse") as store:
        coarse = study_map(store).labels
    for level in (1, 2):
        with StudyStore.open(level_dir(root / "coarse", level)) as store:
            done = {(c.i, c.j) for c in store.cells()} - {c.key for c in store.pending()}
            names = sorted(set(coarse.reshape(-1).tolist()))
            codes = np.vectorize(names.index)(coarse)
            for fj in range(2 * coarse.shape[0] - 1):
                for fi in range(2 * coarse.shape[1] - 1):
                    if neighbourhood_mixed(codes, fi, fj, 1):
                        assert (fi, fj) in done, (level, fi, fj)
            fine = study_map(store)
        assert fine.inferred.any() and (~fine.inferred).any()
        coarse = fine.labels


def test_repeated_budgets_are_copied_not_trained_and_every_level_records_its_cost(studies):
    root, first, levels = studies
    assert first == levels[:1]  # the resumed level 1 is the one level 2 built on
    assert [e["level"] for e in levels] == [1, 2]
    assert sum(e["repeats"] for e in levels) > 0  # 256, 305 and 362 tokens hold the same answer tokens
    for e in levels:
        # each target is trained or copies the experiment it repeats; a repeated experiment off the boundary is
        # trained for it, and counted apart
        assert e["trained"] - e["off_boundary"] + e["repeats"] == e["targets"] > 0
        assert e["trunks"] > 0 and e["model_steps"] > 0
    with StudyStore.open(root / "coarse") as store:
        assert store.get_extra(REFINE)["levels"] == levels


def test_refining_again_trains_nothing(studies):
    root, _, levels = studies
    before = _results(level_dir(root / "coarse", 2))
    again = refine_study(root / "coarse", local_backend(CFG), 2, labeller=label_record)
    assert again == levels and _results(level_dir(root / "coarse", 2)).keys() == before.keys()


def test_fractal_measures_the_finest_level_and_says_what_it_gained(studies):
    root, _, _ = studies
    report = fractal_report(root / "coarse").to_dict()
    assert report["resolution"] == [17, 17]
    r = report["refined"]
    assert r["level"] == 2 and r["coarse"]["resolution"] == [5, 5] and 0 < r["inferred_share"] < 1
    # 5x5 and 17x17 maps are both too small for a number: nothing gained is claimed, level 0 shows no D
    assert report["too_small"] and r["coarse"]["too_small"]
    assert r["octaves_gained"] is None and r["interval_narrowing"] is None
    assert refined_lines(report)[1] == "level 0 at 5×5: no dimension, too small a map to measure"
    assert refined_map(root / "coarse", 1).map.labels.shape == (9, 9)
    # a level's folder is measured as that level of its study, its inferred cells with their class
    for level in (1, 2):
        a, b = fractal_report(level_dir(root / "coarse", level)), fractal_report(root / "coarse", level=level)
        assert json.dumps(a.to_dict(), default=str) == json.dumps(b.to_dict(), default=str)


def test_fractal_lines_claim_a_gain_only_between_two_measured_maps():
    coarse = {"dimension": 1.2, "ci_low": 1.0, "ci_high": 1.4, "octaves": 2.6, "resolution": [128, 128],
              "too_small": None}
    refined = {"level": 3, "folder": "level-3", "trained_cells": 10, "cells": 100, "inferred_share": 0.9,
               "coarse": coarse, "octaves_gained": 3.0, "interval_narrowing": 2.5}
    lines = refined_lines({"refined": refined})
    assert lines[1].endswith("over 2.6 octaves; refinement gained 3.0 octaves and an interval 2.50× as narrow")
    refined |= {"octaves_gained": None, "interval_narrowing": None}  # the finest level too small for a number
    assert refined_lines({"refined": refined})[1].endswith("D = 1.200, 95% CI [1.000, 1.400] over 2.6 octaves")


def test_cli_status_dry_run_fractal_and_export_show_the_levels(studies):
    root, _, _ = studies
    status = cli("status", str(root / "coarse"))
    assert status.exit_code == 0 and "refine level 2" in status.output
    plan = cli("refine", str(root / "coarse"), "--levels", "3", "--dry-run")
    assert plan.exit_code == 0, plan.output
    assert "level 2 (done): 17×17" in plan.output and "level 3 (exact): 33×33" in plan.output
    # a finished level counts the inferred cells of its whole grid, a planned one its new cells
    assert " of its 289 cells inferred" in plan.output
    assert " new cells inferred" in plan.output
    fractal = cli("fractal", str(root / "coarse"))
    assert fractal.exit_code == 0 and "refined study: measured on level 2" in fractal.output
    out = root / "cells.csv"
    exported = cli("export", str(root / "coarse"), "--level", "2", "-o", str(out))
    assert exported.exit_code == 0, exported.output
    text = out.read_text()
    assert ",inferred," in text and ",done," in text
    bad = cli("refine", str(root / "coarse"), "--levels", "0")
    assert bad.exit_code == 2 and "--levels 0" in bad.output
    own = cli("fractal", str(root / "coarse"), "--level", "0")
    assert own.exit_code == 0 and "at 5×5" in own.output and "refined study" not in own.output
    missing = cli("export", str(root / "coarse"), "--level", "4")
    assert missing.exit_code == 2 and "level 4 is not refined" in missing.output
    assert "--levels 4` adds it" in missing.output
    past = cli("export", str(root / "coarse"), "--level", "7")  # no refine command could add it
    assert past.exit_code == 2 and "a refinement has at most 6 levels" in past.output
    assert "--levels 7" not in past.output
    plain = cli("fractal", str(root / "full"), "--level", "1")
    assert plain.exit_code == 2 and "not a refined study" in plain.output


def test_compare_matches_a_refined_study_s_finest_level_cell_for_cell_with_the_full_grid(studies):
    """The refined study (5² -> 17²) against the 17² grid trained directly: every cell matched, the inferred ones
    by their inferred class; what changed class is exactly where the two maps differ."""
    from vmap_sweep.analysis.compare import compare_studies
    from vmap_sweep.analysis.refined import study_view
    from vmap_sweep.analysis.view import StudyView

    root, _, _ = studies
    refined, full = study_view(root / "coarse"), StudyView.load(root / "full")
    assert (refined.nx, refined.ny, refined.refinement_level) == (17, 17, 2) and refined.inferred.any()
    mine = refined_map(root / "coarse").map.labels == "converged"
    theirs = full.labels == "converged"
    result = compare_studies(refined, full)
    assert result.resolution == (17, 17)
    assert (result.gained, result.lost) == (int((~mine & theirs).sum()), int((mine & ~theirs).sum()))
    assert result.converged_share_a == pytest.approx(mine.mean())
    assert any(n.startswith(f"A is level 2 of a refined study (17x17): {int(refined.inferred.sum()):,} of its 289")
               for n in result.notes)
    with pytest.raises(ConfigError, match="inferred cells have no trajectory"):
        compare_studies(refined, full, criterion_a="last20")
    shown = cli("compare", str(root / "coarse"), str(root / "full"))
    assert shown.exit_code == 0 and "A is level 2 of a refined study" in shown.output, shown.output
    plain = StudyView.load(root / "coarse")  # the study's own 5² grid, as before refining
    assert study_view(root / "full").inferred is None and plain.nx == 5
    # a level's folder is that level of its study; one of another resolution is told which refinement matches
    level1 = study_view(level_dir(root / "coarse", 1))
    assert (level1.nx, level1.refinement_level) == (9, 1) and level1.inferred.any()
    with pytest.raises(ConfigError, match=r"give .*coarse/refine-2, the level of .*coarse at 17x17"):
        compare_studies(level1, full)  # that level is refined already
    import shutil

    bare = shutil.copytree(root / "coarse", root / "bare", ignore=shutil.ignore_patterns("refine-2"))
    with pytest.raises(ConfigError, match=r"refine .*bare to 17x17 \(`vmap-sweep refine .*bare --levels 2`\)"):
        compare_studies(study_view(level_dir(bare, 1)), full)
    shutil.rmtree(bare)
    assert "eval_tokens" not in compare_studies(refined, full).differs  # a level takes no eval pass by design


def test_plot_draws_the_finest_level_with_inferred_cells_apart(studies):
    root, _, _ = studies
    drawn = cli("plot", str(root / "coarse"), "--out", str(root / "plots"))
    assert drawn.exit_code == 0, drawn.output
    assert (root / "plots" / "refined.png").stat().st_size > 0
    from vmap_sweep.present.plots import REFINED_CLASSES, refined_figure

    fig = refined_figure(refined_map(root / "coarse"))
    ticks = [t.get_text().replace("\n", " ") for t in fig.axes[-1].get_yticklabels()]
    assert ticks == list(REFINED_CLASSES)


def test_one_writer_a_refinement_beside_a_run_is_refused(studies):
    from vmap_sweep.errors import StoreError

    root, _, _ = studies
    with StudyStore.open(root / "coarse") as holder:
        holder.claim_writer()
        with pytest.raises(StoreError, match="is being trained by"):
            refine_study(root / "coarse", local_backend(CFG), 3, labeller=label_record)
    assert not level_dir(root / "coarse", 3).exists()  # refused before anything was written


def _refined_copy(studies, tmp_path):
    import shutil

    root, _, _ = studies
    return shutil.copytree(root / "coarse", tmp_path / "coarse")


def test_classify_keeps_the_criterion_a_study_was_refined_under(studies, tmp_path):
    """The levels' inferred cells took the classes of the criterion they were refined under: another would leave
    them behind, so it is refused and nothing changes; the same criterion still classifies."""
    from helpers import snapshot

    from vmap_sweep.store import extras

    top = _refined_copy(studies, tmp_path)
    before = snapshot(top)
    other = cli("classify", str(top), "--criterion", "threshold", "--converged-below", "3")
    assert other.exit_code == 2 and len(other.output.strip().splitlines()) == 1
    assert "was refined under `--criterion ratio`" in other.output and "refine-*" in other.output
    assert snapshot(top) == before
    assert cli("classify", str(top)).exit_code == 0
    # a record made before it named its criterion, and a first level still training (no record): the levels' own
    with StudyStore.open(top) as store:
        record = store.get_extra(REFINE)
        store.put_extra(REFINE, {k: v for k, v in record.items() if k != "criterion"})
    assert cli("classify", str(top), "--criterion", "last20").exit_code == 2
    with StudyStore.open(top) as store:
        store.put_extra(REFINE, {})
    import shutil

    shutil.rmtree(level_dir(top, 2))
    with StudyStore.open(level_dir(top, 1)) as store:
        extras.put_criterion(store, {"criterion": "ratio"})
    refused = cli("classify", str(top), "--criterion", "last20")
    assert refused.exit_code == 2 and "`--criterion ratio`" in refused.output


def test_neither_a_level_nor_the_study_db_s_path_gets_round_the_criterion(studies, tmp_path):
    from helpers import snapshot

    top = _refined_copy(studies, tmp_path)
    before = snapshot(top)
    level = cli("classify", str(level_dir(top, 2)), "--criterion", "last20")
    assert level.exit_code == 2 and "is not classified on its own" in level.output, level.output
    by_file = cli("classify", str(top / "study.db"), "--criterion", "last20")
    assert by_file.exit_code == 2 and "was refined under `--criterion ratio`" in by_file.output, by_file.output
    plan = cli("refine", str(top / "study.db"), "--levels", "2", "--dry-run")
    assert plan.exit_code == 0 and "level 2 (done)" in plan.output, plan.output
    assert snapshot(top) == before


def test_a_study_copied_without_its_levels_is_classified_as_a_plain_study(studies, tmp_path):
    import shutil

    top = _refined_copy(studies, tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(top / "study.db", copy / "study.db")
    assert cli("classify", str(copy), "--criterion", "last20").exit_code == 0
    assert "refine level" not in cli("status", str(copy)).output
    assert "refined study" not in cli("fractal", str(copy)).output
    assert cli("classify", str(top), "--criterion", "last20").exit_code == 2  # the levels are still beside it


def test_a_level_killed_while_its_database_was_made_is_made_again(studies, tmp_path):
    import shutil
    import sqlite3

    top = _refined_copy(studies, tmp_path)
    shutil.rmtree(level_dir(top, 2))
    level_dir(top, 2).mkdir()
    sqlite3.connect(level_dir(top, 2) / "study.db").execute("PRAGMA journal_mode=WAL").fetchall()  # no schema
    assert "begun" not in cli("status", str(top)).output
    plan = cli("refine", str(top), "--levels", "2", "--dry-run")
    assert plan.exit_code == 0 and "level 2 (exact): 17×17" in plan.output, plan.output
    refused = cli("classify", str(top), "--criterion", "last20")  # level 1 is still there, and rules
    assert refused.exit_code == 2 and "was refined under" in refused.output, refused.output


def test_the_refusal_names_options_that_classify_takes_as_they_are():
    from vmap_sweep.study.criterion import as_options, check

    stored = check("threshold", converged_below=3.1415926, not_converged_above=10.0000001)
    text = as_options(stored)
    assert text == "--criterion threshold --converged-below 3.1415926 --not-converged-above 10.0000001"
    words = text.split()
    assert check(words[1], converged_below=float(words[3]), not_converged_above=float(words[5])) == stored


def test_a_refinement_trains_with_the_study_s_own_settings(studies, tmp_path):
    top = _refined_copy(studies, tmp_path)
    for dry in ([], ["--dry-run"]):
        out = cli("refine", str(top), "--levels", "3", "--micro-batch-size", "1", *dry)
        assert out.exit_code == 2 and "micro_batch_size: None -> 1" in out.output, out.output
    assert not level_dir(top, 3).exists()


def test_a_damaged_criterion_in_the_refine_record_is_named(studies, tmp_path):
    top = _refined_copy(studies, tmp_path)
    with StudyStore.open(top) as store:
        store.put_extra(REFINE, {**store.get_extra(REFINE), "criterion": {"criterion": "bogus"}})
    out = cli("classify", str(top))
    assert out.exit_code == 2 and "refine record names the criterion" in out.output, out.output


def test_classify_waits_for_a_refinement_that_holds_the_study(studies, tmp_path):
    """Before its first level exists a refinement has read the criterion: a classify under another one while it
    holds the study is refused (checked inside the relabelling transaction); the same criterion, or after it, is not."""
    import shutil

    from helpers import snapshot

    from vmap_sweep.store.levels import REFINING

    root, _, _ = studies
    top = shutil.copytree(root / "full", tmp_path / "plain")
    before = snapshot(top)
    with StudyStore.open(top) as holder:
        holder.claim_writer(REFINING)
        refused = cli("classify", str(top), "--criterion", "last20")
        assert refused.exit_code == 2 and "is being refined by pid" in refused.output, refused.output
        after = snapshot(top)  # the holder's connection keeps a log beside the database: nothing was written to it
        assert after["study.db"] == before["study.db"] and not after.get("study.db-wal")
        assert cli("classify", str(top)).exit_code == 0  # the criterion it holds
        assert holder.get_extra_settled("criterion") == {"criterion": "ratio"}
    assert cli("classify", str(top), "--criterion", "last20").exit_code == 0


def test_a_dry_run_refuses_what_the_refinement_refuses(studies, tmp_path):
    from vmap_sweep.store import extras

    top = _refined_copy(studies, tmp_path)
    for args, says in ((["--device", "tpu"], "--device 'tpu'"), (["--micro-batch-size", "0"], "--micro-batch-size 0")):
        for dry in ([], ["--dry-run"]):
            out = cli("refine", str(top), "--levels", "3", *args, *dry)
            assert out.exit_code == 2 and says in out.output, (dry, out.output)
    level = cli("refine", str(level_dir(top, 1)), "--levels", "1", "--dry-run")
    assert level.exit_code == 2 and "not a zoom child or a refinement level" in level.output
    # a study whose criterion moved away from its levels' (written before classify refused it): both name the fix
    with StudyStore.open(top) as store:
        extras.put_criterion(store, {"criterion": "last20"})
    for dry in ([], ["--dry-run"]):
        out = cli("refine", str(top), "--levels", "3", *dry)
        assert out.exit_code == 2 and f"vmap-sweep classify {top} --criterion ratio" in out.output, out.output
    assert not level_dir(top, 3).exists()


def test_a_removed_level_is_named_gone_and_a_begun_one_unfinished(studies, tmp_path):
    import shutil

    from vmap_sweep.cli.render import refine_lines

    top = _refined_copy(studies, tmp_path)
    shutil.rmtree(level_dir(top, 2))
    status = cli("status", str(top))
    assert status.exit_code == 0 and "refine-2 is gone" in status.output.replace("\n", " ").replace("│", " ")
    fractal = cli("fractal", str(top))
    assert fractal.exit_code == 2 and "--levels 2` trains it again" in fractal.output
    with StudyStore.open(top) as store:  # as a killed refinement leaves it: level 2 begun, not recorded
        record = store.get_extra(REFINE)
        store.put_extra(REFINE, {**record, "levels": record["levels"][:1]})
    shutil.copytree(level_dir(studies[0] / "coarse", 2), level_dir(top, 2))
    status = cli("status", str(top))
    assert "begun, not finished" in status.output
    # a level recorded before its off-boundary cells were counted apart has them by the count's identity
    older = {k: v for k, v in studies[2][1].items() if k != "off_boundary"}
    assert refine_lines(top, [older])[0] == refine_lines(top, [studies[2][1]])[0]
    # after a refine, the levels it found finished are said to be so, beside their cost of then
    lines = refine_lines(top, studies[2], earlier={1})
    assert lines[0].startswith("level 1 (done earlier): 9×9") and lines[1].startswith("level 2: 17×17")


def test_a_dry_run_plans_a_removed_level_anew_as_the_refinement_trains_it(studies, tmp_path):
    import shutil

    top = _refined_copy(studies, tmp_path)
    shutil.rmtree(level_dir(top, 1))
    plan = cli("refine", str(top), "--levels", "2", "--dry-run")
    assert plan.exit_code == 0, plan.output
    assert "level 1 (exact): 9×9" in plan.output and "level 2 (done): 17×17" in plan.output


# ------------------------------------------------------------------------------------------------ tracing
def test_tracing_targets_are_the_untrained_corners_of_mixed_blocks():
    rng = np.random.default_rng(7)
    for _ in range(40):
        ny, nx = (int(v) for v in rng.integers(2, 9, 2))
        codes = (rng.random((ny, nx)) < 0.5).astype(np.int64) + (rng.random((ny, nx)) < 0.1)
        known = rng.random((ny, nx)) < 0.5
        got = trace_targets(codes, known)
        for j in range(ny):
            for i in range(nx):
                blocks = [codes[b:b + 2, a:a + 2] for b in (j - 1, j) for a in (i - 1, i)
                          if 0 <= b < ny - 1 and 0 <= a < nx - 1]
                mixed = any(len(np.unique(block)) > 1 for block in blocks)
                assert got[j, i] == (mixed and not known[j, i]), (i, j)


def test_tracing_follows_a_bay_the_coarse_corners_miss_and_leaves_no_mixed_block_inferred():
    truth = np.zeros((33, 33), dtype=np.int64)
    truth[:, 20:] = 1
    truth[13:16, 12:20] = 1  # a bay 3 fine cells wide between two rows of level 0's cells (every 4th row)
    plain, traced = simulate(truth, 2, margin=0)[-1], simulate(truth, 2, margin=0, trace=True)[-1]
    assert (plain["codes"] != truth).any()  # margin 0 alone misses part of the bay
    assert np.array_equal(traced["codes"], truth) and len(traced["rounds"]) > 1 and len(plain["rounds"]) == 1
    assert not trace_targets(traced["codes"], ~traced["inferred_mask"]).any()


@pytest.fixture(scope="module")
def traced(studies):
    """The coarse study refined two levels with margin 0 and tracing, killed once after a tracing round trained
    (its copies not yet made) and resumed."""
    import vmap_sweep.run.refine as refining

    root, _, _ = studies
    backend = local_backend(CFG)
    run_local(CFG, root / "coarse0", models_per_batch=2, backend=backend).close()
    calls = []
    real = refining.run_study

    def dies_after_the_first_round(*args, **kw):
        store = real(*args, **kw)
        calls.append(kw.get("only"))
        if len(calls) == 2:  # the level's targets, then the first tracing round
            store.close()
            raise KeyboardInterrupt
        return store

    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(refining, "run_study", dies_after_the_first_round)
        refine_study(root / "coarse0", backend, 2, margin=0, models_per_batch=2, labeller=label_record, trace=True,
                     evaluate=True)
    assert len(calls) == 2
    levels = refine_study(root / "coarse0", backend, 2, margin=0, models_per_batch=2, labeller=label_record,
                          trace=True, evaluate=True)
    return root, levels


def test_a_traced_refinement_is_the_rule_applied_to_the_full_grid_and_resumes_after_a_kill(traced):
    root, levels = traced
    assert any(e.get("traced") for e in levels)  # the rounds ran
    refined = refined_map(root / "coarse0")
    with StudyStore.open(root / "full") as store:
        truth = study_map(store).labels
    names = sorted(set(truth.reshape(-1).tolist()) | set(refined.map.labels.reshape(-1).tolist()))
    sim = simulate(np.vectorize(names.index)(truth), 2, margin=0, trace=True)[-1]
    assert np.array_equal(np.array(names)[sim["codes"]], refined.map.labels)
    # every cell the rule trains is stored (the engine also stores the cells whose experiment a target repeats)
    assert not (refined.map.inferred & ~sim["inferred_mask"]).any()
    _same_records(_results(level_dir(root / "coarse0", 2)), _results(root / "full"), evaluated=True)
    codes = np.vectorize(names.index)(refined.map.labels)
    assert not trace_targets(codes, ~refined.map.inferred).any()  # no inferred cell next to a mixed block


def test_a_traced_refinement_refuses_to_go_on_without_tracing(traced):
    root, _ = traced
    with pytest.raises(ConfigError, match="with --trace"):
        refine_study(root / "coarse0", local_backend(CFG), 3, margin=0, labeller=label_record, evaluate=True)


def test_a_dry_run_under_another_rule_is_refused_as_the_run_is(traced):
    from vmap_sweep.run.refine import plan_refinement

    root, _ = traced
    with pytest.raises(ConfigError, match="with --margin 0"):
        plan_refinement(root / "coarse0", 3, lambda b: dict.fromkeys(b, 0), margin=1, trace=True, evaluate=True)
    with pytest.raises(ConfigError, match="with --trace"):
        plan_refinement(root / "coarse0", 3, lambda b: dict.fromkeys(b, 0), margin=0, evaluate=True)
    with pytest.raises(ConfigError, match="with --eval"):
        plan_refinement(root / "coarse0", 3, lambda b: dict.fromkeys(b, 0), margin=0, trace=True)


@pytest.mark.parametrize("value", [[[1]], "x", [[["a", 0]]], [[[999, 999]]], {"a": 1}])
def test_damaged_tracing_rounds_are_refused_in_one_line(traced, tmp_path, value):
    import shutil

    from vmap_sweep.errors import StoreError
    from vmap_sweep.run.refine import TRACE_ROUNDS, _recorded_rounds

    root, _ = traced
    folder = shutil.copytree(level_dir(root / "coarse0", 2), tmp_path / "level")
    with StudyStore.open(folder) as store:
        grid = build_grid(StudyConfig.from_dict(store.config))
        assert _recorded_rounds(store, grid)  # the real rounds read back
        store.put_extra(TRACE_ROUNDS, value)
        with pytest.raises(StoreError, match="refine_rounds record is damaged"):
            _recorded_rounds(store, grid)


def test_ctrl_c_says_how_to_resume_and_a_begun_level_is_named_so(studies, tmp_path, monkeypatch):
    """A Ctrl-C'ed refinement says, as a run does, that every finished batch is kept and which command resumes
    it; until it has, reading that level says it was begun, not that the study is unrefined; the command given
    finishes it."""
    import shutil

    from vmap_sweep.cli.render import RichProgress

    top = _refined_copy(studies, tmp_path)
    shutil.rmtree(level_dir(top, 1))
    shutil.rmtree(level_dir(top, 2))
    with StudyStore.open(top) as store:
        store.put_extra(REFINE, None)
    real = RichProgress.batch_done

    def interrupt_after_one(self, batch, labels, elapsed):
        real(self, batch, labels, elapsed)
        raise KeyboardInterrupt

    monkeypatch.setattr(RichProgress, "batch_done", interrupt_after_one)
    out = cli("refine", str(top), "--levels", "1", "--margin", "0", "--quiet")
    monkeypatch.setattr(RichProgress, "batch_done", real)
    assert out.exit_code == 130 and "Traceback" not in out.output and "Aborted" not in out.output
    command = f"vmap-sweep refine {top} --levels 1 --margin 0"
    assert f"interrupted: every finished batch is stored; `{command}" in out.output.replace("\n", "")
    for reading in (("fractal", str(top), "--level", "1"), ("export", str(top), "--level", "1", "-o",
                                                               str(tmp_path / "level.csv"))):
        refused = cli(*reading)
        assert refused.exit_code == 2 and "level 1 was begun but is not finished" in refused.output, refused.output
        assert f"`vmap-sweep refine {top} --levels 1` finishes it" in refused.output.replace("\n", "")
    resumed = cli(*out.output.replace("\n", "").split("`")[1].split()[1:])
    assert resumed.exit_code == 0, resumed.output
    assert refined_map(top).level == 1
    # the level's note counts as inferred what its summary does (cells trained off the boundary are not)
    noted = re.search(r"note: level 1: 9x9, .* (\d+) inferred", resumed.output.replace("\n", " "))
    summed = re.search(r"(\d+) of its 81 cells inferred", resumed.output.replace("\n", " "))
    assert noted and summed and noted.group(1) == summed.group(1) != "0", resumed.output


def test_run_on_a_level_is_refused_begun_or_finished_and_the_pending_message_names_refine(studies, tmp_path):
    """A level's other cells are inferred: `run --out LEVEL` would train them all and the level would no longer be
    the refinement's. Refused by the level's own record (refine writes it as the level begins) or, for a level
    begun before that record existed, by its place in the study's folder."""
    import sqlite3

    from helpers import snapshot

    from vmap_sweep.store.db import DB_NAME
    from vmap_sweep.store.levels import REFINE_LEVEL

    top = _refined_copy(studies, tmp_path)
    level = level_dir(top, 2)
    with StudyStore.open(level) as store:
        info = store.get_extra(REFINE_LEVEL)
    assert info["complete"] is True and info["level"] == 2
    before = snapshot(top)
    for dry in ([], ["--dry-run"]):  # the dry run refuses what the run refuses
        finished = cli("run", "--out", str(level), "--device", "cpu", *dry)
        assert finished.exit_code == 2 and finished.stderr.strip().startswith(
            f"error: {level} is level 2 of the refined study {top}: refine trains only the cells that can lie on "
            "the boundary; it is finished, and its "), (dry, finished.stderr)
    assert snapshot(top) == before
    for record in ({**info, "complete": False}, None):  # begun: with the record refine now writes first, or none
        con = sqlite3.connect(level / DB_NAME)
        with con:
            con.execute("DELETE FROM extra WHERE key = ?", (REFINE_LEVEL,))
        con.close()
        if record is not None:
            with StudyStore.open(level) as store:
                store.put_extra(REFINE_LEVEL, record)
        before = snapshot(top)
        begun = cli("run", "--out", str(level), "--device", "cpu")
        assert begun.exit_code == 2 and begun.stderr.strip().endswith(
            f"`vmap-sweep refine {top} --levels 2` finishes it"), begun.stderr
        assert snapshot(top) == before
        rules = cli("rules", str(level))
        assert rules.exit_code == 2 and f"`vmap-sweep refine {top} --levels 2` finishes it" in rules.stderr
        assert "run --out" not in rules.stderr
        exported = cli("export", str(level), "-o", str(tmp_path / f"begun-{record is None}.csv"))
        assert exported.exit_code == 0, exported.stderr  # its trained cells, the others pending: as it stands
        text = (tmp_path / f"begun-{record is None}.csv").read_text()
        assert ",pending," in text and ",done," in text


def test_a_level_s_record_says_it_began_before_any_cell_trains(studies, tmp_path):
    import shutil
    import sqlite3

    from vmap_sweep.store.db import DB_NAME
    from vmap_sweep.store.levels import REFINE_LEVEL

    root, _, _ = studies
    copy = shutil.copytree(root / "coarse", tmp_path / "coarse", ignore=shutil.ignore_patterns("refine-*"))
    with sqlite3.connect(copy / DB_NAME) as con:  # the coarse study as it was before any refinement
        con.execute("DELETE FROM extra WHERE key = ?", (REFINE,))
    with pytest.raises(KeyboardInterrupt):  # killed after the level's first batch
        refine_study(copy, StopsAfterOneBatch(CFG, local_backend(CFG).settings), 1, models_per_batch=2,
                     labeller=label_record)
    with StudyStore.open(level_dir(copy, 1)) as store:
        assert store.get_extra(REFINE_LEVEL) == {"level": 1, "of": "..", "margin": 1, "complete": False}
        assert 0 < store.done_count() < store.cell_count()
