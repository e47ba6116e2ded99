"""batch_size (tokens per step) as a sweepable axis: whole rows, one batch size per stack, steps from N and the
batch size, trunks only within a batch size, and every cell's numbers those of training it alone."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from cli_helpers import cli, ok
from helpers import RandomStream, bits, tiny_model
from test_trunk import _same

from vmap_sweep.analysis.view import grid_view
from vmap_sweep.errors import ConfigError
from vmap_sweep.present.plots import axis_label, value_text
from vmap_sweep.present.report import write_report
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.axes import parse_axis_spec
from vmap_sweep.study.config import preset
from vmap_sweep.study.grid import Cell
from vmap_sweep.study.plan import build_grid, plan_study, trunks
from vmap_sweep.train.trainer import StackedTrainer, TrainConfig
from vmap_sweep.train.trunk import TrunkTrainer

# the tiny preset (64 tokens per row) over LR x batch size: 128, 256 and 512 tokens per step on 1024 tokens
LR_X_BATCH = ["run", "--preset", "tiny", "--x", "lr:1e-3:1e-1:log", "--y", "batch_size:128:512:log",
              "--set", "tokens=1000", "--resolution", "3", "--eval-tokens", "512", "--device", "cpu", "--quiet"]


def _tiny(**overrides):
    return preset("tiny").with_overrides(**{"x": "lr:1e-3:1e-1:log", "y": "batch_size:128:512:log",
                                            "resolution": "3", "fixed": {"tokens": 1000}, **overrides})


def test_batch_sizes_are_whole_rows_and_a_zoom_keeps_them():
    spec = parse_axis_spec("batch_size:100:1000:log")
    assert spec.axis.kind == "int" and spec.scale == "log"
    # geomspace 100, 316, 1000 -> rows of 64 tokens: 2, 5, 16 rows
    assert spec.values(3, 64).tolist() == [128.0, 320.0, 1024.0]
    assert spec.values(3).tolist() == [100.0, 316.0, 1000.0]  # without rows, plain integers
    grid = build_grid(_tiny(y="batch_size:64:4096:log", resolution="3x7"))
    assert grid.ys.tolist() == [64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0]
    assert all(c.hparams["batch_size"] % 64 == 0 and isinstance(c.hparams["batch_size"], int) for c in grid.cells())
    child = grid.window(1e-3, 1e-2, 100.0, 1000.0)
    assert child.ys.tolist() == [128.0, 128.0, 192.0, 320.0, 448.0, 704.0, 1024.0]  # still whole rows
    assert _tiny(y="batch_size:64:4096:log", resolution="3x7").cell_rows_per_step() == (1, 2, 4, 8, 16, 32, 64)
    assert preset("tiny").cell_rows_per_step() == (4,)


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"y": "batch_size:32:512:log"}, "whole rows of --seq-len 64 tokens; use a min >= 64"),
    ({"y": "tokens:256:1024:log", "fixed": {"batch_size": 512}}, "--set batch_size=512: a study that does not sweep"),
    ({"fixed": {}}, "no dataset size"),
])
def test_bad_batch_size_studies_are_refused(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        _tiny(**overrides).validate()


def test_a_batch_holds_one_batch_size_and_steps_follow_from_it():
    cfg = _tiny(resolution="4x3")
    cells = build_grid(cfg).cells()
    for share in (True, False):
        # 5 models per batch would fill a batch across two batch sizes if nothing stopped it
        batches = plan_study(cfg, cells, 5, share)
        assert sorted(c.key for b in batches for c in b.cells) == sorted(c.key for c in cells)
        assert [b.index for b in batches] == list(range(len(batches)))
        for b in batches:
            assert len({c.hparams["batch_size"] for c in b.cells}) == 1, b
            # ceil(1000 / batch size): 8 steps at 128 tokens per step, 4 at 256, 2 at 512
            want = [-(-1000 // c.hparams["batch_size"]) for c in b.cells]
            assert list(b.cell_steps) == want and b.steps == max(want)
        pairs = {(c.hparams["batch_size"], s) for b in batches for c, s in zip(b.cells, b.cell_steps, strict=True)}
        assert sorted(pairs) == [(128, 8), (256, 4), (512, 2)]


def test_trunks_share_only_within_a_batch_size():
    """Batch size x dataset size at one LR: one trunk per batch size, read out at every budget."""
    cfg = preset("tiny").with_overrides(x="batch_size:128:512:log", y="tokens:200:1000:log", resolution="3x4",
                                        fixed={"lr": 1e-2})
    cells = build_grid(cfg).cells()
    lanes = trunks(cells, cfg.schedule, cfg.tokens_per_step())
    assert len(lanes) == 3 and all(len({c.hparams["batch_size"] for c in lane}) == 1 for lane in lanes)
    batches = plan_study(cfg, cells, 8)
    assert len(batches) == 3 and all(len(b.stacked) == 1 for b in batches)
    for b in batches:  # the trunk runs the longest budget's steps at its own batch size
        assert b.steps == -(-1000 // b.cells[0].hparams["batch_size"])


B_ROWS, T = (1, 2, 4), 16  # batch sizes of 16, 32 and 64 tokens per step
BUDGETS = [10, 40, 64, 100]
LRS = [3e-3, 3e-2]


def _cells() -> list[Cell]:
    return [Cell(i, j, lr, n, {"lr": lr, "tokens": n, "batch_size": rows * T})
            for j, (rows, n) in enumerate((r, n) for r in B_ROWS for n in BUDGETS) for i, lr in enumerate(LRS)]


def test_every_cell_of_a_batch_size_grid_equals_it_trained_alone():
    """Stacked with companions of its batch size and read out of its trunk, a cell's record is bitwise the one
    training it alone gives; a stack of two batch sizes is refused."""
    base, stream = tiny_model(), RandomStream()
    cfg = TrainConfig(schedule="constant", rows_per_step=8, seq_len=T, divergence_ratio=3.0)  # rows from the cells
    evals = [stream.batch(1000, 2, T)]
    cells = _cells()
    lanes = trunks(cells, "constant", 8 * T)
    assert len(lanes) == len(LRS) * len(B_ROWS)
    got = {}
    for rows in B_ROWS:  # one stack per batch size, as the plan makes them
        mine = [lane for lane in lanes if lane[0].hparams["batch_size"] == rows * T]
        records = TrunkTrainer(base, [[c.hparams for c in lane] for lane in mine], cfg).run(stream, evals)
        got.update(zip([c.key for lane in mine for c in lane], records, strict=True))
    for c in cells:
        alone = TrunkTrainer.separate(base, [c.hparams], cfg).run(stream, evals)[0]
        assert alone.steps == -(-c.hparams["tokens"] // c.hparams["batch_size"])
        _same(got[c.key], alone)
    with pytest.raises(ValueError, match="a stack holds one batch size"):
        StackedTrainer(base, [cells[0].hparams, cells[-1].hparams], cfg)


def _rows_by_cell(out) -> dict:
    with StudyStore.open(out) as store:
        return {(r["i"], r["j"]): r for r in store.rows(arrays=True)}


def test_cli_runs_lr_by_batch_size_and_each_cell_equals_it_trained_alone(tmp_path):
    """The tiny preset over LR x batch size: the plan shows the batch sizes, each batch holds one, steps follow from
    N and the batch size, and every cell stored stacked equals the cell trained alone, bit for bit."""
    from vmap_sweep.run.estimate import flops_per_model_step
    from vmap_sweep.train.tiny import TINY_CONFIG

    text = re.sub(r"[│┃|]", " ", ok(*LR_X_BATCH, "--models-per-batch", "3", "--dry-run").stdout)
    assert re.search(r"tokens per step\s+128 … 512: 3 batch sizes, each batch of one", text), text
    assert re.search(r"batches\s+3 of up to 3 models", text) and re.search(r"steps per cell\s+2 … 8", text), text
    # 3 LRs at 8 steps of 128 tokens, 4 of 256, 2 of 512; each cell's eval pass a third of a 256-token step per 256
    flops = 3 * flops_per_model_step(TINY_CONFIG, 64, 8 * 128 + 4 * 256 + 2 * 512) \
        + flops_per_model_step(TINY_CONFIG, 64, 256) * 9 * 512 / 256 / 3
    assert re.search(rf"FLOPs\s+{re.escape(f'{flops:.3g}')}\s", text), text
    bad = cli(*LR_X_BATCH, "--micro-batch-size", "4", "--out", tmp_path / "never")
    assert bad.exit_code == 2 and "divisor of the batch size (2 rows per step)" in bad.stderr
    assert not (tmp_path / "never").exists()
    # micro-batches of 3 rows divide the swept 3 and 12 rows, though not the preset's unswept 4
    odd = [*LR_X_BATCH[:6], "batch_size:192:768:log", *LR_X_BATCH[7:]]
    odd[odd.index("--resolution") + 1] = "2"
    trained = ok(*odd, "--micro-batch-size", "3", "--out", tmp_path / "odd")
    assert "study stored in" in trained.stdout
    with StudyStore.open(tmp_path / "odd") as store:
        assert store.done_count() == 4

    stacked, alone = tmp_path / "stacked", tmp_path / "alone"
    ok(*LR_X_BATCH, "--models-per-batch", "3", "--out", stacked)
    ok(*LR_X_BATCH, "--models-per-batch", "1", "--out", alone)
    got, want = _rows_by_cell(stacked), _rows_by_cell(alone)
    assert len(got) == 9 and len({r["batch_index"] for r in got.values()}) == 3
    for key, w in want.items():
        g = got[key]
        batch = [r for r in got.values() if r["batch_index"] == g["batch_index"]]
        assert len(batch) == 3 and len({r["y"] for r in batch}) == 1  # a row of LRs at one batch size
        assert g["steps"] == -(-1000 // int(g["y"]))  # steps follow from N and the batch size
        for f in ("trajectory", "base_losses", "grad_norms", "lrs", "initial_loss", "final_loss", "eval_loss"):
            assert np.array_equal(bits(g[f]), bits(w[f])), (key, f)
        assert (g["steps"], g["unstable"], g["label"]) == (w["steps"], w["unstable"], w["label"])
    # the pictures name the axis with its unit, at the batch sizes the cells were trained at
    with StudyStore.open(stacked) as store:
        view = grid_view(store)
    assert view.ys.tolist() == [128.0, 256.0, 512.0] and view.y_name == "batch_size"
    assert axis_label("batch_size") == "batch size (tokens per step)"
    assert value_text("batch_size", 256.0) == "batch size = 256 tokens per step"
    # the LR rules of thumb fit LR against dataset size: they say why not here
    refused = cli("rules", stacked)
    assert refused.exit_code == 2 and "sweeps lr (x) and batch_size (y)" in refused.stderr
    report = write_report(stacked, tmp_path / "report.md").read_text()
    assert "swept on the y axis (batch_size, tokens per step), rows of 64 tokens" in report


def test_the_memory_probe_steps_the_largest_batch_size(monkeypatch):
    """A K that fits a step of the largest batch fits every batch: the probe measures that one."""
    from vmap_sweep.train import memory

    seen = []

    def fits(model, k, cfg, device):  # memory for 32 rows in all
        seen.append(cfg.rows_per_step)
        return k * cfg.rows_per_step <= 32

    monkeypatch.setattr(memory, "_fits", fits)
    cfg = TrainConfig(rows_per_step=2, seq_len=16)
    assert memory.probe_models_per_batch(tiny_model(), cfg, "cuda", limit=64) == 16 and set(seen) == {2}
    seen.clear()
    assert memory.probe_models_per_batch(tiny_model(), cfg, "cuda", limit=64, rows_per_step=(2, 8)) == 4
    assert set(seen) == {8}


def test_what_fitted_cuts_later_batches_of_the_same_batch_size_only(monkeypatch):
    from vmap_sweep.run import worker as runner
    from vmap_sweep.study.settings import RunSettings

    base, stream = tiny_model(), RandomStream()
    monkeypatch.setattr(runner, "load_study_data", lambda cfg, device: runner.StudyData(base, None, stream, []))
    worker = runner.Worker(preset("tiny").with_overrides(seq_len=16), "cpu", RunSettings())
    sizes = []
    real = runner.TrunkTrainer

    class SmallMemory(real):
        def __init__(self, model, lanes, cfg, device, base_cache=None):
            sizes.append((lanes[0][0]["batch_size"], len(lanes)))
            if len(lanes) > 2 and lanes[0][0]["batch_size"] == 64:
                raise torch.OutOfMemoryError("CUDA out of memory")
            super().__init__(model, lanes, cfg, device, base_cache)

    monkeypatch.setattr(runner, "TrunkTrainer", SmallMemory)

    def lanes(batch_size):
        return [[{"lr": lr, "tokens": 64, "batch_size": batch_size}] for lr in (1e-4, 3e-4, 1e-3, 3e-3)]

    worker.train(lanes(64))
    worker.train(lanes(16))
    worker.train(lanes(64))
    assert sizes == [(64, 4), (64, 2), (64, 2), (16, 4), (64, 2), (64, 2)]


def test_eval_retrains_each_batch_size_in_stacks_of_its_own():
    from vmap_sweep.eval.ood import plan_retraining

    cells = build_grid(_tiny()).cells()  # 3 LRs x 3 batch sizes
    stacks = plan_retraining(cells, {cells[4].key}, 2)
    assert [c.key for c in stacks[0]] == [cells[4].key]  # trained alone, re-trained alone
    assert all(len({c.hparams["batch_size"] for c in stack}) == 1 for stack in stacks)
    assert sorted(c.key for stack in stacks for c in stack) == sorted(
        [c.key for c in cells] + [cells[2].key, cells[8].key])  # a stack of one gets its copy as companion


def _trunks_directly(cells, schedule: str, tokens_per_step: int) -> list[list[tuple[int, int]]]:
    """trunks' definition, cell by cell: cells that differ only in `tokens`, the longest first, each joining the
    first trunk whose longest cell's multipliers agree with its own over its steps."""
    import json

    from vmap_sweep.study.plan import steps_for
    from vmap_sweep.study.schedule import lr_multiplier

    def mults(c):
        n = steps_for(int(c.hparams["tokens"]), int(c.hparams.get("batch_size", tokens_per_step)))
        w = torch.tensor([float(c.hparams.get("warmup_ratio", 0.0))], dtype=torch.float64)
        return [float(lr_multiplier(s, torch.tensor([float(n)]), w, schedule)) for s in range(n)]

    groups: dict[str, list] = {}
    for c in cells:
        groups.setdefault(json.dumps({k: v for k, v in c.hparams.items() if k != "tokens"}, sort_keys=True),
                          []).append(c)
    out = []
    for members in groups.values():
        lanes: list[list] = []
        for c in sorted(members, key=lambda c: -len(mults(c))):
            m = mults(c)
            lane = next((lane for lane in lanes if mults(lane[0])[:len(m)] == m), None)
            lanes.append([c]) if lane is None else lane.append(c)
        out += [sorted(lane, key=lambda c: (c.j, c.i)) for lane in lanes]
    first = {c.key: n for n, c in enumerate(cells)}
    return [[c.key for c in lane] for lane in sorted(out, key=lambda lane: min(first[c.key] for c in lane))]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "warmup-cosine"])
def test_trunks_are_their_definition_cell_by_cell(schedule):
    """trunks finds a group's lanes once per sequence of (steps, warmup) its cells have: the lanes are still those
    the definition gives each cell, across warmups, batch sizes and values of another type (1, 1.0, True)."""
    rng = np.random.default_rng(7)
    cells = []
    for i, lr in enumerate([1e-3, 1, 1.0, True]):
        for j in range(12):
            hp = {"lr": lr, "tokens": int(rng.integers(1, 200))}
            if j % 3:
                hp["warmup_ratio"] = [0.0, 0.1, 0.5][j % 3]
            if j % 5 == 4:
                hp["batch_size"] = 16
            cells.append(Cell(i, j, float(i), float(j), hp))
    cells = [cells[k] for k in rng.permutation(len(cells))]
    got = [[c.key for c in lane] for lane in trunks(cells, schedule, 8)]
    assert got == _trunks_directly(cells, schedule, 8)
    assert len(got) < len(cells)  # some cells do share a trunk
