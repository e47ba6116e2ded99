"""What the README shows is what the code gives: the demo's numbers (its counts and dimension), and the `rules`
and `early-warning` excerpts of the same study, recomputed from the demo's stored study and compared with the
README's blocks; and that stored study is what training gives now (cells re-trained, bitwise on a CPU).

The demo itself takes minutes on a 2-core machine, too long for every test run; its study is kept by
`python docs/regenerate.py` as tests/data/readme-demo.db (the same run that writes the README's blocks). So a
change to the analysis fails here through the recomputed text, and a change to training (defaults, data layout,
arithmetic) fails through the re-trained cells: either way the fix is to run `python docs/regenerate.py`."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from vmap_sweep.errors import ConfigError
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.criterion import DISPLAY

ROOT = Path(__file__).resolve().parent.parent
FIX = "run `python docs/regenerate.py` to re-run the README's examples and rewrite its blocks"


def _regenerate():
    spec = importlib.util.spec_from_file_location("regenerate", ROOT / "docs" / "regenerate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["regenerate"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


REGEN = _regenerate()
README = REGEN.README.read_text()


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> object:
    """A scratch folder laid out as the README's commands see it: demo-study and studies/tiny-seed0."""
    if not REGEN.FIXTURE.is_file():
        pytest.fail(f"{REGEN.FIXTURE} is missing; {FIX}")
    work = tmp_path_factory.mktemp("readme")
    for folder in ("demo-study", "studies/tiny-seed0"):
        (work / folder).mkdir(parents=True)
        shutil.copyfile(REGEN.FIXTURE, work / folder / "study.db")
    return REGEN.Runner(work)


def test_the_demo_block_holds_the_stored_study_counts_and_dimension(runner):
    shown = REGEN.block(README, "demo").splitlines()
    with StudyStore.open(runner.work / "demo-study") as store:
        counts = {"cells done": f"{store.done_count()}/{store.cell_count()}",
                  **{DISPLAY.get(label, label): str(n) for label, n in store.label_counts().items()}}
    rows = {cells[1]: cells[2] for cells in (
        [c.strip() for c in line.split("│")] for line in REGEN.table_rows("\n".join(shown), tuple(counts)))}
    assert rows == counts, f"the README's demo counts {rows} are not the study's {counts}; {FIX}"
    fractal = REGEN.prose(runner.cli("fractal", "demo-study").stdout)
    at = shown.index(fractal[0]) if fractal[0] in shown else -1
    assert shown[at:at + len(fractal)] == fractal, f"the README's demo dimension is not what fractal prints; {FIX}"


@pytest.mark.parametrize("name", ["rules", "early-warning"])
def test_the_analysis_excerpts_are_what_the_commands_print(runner, name):
    section = next(s for s in REGEN.SECTIONS if s.name == name)
    assert section.run(runner)[name] == REGEN.block(README, name), f"README block {name} is stale; {FIX}"


def test_the_stored_demo_study_is_what_training_gives_now(runner):
    """Two of its longest cells, one converged and one not, re-trained alone: bitwise their stored trajectories.

    On a CPU whose float kernels round otherwise than the machine that made the study (another vector unit), even
    a one-step cell differs in its last digits and a diverging one's chaos makes anything of that: there the
    converged cells are held to 1e-3, which a change to training (defaults, data layout, arithmetic) still
    exceeds."""
    from vmap_sweep.eval.ood import retrain_cells

    folder = runner.work / "demo-study"
    with StudyStore.open(folder) as store:
        rows = {(r["i"], r["j"]): r for r in store.rows()}
        top = max(j for _, j in rows)
        row = sorted((i for i, j in rows if j == top))
        labels = {i: rows[(i, top)]["label"] for i in row}
        pick = [next(i for i in row if labels[i] == "converged"), next(i for i in row if labels[i] != "converged")]
        cells = {c.key: c for c in store.cells() if c.key in {(i, top) for i in pick} | {(pick[0], 0)}}
    one_step, longest = [cells[(pick[0], 0)]], [cells[(i, top)] for i in pick]
    try:
        same_arithmetic = next(retrain_cells(folder, one_step, "cpu", rtol=1e-3)).max_rel_diff == 0
        if same_arithmetic:
            retrained = list(retrain_cells(folder, longest, "cpu", models_per_batch=2, rtol=0.0))
            assert len(retrained) == 2 and all(r.max_rel_diff == 0 for r in retrained)
        else:
            converged = next(retrain_cells(folder, longest[:1], "cpu", rtol=1e-3))
            assert 0 < converged.max_rel_diff <= 1e-3
    except ConfigError as e:
        pytest.fail(f"{e}; {FIX}")
