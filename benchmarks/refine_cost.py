"""What refining a study's boundary costs, projected from a boundary's shape and measured per-step costs.

    PYTHONPATH=. python benchmarks/refine_cost.py --preset d20-docvqa --levels 3 \
        --step-seconds 0.9 --models-per-batch 8 --readout-seconds 0.35 --truth rabbit

A boundary of known shape (`--truth`) at the finest level's resolution is refined as `vmap-sweep refine` would
(study/refine.py `simulate`: the targets of each level follow from the level below, their classes are read from the
truth), and each level's trained cells are planned as the engine plans them (study/plan.py: a learning rate's new
budgets read out of one trunk, trained as far as its largest needed budget). Cost in seconds:

    model-steps x step-seconds / models-per-batch  +  read-outs x readout-seconds

step-seconds: one optimizer step of a full batch of models-per-batch trunks (the GPU's measured batch step);
readout-seconds: one cell's read-out (its branch step, final-loss forward and eval loss). The base study (every cell
of the coarse grid) is priced the same way, so the ratio is the refinement's price in base studies. Without --stand-in,
repeated budgets (free in a real refinement) are counted as trained, so the projection is an upper bound on that term.

--truth: koch (D 1.26), basilica (1.27), rabbit (1.39), quadratic (1.5), a .npy of class codes at the finest
resolution, or a refined study's folder (its finest map, resampled to nearest: below its own spacing the resampled
boundary is straight, so this undercounts the finer levels).

--stand-in counts experiments, not cells: a budget that repeats a smaller one's experiment (as many answer targets of
the synthetic document-QA set, laid out as the preset lays out its data) is copied, as a real refinement copies it;
the trained cells, trunks, model-steps and costs are then those of a real refinement of that truth. The inferred
counts stay `simulate`'s: where a repeat's experiment is neither stored nor a target, a real refinement trains it
(and knows its class), while here it stays inferred.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from vmap_sweep.study.axes import parse_resolution  # noqa: E402
from vmap_sweep.study.config import preset  # noqa: E402
from vmap_sweep.study.plan import build_grid, plan_study, same_experiments  # noqa: E402
from vmap_sweep.study.refine import DEFAULT_MARGIN, level_points, simulate  # noqa: E402


def truth_map(name: str, ny: int, nx: int) -> np.ndarray:
    """Class codes (0/1) of shape (ny, nx): a shape of known dimension, a .npy, or a refined study's finest map."""
    import shapes

    n = max(nx, ny)
    made = {"koch": lambda: shapes.koch_island(n, 0.8, angle=0.3),
            "basilica": lambda: shapes.julia_mask(n, "basilica"),
            "rabbit": lambda: shapes.julia_mask(n, "rabbit"),
            "quadratic": lambda: shapes.quadratic_koch_island(n, 0.8, angle=0.3)}
    if name in made:
        return made[name]()[:ny, :nx].astype(np.int64)
    path = Path(name)
    if path.suffix == ".npy":
        a = np.load(path, allow_pickle=False)
    else:
        from vmap_sweep.analysis.classify import converged_mask
        from vmap_sweep.analysis.refined import refined_map

        a = converged_mask(refined_map(path).map.labels)
    rows = np.rint(np.linspace(0, a.shape[0] - 1, ny)).astype(int)
    cols = np.rint(np.linspace(0, a.shape[1] - 1, nx)).astype(int)
    return np.asarray(a)[np.ix_(rows, cols)].astype(np.int64)


def repeat_rows(cfg, supervised: Mapping[int, int]) -> np.ndarray:
    """rep[j]: the grid row whose experiment row j repeats (itself if none), along a tokens y axis: the smallest
    budget holding as many supervised targets under the same learning rates (study/plan.py `same_experiments`)."""
    grid = build_grid(cfg)
    if grid.y.name != "tokens":
        raise SystemExit(f"--stand-in: the preset's y axis is {grid.y.name!r}, not tokens")
    line = [grid.cell(0, j) for j in range(grid.ny)]
    same = same_experiments(line, supervised, cfg.schedule, cfg.tokens_per_step())
    return np.array([same[c.key].j if c.key in same else c.j for c in line])


def stand_in_supervised(cfg, levels: int) -> Mapping[int, int]:
    """The supervised targets each budget of the finest grid holds, in the project's synthetic document-QA set laid
    out as the preset lays out its data (byte tokenizer; rows: one conversation per row of --seq-len positions):
    a stand-in for the real set's layout, where a budget holds a new answer target about once per row."""
    from vmap_sweep.errors import VmapSweepError
    from vmap_sweep.model.tokenizer import ByteTokenizer
    from vmap_sweep.run.worker import training_stream

    nx, ny = parse_resolution(cfg.resolution)
    fine = build_grid(cfg.with_overrides(resolution=f"{level_points(nx, levels)}x{level_points(ny, levels)}"))
    try:
        stream = training_stream(cfg.with_overrides(data="synthetic"), cfg.seq_len, ByteTokenizer())
    except VmapSweepError as e:
        raise SystemExit(f"--stand-in: the synthetic set in the preset's layout (byte tokenizer, --seq-len "
                         f"{cfg.seq_len}): {e}") from None
    return {n: size.supervised for n, size in stream.budgets(sorted({int(v) for v in fine.ys})).sizes.items()}


def project(cfg, levels: int, truth: np.ndarray, *, margin: int = DEFAULT_MARGIN, trace: bool = False,
            models_per_batch: int = 8, step_seconds: float = 1.0, readout_seconds: float = 0.0,
            level_readout_seconds: float | None = None, supervised: Mapping[int, int] | None = None) -> dict:
    """Per level (0: the base study) the cells trained, trunks, model-steps, read-outs and seconds; and totals.
    level_readout_seconds: a read-out of a refined level, which takes no eval pass (default: readout_seconds).
    supervised: the supervised targets of each budget (`stand_in_supervised`): a budget that repeats a smaller one's
    experiment is then one experiment with it, as a real refinement counts it: the truth takes the class of the
    experiment it repeats, a level trains each experiment once and copies its repeats, and the base study reads
    out one cell per experiment; every read-out priced is then an experiment. None: every cell is its own."""
    def price(model_steps: int, read_outs: int, per_read_out: float = readout_seconds) -> float:
        return model_steps * step_seconds / models_per_batch + read_outs * per_read_out

    per_level_read_out = readout_seconds if level_readout_seconds is None else level_readout_seconds

    nx, ny = parse_resolution(cfg.resolution)

    def level_cfg(level: int):
        return cfg.with_overrides(resolution=f"{level_points(nx, level)}x{level_points(ny, level)}")

    reps = [repeat_rows(level_cfg(level), supervised) if supervised is not None else None
            for level in range(levels + 1)]
    if supervised is not None:  # a repeated budget is its experiment: it has that experiment's class
        truth = truth[reps[-1]]
    grid = build_grid(cfg)
    base_cells = grid.cells() if reps[0] is None else [c for c in grid.cells() if reps[0][c.j] == c.j]
    base = plan_study(cfg, base_cells, models_per_batch)
    steps0 = sum(b.model_steps for b in base)
    rows = [{"level": 0, "grid": f"{nx}x{ny}", "trained": len(base_cells), "trunks": sum(len(b.stacked) for b in base),
             "model_steps": steps0, "read_outs": len(base_cells), "seconds": price(steps0, len(base_cells))}]
    sim = simulate(truth, levels, margin, trace)
    stored = np.ones((ny, nx), dtype=bool)  # the cells a level may copy from: every cell of the base study
    for entry in sim[1:]:
        level = entry["level"]
        fine = level_cfg(level)
        fgrid = build_grid(fine)
        below, stored = stored, np.zeros((fgrid.ny, fgrid.nx), dtype=bool)
        stored[::2, ::2] = below
        # each round of tracing trains its cells' trunks again, as far as its own largest budget
        batches, trained = [], 0
        for mask in entry["rounds"]:
            keys = {(int(i), int(j)) for j, i in zip(*np.nonzero(mask), strict=True)}
            if reps[level] is not None:  # a target that repeats an experiment is copied from it, trained if new
                keys = {(i, int(reps[level][j])) for i, j in keys if not stored[reps[level][j], i]}
                stored |= mask
            cells = [fgrid.cell(i, j) for i, j in sorted(keys, key=lambda k: (k[1], k[0]))]
            for c in cells:
                stored[c.j, c.i] = True
            trained += len(cells)
            batches += plan_study(fine, cells, models_per_batch) if cells else []
        steps = sum(b.model_steps for b in batches)
        rows.append({"level": level, "grid": f"{fgrid.nx}x{fgrid.ny}", "trained": trained,
                     "targets": int(entry["trained"]), "rounds": len(entry["rounds"]), "inferred": entry["inferred"],
                     "trunks": sum(len(b.stacked) for b in batches),
                     "model_steps": steps, "read_outs": trained,
                     "seconds": price(steps, trained, per_level_read_out)})
    total = sum(r["seconds"] for r in rows)
    finest = sim[-1]
    wrong = (finest["codes"] != truth) & finest["inferred_mask"]
    return {"levels": rows, "seconds_total": total, "times_base_study": total / rows[0]["seconds"],
            "inferred_wrong": int(wrong.sum()), "inferred": int(finest["inferred_mask"].sum()), "sim": sim,
            "truth": truth}


def dimensions(truth: np.ndarray, levels: int, sim: list[dict]) -> dict:
    """The box-counting dimension with its interval: the base grid's map, the refined map, the truth."""
    from vmap_sweep.analysis.fractal import fractal_dimension

    def one(a: np.ndarray) -> str:
        box = fractal_dimension(a.astype(bool))
        return f"{box.dimension:.3f} [{box.ci_low:.3f}, {box.ci_high:.3f}] over {box.octaves:.1f} octaves"

    step = 2 ** levels
    return {"base": one(truth[::step, ::step]), "refined": one(sim[-1]["codes"]), "truth": one(truth)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="d20-docvqa")
    p.add_argument("--resolution", default=None, help="the base study's (default: the preset's)")
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--margin", type=int, default=DEFAULT_MARGIN)
    p.add_argument("--trace", action="store_true", help="refine --trace: rounds along the boundary after each level")
    p.add_argument("--models-per-batch", type=int, default=8)
    p.add_argument("--step-seconds", type=float, required=True, help="one optimizer step of a full batch")
    p.add_argument("--readout-seconds", type=float, default=0.0, help="one cell's read-out")
    p.add_argument("--level-readout-seconds", type=float, default=None,
                   help="one read-out of a refined level, without eval pass (default: --readout-seconds)")
    p.add_argument("--truth", default="rabbit")
    p.add_argument("--stand-in", action="store_true",
                   help="count experiments, not cells: budgets that repeat a smaller one's experiment in the synthetic "
                        "set laid out as the preset's data are one experiment (the truth, the levels and the base)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--dimensions", action="store_true", help="also the dimension of the base, refined and true maps")
    a = p.parse_args()
    cfg = preset(a.preset)
    if a.resolution:
        cfg = cfg.with_overrides(resolution=a.resolution)
    nx, ny = parse_resolution(cfg.resolution)
    truth = truth_map(a.truth, level_points(ny, a.levels), level_points(nx, a.levels))
    out = project(cfg, a.levels, truth, margin=a.margin, trace=a.trace, models_per_batch=a.models_per_batch,
                  step_seconds=a.step_seconds, readout_seconds=a.readout_seconds,
                  level_readout_seconds=a.level_readout_seconds,
                  supervised=stand_in_supervised(cfg, a.levels) if a.stand_in else None)
    sim, truth = out.pop("sim"), out.pop("truth")
    if a.dimensions:
        out["dimension"] = dimensions(truth, a.levels, sim)
    if a.json:
        print(json.dumps(out, indent=2))
        return
    rule = f"margin {a.margin}" + (" traced" if a.trace else "")
    print(f"{a.preset} at {cfg.resolution}, truth {a.truth}, {rule}, {a.models_per_batch} models per batch, "
          f"{a.step_seconds} s per batch step, {a.readout_seconds} s per read-out"
          + (f" ({a.level_readout_seconds} s on a refined level)" if a.level_readout_seconds is not None else ""))
    print("level  grid        trained    trunks  model-steps  read-outs     hours")
    for r in out["levels"]:
        print(f"{r['level']:>5}  {r['grid']:<10} {r['trained']:>8,} {r['trunks']:>9,} {r['model_steps']:>12,} "
              f"{r['read_outs']:>10,} {r['seconds'] / 3600:>9.2f}")
    print(f"total {out['seconds_total'] / 3600:.2f} h = {out['times_base_study']:.2f}x the base study")
    print(f"inferred cells of the finest level whose class differs from the truth: {out['inferred_wrong']:,} of "
          f"{out['inferred']:,} ({100 * out['inferred_wrong'] / max(out['inferred'], 1):.3f}%)")
    for name, text in out.get("dimension", {}).items():
        print(f"dimension, {name}: {text}")


if __name__ == "__main__":
    main()
