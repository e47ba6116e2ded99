"""Re-run the README's examples and rewrite what they print into the README.

    python docs/regenerate.py              # re-run every section below, rewrite README.md's marked blocks
    python docs/regenerate.py --check      # re-run, change nothing, exit 1 if a block differs (names it)
    python docs/regenerate.py --only koch,lr-batch-plan   # some sections (names below)
    python docs/regenerate.py --slow       # also the zoom sequence (3 studies cell by cell: many minutes)

Every example runs as a user runs it: the `vmap-sweep` CLI in a subprocess, on the CPU, with the README's seeds,
in a scratch folder (``--work``, default a temporary one) whose relative paths (``demo-study``,
``studies/...``) are the ones the README shows. A block's text is what the command printed, cut to the lines the
README shows (the ``keep`` filters below), never typed by hand. The README marks each block:

    <!-- regenerate:NAME -->
    ```
    ...output...
    ```
    <!-- /regenerate:NAME -->

Sections (NAME: what runs):
  demo            `vmap-sweep demo` (tiny preset, 32 x 32, seed 42); its study is `studies/tiny-seed0` below, and
                  a copy of its database becomes tests/data/readme-demo.db, which tests/test_readme.py checks the
                  README's demo, rules and early-warning numbers against (and re-trains cells of, bitwise)
  stability8      an 8 x 8 tiny study: classify and `fractal --map stability`
  rules           `rules studies/tiny-seed0` (excerpt)
  early-warning   `early-warning studies/tiny-seed0` (excerpt)
  compare         `--seed 1` of the same study, then `compare studies/tiny-seed0 studies/tiny-seed1`
  koch            `fractal koch128.npy` on the Koch snowflake of tests/shapes.py
  lr-batch-plan   the learning-rate x batch-size `--dry-run`
  zoom (--slow)   the linear-schedule zoom sequence and its `zoom-dimension`

Not regenerated (their text is an example of a message or holds times, hashes or paths of one machine): the
resume and error transcripts, `status` provenance rows, the W&B file listing, `eval` on toy tasks, `model`'s
samples, the joint fit over three model sizes (its two other models are not made by the project), the
learning-rate x batch-size training log, and the benchmark numbers (benchmarks/RESULTS.md). The demo's time is
measured here and printed; the README states a measured time by hand.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FIXTURE = ROOT / "tests" / "data" / "readme-demo.db"
WIDTH = "250"  # rich draws tables to the terminal's width: one fixed width makes the text reproducible
TABLE = "│┃┌┐└┘├┤┬┴┼─━╇╈╉╊┏┓┗┛┡┩"


@dataclass
class Section:
    name: str
    run: Callable[[Runner], dict[str, str]]  # block name -> its new text
    slow: bool = False


class Runner:
    """Runs `vmap-sweep ...` in the scratch folder as a user would, and says what it printed."""

    def __init__(self, work: Path):
        self.work = work
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": WIDTH, "TERM": "dumb", "NO_COLOR": "1",
                    "PYTHONHASHSEED": "0"}
        self.times: dict[str, float] = {}
        self.write = True  # whether a section may write into the repository (the test fixture): not under --check

    def cli(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-c", "from vmap_sweep.cli import app; app()", *map(str, args)]
        started = time.perf_counter()
        result = subprocess.run(cmd, cwd=self.work, env=self.env, capture_output=True, text=True)
        self.times[" ".join(map(str, args))] = time.perf_counter() - started
        if ok and result.returncode != 0:
            raise SystemExit(f"vmap-sweep {' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stderr[-2000:]}")
        return result

    def python(self, code: str) -> None:
        env = {**self.env, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
        subprocess.run([sys.executable, "-c", code], cwd=self.work, env=env, check=True)


# ------------------------------------------------------------------------------------------------ filters
def is_table(line: str) -> bool:
    return any(ch in TABLE for ch in line)


def table_rows(text: str, names: tuple[str, ...]) -> list[str]:
    """The rows of a rich table whose first cell is one of ``names`` (with the header row's ``feature``)."""
    out = []
    for line in text.splitlines():
        cells = [c.strip() for c in re.split("[│┃]", line)]
        if len(cells) > 2 and cells[1] in names:
            out.append(line.rstrip())
    return out


def prose(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip() and not is_table(line)]


def redraw(lines: list[str], drop: Callable[[list[str]], bool]) -> list[str]:
    """A rich table without header (its title line, ┌ … ┘) redrawn without the rows ``drop`` picks: a dropped
    row of this machine's speed must not leave its width behind."""
    title = [line for line in lines if not is_table(line)]
    # rich pads a cell with one space each side; a cell's own leading spaces (an indented row name) stay
    rows = [[c[1:].rstrip() for c in line.rstrip().strip("│").split("│")] for line in lines if line.startswith("│")]
    rows = [r for r in rows if not drop([c.strip() for c in r])]
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    total = sum(w + 3 for w in widths) + 1
    out = [f"{t.strip():^{total}}".rstrip() for t in title]
    out.append("┌" + "┬".join("─" * (w + 2) for w in widths) + "┐")
    out += ["│ " + " │ ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " │" for r in rows]
    out.append("└" + "┴".join("─" * (w + 2) for w in widths) + "┘")
    return out


def split_table(lines: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(lines before the table's title, the title and table, lines after it)."""
    top = next(k for k, line in enumerate(lines) if line.startswith("┌"))
    end = next(k for k, line in enumerate(lines) if line.startswith("└"))
    start = top - 1 if top and lines[top - 1].strip() and not is_table(lines[top - 1]) else top
    return lines[:start], lines[start:end + 1], lines[end + 1:]


def demo_lines(stdout: str) -> list[str]:
    """What the demo prints after training, as the README shows it: the counts (not the cells per minute of
    this machine), the pictures and the dimension."""
    keep = [line.rstrip() for line in stdout.splitlines() if not re.match(r"\d{4}-\d\d-\d\dT", line)]
    before, table, after = split_table([line for line in keep if line.strip()])
    return before + redraw(table, lambda row: row[0] == "trained this run") + after


def rules_excerpt(stdout: str) -> list[str]:
    return table_rows(stdout, ("tokens_min(LR)", "tokens_all(LR)")) + [
        line for line in prose(stdout) if line.startswith(("Critical LR", "Minimum viable", "Every dataset"))
        or "repeat a smaller size" in line or "repeats a smaller size" in line]


def early_warning_excerpt(stdout: str) -> list[str]:
    return table_rows(stdout, ("feature", "loss_ratio", "grad_growth", "lr_grad")) + [
        line for line in prose(stdout) if line.startswith(("Earliest warning", "(in-sample", "No feature"))
        or "precision" in line]


def compare_excerpt(stdout: str) -> list[str]:
    lines = []
    for line in stdout.splitlines():
        if is_table(line) or line.startswith(" "):  # the per-size table and its (centred) title follow
            break
        if line.strip():
            lines.append(line.rstrip())
    return lines


# ------------------------------------------------------------------------------------------------ sections
TINY32 = ("--preset", "tiny", "--resolution", "32", "--device", "cpu", "--models-per-batch", "32", "--quiet")


def demo(r: Runner) -> dict[str, str]:
    result = r.cli("demo", "--quiet")
    seconds = r.times["demo --quiet"]
    print(f"demo: {seconds:.0f} s wall (load {os.getloadavg()[0]:.1f} at the end)", file=sys.stderr)
    (r.work / "studies").mkdir(exist_ok=True)
    shutil.copytree(r.work / "demo-study", r.work / "studies" / "tiny-seed0", dirs_exist_ok=True)
    if r.write:
        save_fixture(r.work / "demo-study" / "study.db", FIXTURE)
    return {"demo": "$ vmap-sweep demo\n" + "\n".join(demo_lines(result.stdout))}


def save_fixture(db: Path, to: Path) -> None:
    """The demo's database in one file (its WAL folded in, compacted), for tests/test_readme.py."""
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = to.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with sqlite3.connect(db) as src, sqlite3.connect(tmp) as dst:
        src.backup(dst)
    with sqlite3.connect(tmp) as dst:
        dst.execute("PRAGMA journal_mode=DELETE")
        dst.execute("VACUUM")
    os.replace(tmp, to)


def stability8(r: Runner) -> dict[str, str]:
    out = "studies/t8"
    r.cli("run", "--preset", "tiny", "--y", "tokens:256:1200:log", "--resolution", "8", "--device", "cpu",
          "--quiet", "--out", out)
    counts = r.cli("classify", out).stdout.strip()
    stab = r.cli("fractal", out, "--map", "stability", ok=False)
    text = (stab.stdout + stab.stderr).strip()
    return {"stability8": f"$ vmap-sweep classify {out}\n{counts}\n$ vmap-sweep fractal {out} --map stability\n{text}"}


def rules(r: Runner) -> dict[str, str]:
    study = needs(r, "studies/tiny-seed0")
    out = r.cli("rules", study).stdout
    return {"rules": f"$ vmap-sweep rules {study}     # excerpt\n" + "\n".join(rules_excerpt(out))}


def early_warning(r: Runner) -> dict[str, str]:
    study = needs(r, "studies/tiny-seed0")
    out = r.cli("early-warning", study).stdout
    return {"early-warning": f"$ vmap-sweep early-warning {study}     # excerpt\n"
                             + "\n".join(early_warning_excerpt(out))}


def compare(r: Runner) -> dict[str, str]:
    a = needs(r, "studies/tiny-seed0")
    b = "studies/tiny-seed1"
    r.cli("run", *TINY32, "--seed", "1", "--out", b)
    out = r.cli("compare", a, b, "--plot", "compare.png").stdout
    return {"compare": f"$ vmap-sweep compare {a} {b} --plot compare.png\n" + "\n".join(compare_excerpt(out))}


def koch(r: Runner) -> dict[str, str]:
    r.python("import numpy as np; from shapes import koch_island; "
             "np.save('koch128.npy', koch_island(128, 0.8, angle=0.3))")
    out = r.cli("fractal", "koch128.npy").stdout
    return {"koch": "$ vmap-sweep fractal koch128.npy\n" + "\n".join(
        line for line in prose(out) if not line.startswith(("box sizes", "box counts")))}


def lr_batch_plan(r: Runner) -> dict[str, str]:
    out = r.cli("run", "--preset", "tiny", "--x", "lr:1e-4:1:log", "--y", "batch_size:64:2048:log", "--set",
                "tokens=4096", "--resolution", "16x6", "--models-per-batch", "16", "--device", "cpu", "--out",
                "studies/lr-batch", "--dry-run").stdout
    before, table, after = split_table([line.rstrip() for line in out.splitlines() if line.strip()])
    # the time estimate is this machine's measured matmul speed
    return {"lr-batch-plan": "\n".join(before + redraw(table, lambda row: row[0] == "estimate") + after)}


def zoom(r: Runner) -> dict[str, str]:
    r.cli("run", "--preset", "tiny", "--schedule", "linear", "--resolution", "32", "--models-per-batch", "32",
          "--device", "cpu", "--quiet", "--out", "zoom-study")
    r.cli("zoom", "zoom-study", "--auto", "--depth", "2", "--models-per-batch", "32", "--device", "cpu", "--quiet")
    out = r.cli("zoom-dimension", "zoom-study").stdout
    return {"zoom": "\n".join(prose(out))}


def needs(r: Runner, study: str) -> str:
    if not (r.work / study / "study.db").is_file():
        raise SystemExit(f"{study}: made by the demo section; run it too (or give --work with a previous run's folder)")
    return study


SECTIONS = [Section("demo", demo), Section("stability8", stability8), Section("rules", rules),
            Section("early-warning", early_warning), Section("compare", compare), Section("koch", koch),
            Section("lr-batch-plan", lr_batch_plan), Section("zoom", zoom, slow=True)]


# ------------------------------------------------------------------------------------------------ the README
def marked(text: str, name: str) -> re.Match:
    m = re.search(rf"(<!-- regenerate:{re.escape(name)} -->\n```[^\n]*\n)(.*?)(\n```\n<!-- /regenerate:"
                  rf"{re.escape(name)} -->)", text, flags=re.S)
    if m is None:
        raise SystemExit(f"README.md has no block marked regenerate:{name}")
    return m


def block(text: str, name: str) -> str:
    """The text of README block ``name`` (between its markers and fences)."""
    return marked(text, name).group(2)


def replace(text: str, name: str, new: str) -> str:
    m = marked(text, name)
    return text[:m.start(2)] + new.rstrip("\n") + text[m.end(2):]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs")
    p.add_argument("--only", help="comma-separated sections: " + ", ".join(s.name for s in SECTIONS))
    p.add_argument("--slow", action="store_true", help="also the slow sections (zoom)")
    p.add_argument("--work", type=Path, help="scratch folder (kept; default a temporary one, removed)")
    args = p.parse_args(argv)
    wanted = [s for s in SECTIONS if (args.only is None and (args.slow or not s.slow))
              or (args.only is not None and s.name in args.only.split(","))]
    unknown = set((args.only or "").split(",")) - {s.name for s in SECTIONS} - {""}
    if unknown:
        p.error(f"unknown sections {', '.join(sorted(unknown))}")
    work = args.work or Path(tempfile.mkdtemp(prefix="vmap-sweep-readme-"))
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(work)
    runner.write = not args.check
    for s in wanted:  # every block exists before minutes of work
        marked(README.read_text(), s.name)
    blocks: dict[str, str] = {}
    started = time.perf_counter()
    try:
        for s in wanted:
            t0 = time.perf_counter()
            blocks.update(s.run(runner))
            print(f"{s.name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"all: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    text = README.read_text()  # read now, not at the start: the README may have been edited meanwhile
    new = text
    for name, body in blocks.items():
        new = replace(new, name, body)
    if args.check:
        differ = [s.name for s in wanted if block(new, s.name) != block(text, s.name)] if new != text else []
        for name in differ:
            print(f"README block {name} differs from what its commands print now", file=sys.stderr)
        return 1 if differ else 0
    if new != text:
        README.write_text(new)
        print("README.md rewritten", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
