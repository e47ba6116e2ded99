"""A study's provenance as (name, value) rows, for `status` and the report: what it was trained with and on."""

from __future__ import annotations

from vmap_sweep.store import extras
from vmap_sweep.store.db import StudyStore


def provenance_rows(store: StudyStore) -> list[tuple[str, str]]:
    """Versions, GPU, Hub commits and the base weights' SHA-256; "not recorded yet" for a study whose first run
    has not loaded its model and data (the moment they are recorded)."""
    origin, settings = extras.provenance(store), extras.run_settings(store)
    if origin is None and (settings is None or settings.torch is None):
        return [("provenance", "not recorded yet (a run records it once its model and data have loaded)")]
    rows = []
    if settings is not None and settings.torch is not None:
        rows.append(("torch / CUDA", f"{settings.torch} / {settings.cuda}"))
        rows.append(("GPU", str(settings.gpu)))
    if origin is not None:
        rows.append(("vmap-sweep / Python", f"{origin['vmap_sweep']} / {origin['python']}"))
        model, data = origin["model"], origin["data"]
        rows.append(("model revision", model["revision"] or "none (not from the Hub)"))
        rows.append(("base weights sha256", model["sha256"]))
        rows.append(("data revision", data["revision"] or "none (not from the Hub)"))
    return rows
