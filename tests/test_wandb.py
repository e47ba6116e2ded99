"""Weights & Biases with the real `wandb` package in offline mode: what `run --wandb` and `plot`/`fractal`/`rules
--wandb` write under $WANDB_DIR, read back from wandb's own run files (nothing leaves the machine), and the
one-line error of a run that cannot start. One study is trained here, for every assertion."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import ok

from vmap_sweep.analysis.rules import rules_of_thumb
from vmap_sweep.analysis.study import fractal_report
from vmap_sweep.analysis.view import StudyView
from vmap_sweep.store.db import StudyStore

pytest.importorskip("wandb")  # in the test extra; optional for users

REPO = Path(__file__).resolve().parents[1]
TINY = ["run", "--preset", "tiny", "--resolution", "4", "--y", "tokens:256:1024:log", "--eval-tokens", "512",
        "--models-per-batch", "4", "--device", "cpu", "--no-share"]


class OfflineRun:
    """One offline run folder (wandb/offline-run-*/): the records of its .wandb file, a LevelDB-style log
    (32 KiB blocks of records with a 7-byte header) of wandb's protobuf Records, as history rows, summary,
    config and the run record; media (images, tables) under files/."""

    def __init__(self, folder: Path):
        from wandb.proto import wandb_internal_pb2 as pb

        self.folder = folder
        (path,) = folder.glob("run-*.wandb")
        data, pos, block, chunk, records = path.read_bytes(), 7, 32768, b"", []
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block's tail too short for a header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:
                break
            chunk += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                records.append(pb.Record.FromString(chunk))
                chunk = b""
        self.history, self.summary, self.config = [], {}, {}
        for r in records:
            kind = r.WhichOneof("record_type")
            if kind == "history":
                self.history.append(_items(r.history.item))
            elif kind == "summary":
                _merge(self.summary, _items(r.summary.update))
            elif kind in ("config", "run"):  # the config given to wandb.init comes with the run record
                _merge(self.config, _items((r.config if kind == "config" else r.run.config).update))
            if kind == "run":
                self.run = r.run

    def logged(self, key: str):
        """The value of `key` in the one history row that has it."""
        (value,) = [h[key] for h in self.history if key in h]
        return value

    def media(self, key: str) -> Path:
        """The file an image or table logged under `key` was written to."""
        return self.folder / "files" / self.logged(key)["path"]

    def table(self, key: str) -> list[dict]:
        """A logged wandb.Table as one dict per row."""
        t = json.loads(self.media(key).read_text())
        return [dict(zip(t["columns"], row, strict=True)) for row in t["data"]]


def _items(entries) -> dict:
    """{key: value}; a media item's fields come as nested keys (["maps/score", "path"]): nested dicts."""
    out: dict = {}
    for e in entries:
        keys = [e.key] if e.key else list(e.nested_key)
        d = out
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = json.loads(e.value_json)
    return out


def _merge(into: dict, update: dict) -> None:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def offline_runs(wandb_dir: Path) -> dict[str, OfflineRun]:
    """The offline runs under `wandb_dir` by job type (one per command)."""
    runs = [OfflineRun(f) for f in sorted(wandb_dir.glob("wandb/offline-run-*"))]
    by_job = {r.run.job_type: r for r in runs}
    assert len(by_job) == len(runs), [r.run.job_type for r in runs]
    return by_job


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A 4x4 study trained with --wandb-project, then `plot`, `fractal` and `rules` --wandb on it (project from
    $WANDB_PROJECT): five commands, four offline runs, read once."""
    tmp = tmp_path_factory.mktemp("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp), "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
           "WANDB_PROJECT": "from-env", "WANDB_ENTITY": "a-lab"}
    out = tmp / "study"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        ok(*TINY, "--quiet", "--wandb-project", "from-option", "--out", out)
        ok("plot", out, "--rows", "1,3", "--wandb")
        ok("fractal", out, "--plot", tmp / "box.png", "--wandb")
        ok("rules", out, "--wandb")
    import wandb

    wandb.teardown()  # what the end of a CLI process does: wandb's service writes out everything it holds
    return out, tmp, offline_runs(tmp)


def test_a_run_logs_its_config_and_every_batch_under_the_project_chosen(logged):
    out, _, runs = logged
    run = runs["run"]
    # --wandb-project overrides $WANDB_PROJECT; the entity comes from $WANDB_ENTITY through wandb itself
    assert (run.run.project, run.run.entity, run.run.display_name) == ("from-option", "a-lab", "study")
    assert {runs[j].run.project for j in ("plot", "fractal", "rules")} == {"from-env"}
    config = run.config
    assert config["model"] == "tiny" and config["resolution"] == "4" and config["y"] == "tokens:256:1024:log"
    assert config["run"]["models_per_batch"] == 4 and config["run"]["device"] == "cpu"
    assert config["run"]["share"] is False
    batches = [h for h in run.history if "cells_done" in h]
    assert [h["cells_done"] for h in batches] == [4, 8, 12, 16]
    assert [h["batch_models"] for h in batches] == [4, 4, 4, 4]
    with StudyStore.open(out) as store:
        counts = store.label_counts()
    assert {k: v for k, v in batches[-1].items() if k.startswith("class/")} == {
        f"class/{label}": n for label, n in counts.items()}
    assert batches[-1]["not_converged"] == counts.get("not_converged", 0) > 0
    assert run.summary["cells"] == run.summary["cells_done"] == run.summary["cells_trained"] == 16


def test_a_run_ends_with_maps_cells_trajectories_dimension_and_rules(logged):
    out, _, runs = logged
    run = runs["run"]
    for name in ("score", "stability", "final_loss", "eval_loss", "trajectories"):
        assert run.media(f"maps/{name}").read_bytes()[:4] == b"\x89PNG"
    # the per-cell table: every cell with its hyperparameters and results as stored
    cells = run.table("cells_table")
    with StudyStore.open(out) as store:
        stored = {(r["i"], r["j"]): r for r in store.rows()}
        rules = rules_of_thumb(StudyView.load(store))
    assert len(cells) == 16 and {(c["i"], c["j"]) for c in cells} == set(stored)
    for c in cells:
        r = stored[c["i"], c["j"]]
        assert (c["lr"], c["tokens"], c["class"], c["steps_done"]) == (
            r["hparams"]["lr"], r["hparams"]["tokens"], r["label"], r["steps_done"])
        assert c["score"] == pytest.approx(r["score"]) and c["final_loss"] == pytest.approx(r["final_loss"])
    # the trajectories of the first, middle and last row as line plots: one line per cell, its stored losses
    assert {k for h in run.history for k in h if k.startswith("trajectories/")} == {
        f"trajectories/row_{j}_table" for j in (0, 2, 3)}
    assert set(run.config["_wandb"]["visualize"]) == {f"trajectories/row_{j}" for j in (0, 2, 3)}
    with StudyStore.open(out) as store:
        losses = store.trajectories()
    points = run.table("trajectories/row_2_table")
    assert len({p["lineKey"] for p in points}) == 4
    assert sorted(p["lineVal"] for p in points) == pytest.approx(sorted(
        v for i in range(4) for v in losses[i, 2] if np.isfinite(v)))
    # a 4 x 4 map is too small for a dimension: as `fractal`, the run logs its box counts and why, and no number
    want = fractal_report(out).to_dict()
    assert want["too_small"] and run.summary["fractal/skipped"] == want["too_small"]
    assert not any(k in h for h in run.history for k in ("fractal/dimension", "fractal/ci_low"))
    assert "fractal/dimension" not in run.summary
    assert run.summary["fractal/fit_range"] == list(want["fit_range"])
    assert run.media("fractal/plot").read_bytes()[:4] == b"\x89PNG"
    # the rules: one row per dataset size with its numbers, the fits, the sentences
    sizes = run.table("rules/sizes")
    assert [s["size"] for s in sizes] == pytest.approx([r.size for r in rules.sizes])
    assert [s["lr_first_diverging"] for s in sizes] == pytest.approx([r.lr_first_diverging for r in rules.sizes])
    assert run.summary["rules/crit_exponent"] == pytest.approx(rules.crit_fit.exponent)
    assert {f["rule"] for f in run.table("rules/fits")} >= {"crit", "opt"}
    assert run.summary["rules/summary"].startswith("Critical LR")


def test_plot_fractal_and_rules_log_what_they_compute(logged):
    out, tmp, runs = logged
    plot, fractal, rules = runs["plot"], runs["fractal"], runs["rules"]
    assert plot.config["study"] == str(out) and plot.config["model"] == "tiny"
    assert {k for h in plot.history for k in h} >= {"maps/score", "maps/trajectories", "cells_table",
                                                    "trajectories/row_1_table", "trajectories/row_3_table"}
    assert not any(k.startswith(("fractal/", "rules/")) for h in plot.history for k in h)
    assert fractal.summary["fractal/skipped"] == fractal_report(out).to_dict()["too_small"]
    assert fractal.media("fractal/plot").read_bytes() == (tmp / "box.png").read_bytes()  # --plot's picture
    assert len(rules.table("rules/sizes")) == 4 and "maps/score" not in rules.summary


def test_a_measured_dimension_is_logged_with_its_interval():
    """What `fractal` measures (a map large enough for a number) is logged and summarised as it computes it."""
    from vmap_sweep.analysis.fractal import fractal_dimension
    from vmap_sweep.cli.wandb_log import log_dimension

    class Run:
        def __init__(self):
            self.history, self.summary = [], {}

        def log(self, values):
            self.history.append(values)

    yy, xx = np.mgrid[:256, :256]
    report = fractal_dimension((xx - 128) ** 2 + (yy - 128) ** 2 < 90**2).to_dict()
    assert not report.get("too_small")
    run = Run()
    log_dimension(run, report)
    for key in ("dimension", "ci_low", "ci_high", "stderr"):
        assert run.summary[f"fractal/{key}"] == run.history[0][f"fractal/{key}"] == pytest.approx(report[key])
    assert "fractal/skipped" not in run.summary and run.summary["fractal/resolution"] == list(report["resolution"])


def test_offline_runs_are_ready_for_wandb_sync(logged):
    """`wandb sync --dry-run` (no network) lists the four runs as runs it would upload."""
    _, tmp, _ = logged
    proc = subprocess.run([str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run",
                           *map(str, tmp.glob("wandb/offline-run-*"))], capture_output=True, text=True, timeout=120,
                          cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    assert "Would sync 4 run(s)" in proc.stdout + proc.stderr


def test_wandb_that_cannot_start_is_one_line_and_creates_nothing(tmp_path):
    """Online without an API key. In a process of its own: wandb keeps its first settings for the process."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(PYTHONPATH=str(REPO), WANDB_MODE="online", WANDB_DIR=str(tmp_path), HOME=str(tmp_path))
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, "-c", "from vmap_sweep.cli import app; app()", *TINY, "--quiet", "--wandb",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: --wandb")
    assert "wandb login" in proc.stderr and "WANDB_MODE=offline" in proc.stderr
    assert not out.exists()


def test_without_wandb_installed_a_command_given_wandb_names_the_extra(logged, monkeypatch):
    from cli_helpers import cli

    out = logged[0]
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    result = cli("plot", out, "--wandb", "--out", out.parent / "plots-without-wandb")
    assert result.exit_code == 2 and result.stderr.strip() == (
        "error: --wandb needs Weights & Biases: pip install 'vmap-sweep[wandb]'")
    assert not (out.parent / "plots-without-wandb").exists()  # refused before any work
    assert ok("plot", out, "--out", out.parent / "plots-without-wandb").exit_code == 0  # without --wandb: no W&B needed
