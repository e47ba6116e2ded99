"""What a study keeps beside its cells, in its `extra` table: each key read and written here, with its type.

The store itself stores any JSON under any key; this module is the one place that knows which keys a study
has and what each holds, so no other module spells a key or guesses a default.
"""

from __future__ import annotations

from typing import Any

from vmap_sweep.errors import StoreError
from vmap_sweep.store.db import CRITERION, StudyStore
from vmap_sweep.study import criterion as criterion_rules
from vmap_sweep.study.settings import RunSettings
from vmap_sweep.study.sizes import DatasetSize

RUN_SETTINGS = "runtime"  # RunSettings the study was trained with, written once its model and data loaded
DATA_DIGEST = "data_sha256"  # sha256 of a local data file as it was when the study started
ZOOM_OF = "zoom_of"  # a zoom child's own {"level", "window", "parent", "fraction"}
OOD = "ood"  # the out-of-distribution evaluation's result
DATASET_SIZES = "dataset_sizes"  # {budget: [supervised targets, conversations]}, as the data fills each budget
# how the study was started to be trained ({"models_per_batch", "share"}): a cell's result does not depend on
# them, but `run --out DIR` alone resumes with them
RUN_OPTIONS = "run_options"
PROVENANCE = "provenance"  # versions, Hub commits and the base weights' sha256 a study started with


def run_settings(store: StudyStore) -> RunSettings | None:
    stored = store.get_extra(RUN_SETTINGS)
    if stored is None:
        return None
    try:
        return RunSettings.from_stored(stored)
    except ValueError as e:
        raise StoreError(f"{store.path}: extra {RUN_SETTINGS!r} holds {e}, not run settings vmap-sweep stores; the "
                         "database was edited: restore study.db from a backup") from None


def put_run_settings(store: StudyStore, settings: RunSettings) -> None:
    store.put_extra(RUN_SETTINGS, settings.to_dict())


def run_options(store: StudyStore) -> dict:
    """{"models_per_batch": int or "auto", "share": bool, "shard": "K/N" or None} as the study was started (no
    "shard" where it was started before that was recorded), or {} where none is recorded yet (a study whose first
    run stopped before its start was recorded)."""
    stored = store.get_extra(RUN_OPTIONS)
    return dict(stored) if isinstance(stored, dict) else {}


def put_run_options(store: StudyStore, models_per_batch: int | str, share: bool, shard: str | None = None) -> None:
    """shard: "K/N" where the study trains that part of a split (recorded as null otherwise)."""
    store.put_extra(RUN_OPTIONS, {"models_per_batch": models_per_batch, "share": bool(share), "shard": shard})


def criterion(store: StudyStore, settled: bool = False) -> dict:
    """The criterion a study's classes follow: its last `classify`, else the ratio one every study starts with.
    settled: once a `classify` under way has committed (StudyStore.get_extra_settled)."""
    value = (store.get_extra_settled(CRITERION) if settled else store.get_extra(CRITERION)) or criterion_rules.DEFAULT
    if not criterion_rules.is_stored_form(value):
        raise StoreError(f"{store.path}: extra {CRITERION!r} holds {value!r:.80}, not a criterion vmap-sweep stores; "
                         "the database was edited: run `vmap-sweep classify` on the study to store one again")
    return dict(value)


def has_criterion(store: StudyStore) -> bool:
    return store.get_extra(CRITERION) is not None


def put_criterion(store: StudyStore, value: dict) -> None:
    store.put_extra(CRITERION, dict(value))


def data_digest(store: StudyStore) -> str | None:
    return store.get_extra(DATA_DIGEST)


def put_data_digest(store: StudyStore, digest: str) -> None:
    store.put_extra(DATA_DIGEST, digest)


def zoom_of(store: StudyStore) -> dict | None:
    info = store.get_extra(ZOOM_OF)
    return info if isinstance(info, dict) else None


def put_zoom_of(store: StudyStore, info: dict[str, Any]) -> None:
    store.put_extra(ZOOM_OF, info)


def level(store: StudyStore) -> int:
    """0 for a study made by `run`, else the zoom level it was made at."""
    info = zoom_of(store)
    if info is None or "level" not in info:
        return 0
    if isinstance(info["level"], bool) or not isinstance(info["level"], int) or info["level"] < 0:
        raise StoreError(f"{store.path}: extra {ZOOM_OF!r} records level {info['level']!r:.40}, not a zoom level; "
                         "the database was edited: restore study.db from a backup")
    return info["level"]


def provenance(store: StudyStore) -> dict | None:
    value = store.get_extra(PROVENANCE)
    return value if isinstance(value, dict) else None


def put_provenance(store: StudyStore, value: dict) -> None:
    store.put_extra(PROVENANCE, value)


def ood(store: StudyStore) -> Any:
    return store.get_extra(OOD)


def put_ood(store: StudyStore, result: Any) -> None:
    store.put_extra(OOD, result)


def dataset_sizes(store: StudyStore) -> dict[int, DatasetSize] | None:
    """Each budget of the grid counted in supervised targets, conversations and stream positions (tokens); None for
    a study made before they were recorded (its sizes are known in tokens only). A budget counted in tokens is its
    own positions; one counted in another unit (run --budget-unit) stores them third."""
    stored = store.get_extra(DATASET_SIZES)
    if stored is None:
        return None
    try:
        sizes = {}
        for n, v in stored.items():
            if len(v) not in (2, 3):
                raise ValueError(n)
            sizes[int(n)] = DatasetSize(int(v[2]) if len(v) == 3 else int(n), int(v[0]), int(v[1]))
        return sizes
    except (AttributeError, TypeError, ValueError):
        raise StoreError(f"{store.path}: extra {DATASET_SIZES!r} is not what vmap-sweep stores; the database was "
                         f"edited: delete that row (sqlite3 study.db \"DELETE FROM extra WHERE "
                         f"key='{DATASET_SIZES}'\") and resume the run once to record it again") from None


def put_dataset_sizes(store: StudyStore, sizes: dict[int, DatasetSize]) -> None:
    store.put_extra(DATASET_SIZES, {str(n): [s.supervised, s.conversations] + ([s.tokens] if s.tokens != n else [])
                                    for n, s in sorted(sizes.items())})
