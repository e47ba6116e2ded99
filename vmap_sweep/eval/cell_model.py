"""One cell's fine-tuned model, to keep: re-trained exactly as the study trained it (eval/ood.py's `retrain_cells`,
which refuses a model that does not reproduce the stored trajectory), then written twice into OUT:

  OUT/transformers/  config.json, model.safetensors, tokenizer files: `NanoChatForCausalLM.from_pretrained`
                     (not for a 2026 nanochat model: transformers' port has only the 2025 architecture)
  OUT/vmap-sweep/    the project's own format (`load_model`), with the study's tokenizer as it is
  OUT/cell.json      which study and cell, its hyperparameters, class and stored losses, the reproduction check
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vmap_sweep.analysis.jsonsafe import json_safe
from vmap_sweep.errors import ConfigError
from vmap_sweep.eval.ood import RTOL, RetrainedCell, retrain_cells
from vmap_sweep.model.checkpoint import save_model
from vmap_sweep.model.hf_format import save_hf_model
from vmap_sweep.store import extras
from vmap_sweep.store.db import StudyStore

HF_DIR, OWN_DIR, CELL_FILE = "transformers", "vmap-sweep", "cell.json"


@dataclass
class ExportedCell:
    retrained: RetrainedCell
    out: Path
    hf_files: list[str]
    info: dict


def parse_cell(spec: str) -> tuple[int, int]:
    """--cell "I,J" -> (i, j): column i along x, row j along y."""
    try:
        i, j = (int(p) for p in spec.split(","))
    except ValueError:
        raise ConfigError(f"--cell {spec!r}: give I,J, the cell's column along x and row along y, e.g. 3,5") from None
    return i, j


def export_cell(study_dir: str | Path, i: int, j: int, out: str | Path, device: str = "auto", rtol: float = RTOL,
                deterministic: bool = False) -> ExportedCell:
    """Re-train cell (i, j) of a study and write its model into `out` (see the module doc)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / CELL_FILE).is_file():
        raise ConfigError(f"{out}: exists and holds something other than an exported cell; choose a new -o folder")
    with StudyStore.open(study_dir) as store:
        cells = {c.key: c for c in store.cells()}
        if (i, j) not in cells:
            raise ConfigError(f"--cell {i},{j}: {study_dir} has cells 0..{store.nx - 1} along x and 0..{store.ny - 1} "
                              "along y")
        row = next(r for r in store.rows() if (r["i"], r["j"]) == (i, j))
        origin = extras.provenance(store)
    if row["status"] != "done":
        raise ConfigError(f"--cell {i},{j}: not trained yet in {study_dir}; resume the study first")
    retrained = next(retrain_cells(study_dir, [cells[(i, j)]], device, models_per_batch=1, rtol=rtol,
                                   deterministic=deterministic))
    cell = retrained.cell
    is_2026 = retrained.model.config.is_2026
    hf_files = [] if is_2026 else save_hf_model(out / HF_DIR, retrained.model, retrained.tokenizer)
    save_model(out / OWN_DIR, retrained.model, retrained.tokenizer)
    info = {"study": str(Path(study_dir).resolve()), "i": i, "j": j, "x": cell.x, "y": cell.y,
            "hparams": cell.hparams, "label": row["label"], "final_loss": row["final_loss"],
            "eval_loss": row["eval_loss"], "retrain_max_rel_diff": retrained.max_rel_diff,
            "base_model": origin["model"] if origin else None}
    (out / CELL_FILE).write_text(json.dumps(json_safe(info), indent=2, allow_nan=False) + "\n")
    return ExportedCell(retrained, out, hf_files, info)
