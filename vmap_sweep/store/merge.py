"""Merge the shards of one study (`run --shard K/N`) into one study folder.

Shards hold disjoint (or identical) cells of one config; the merged study holds their union, their extras and
their zoom children. A merge that would change a result already in the output is refused, and nothing is written.
The shards of a split into N parts (folders ``shard-K-of-N``, rows recording ``shard`` = "K/N") are merged whole:
a set that misses a part (counting the parts an earlier merge put into the output) or gives one twice is refused
unless ``partial``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vmap_sweep.errors import ConfigError, StoreError
from vmap_sweep.store.db import (
    _MISSING,
    _RUN_COLUMNS,
    DB_NAME,
    RESULT_COLUMNS,
    StudyStore,
    canonical_json,
    config_diff,
)
from vmap_sweep.store.extras import RUN_OPTIONS, criterion
from vmap_sweep.study.plan import shard_of_folder, shard_of_label


def merge_studies(shard_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  partial: bool = False) -> StudyStore:
    """Union of the done cells of shard studies (one config) into ``out_dir`` (new, or an earlier
    merge of the same study). A cell done in two places must hold identical results. Unless ``partial``,
    every part K/N of the split must be there (given, or in ``out_dir`` already) and none in two folders. A folder
    given twice is refused either way: it is never two shards."""
    if not shard_dirs:
        raise ConfigError("merge: no shard folders given; pass the --out folders of the shard runs")
    out_dir = Path(out_dir)
    resolved = [Path(d).resolve() for d in shard_dirs]
    if out_dir.resolve() in resolved:
        raise ConfigError(f"merge: output {out_dir} is one of the shards; choose a new folder")
    twice = next((d for k, d in enumerate(shard_dirs) if resolved[k] in resolved[:k]), None)
    if twice is not None:
        raise ConfigError(f"merge: {twice} is given twice; give each shard folder once")
    stores: list[StudyStore] = []
    try:
        for d in shard_dirs:
            stores.append(StudyStore.open(d))
        _check_one_study(stores)
        if not partial:
            _check_whole_split(stores, out_dir)
        done, shared = _gather(stores)
        first = stores[0]
        out = StudyStore.create_or_open(out_dir, first.config, first.cells())
        try:
            if out.done_count() and criterion(out) != criterion(first):
                raise StoreError(f"merge: {out_dir} is classified by {criterion(out)}, the shards by "
                                 f"{criterion(first)}; run `vmap-sweep classify` on them with the same criterion")
            _write(out, done, shared, stores)
            _copy_child_folders(stores, out_dir)  # once the merge is committed: a refused one copies nothing
        except BaseException:
            out.close()
            raise
        return out
    finally:
        for s in stores:
            s.close()


def _check_one_study(stores: Sequence[StudyStore]) -> None:
    """Shards of one study: one config, one grid, one criterion; zoom children inside each (read now, so that a
    child recorded outside its study is refused before the output is made)."""
    first = stores[0]
    for s in stores:
        s.children()
    for s in stores[1:]:
        if s.config_hash != first.config_hash:
            raise StoreError(f"merge: {s.directory} was made with a different config than "
                             f"{first.directory} ({config_diff(first.config, s.config)}); "
                             "merge only shards of one study")
    cells = first.cells()
    for s in stores[1:]:
        if s.cells() != cells:
            raise StoreError(f"merge: {s.directory} has different cells than {first.directory}; "
                             "merge only shards of one study")
        if criterion(s) != criterion(first):  # one study's classes follow one criterion
            raise StoreError(f"merge: {s.directory} is classified by {criterion(s)}, {first.directory} "
                             f"by {criterion(first)}; run `vmap-sweep classify` on each with the same "
                             "criterion")


def _shards_of(store: StudyStore) -> set[tuple[int, int]]:
    """The parts K/N a study holds: its folder's name (``shard-K-of-N``) and the ``shard`` its done rows record."""
    found = set()
    own = shard_of_folder(Path(store.directory).name)
    if own is not None:
        found.add(own)
    return found | {kn for kn in map(shard_of_label, store.shard_labels()) if kn is not None}


def _check_whole_split(stores: Sequence[StudyStore], out_dir: Path) -> None:
    """Each shard once, and every part K of N: a merge of part of a split looks finished but is not."""
    owner: dict[tuple[int, int], Path] = {}
    for s in stores:
        for kn in sorted(_shards_of(s)):
            if kn in owner:
                raise StoreError(f"merge: shard {kn[0]}/{kn[1]} is in both {owner[kn]} and {s.directory}; give "
                                 "each shard once (or add --partial)")
            owner[kn] = s.directory
    if not owner:  # studies not made by --shard: no parts to count
        return
    present = set(owner)
    if (out_dir / DB_NAME).is_file():  # an earlier merge brought its parts along
        with StudyStore.open(out_dir) as earlier:
            present |= _shards_of(earlier)
    splits = sorted({n for _, n in present})
    if len(splits) > 1:
        raise StoreError(f"merge: the shards come from splits into {' and '.join(map(str, splits))} parts; merge "
                         "the shards of one split (or add --partial)")
    n = splits[0]
    missing = [f"{k}/{n}" for k in range(1, n + 1) if (k, n) not in present]
    if missing:
        are = "shard " + missing[0] + " is" if len(missing) == 1 else "shards " + ", ".join(missing) + " are"
        raise StoreError(f"merge: {are} missing (the study was split into {n} parts); give every "
                         f"shard-K-of-{n} folder, or add --partial to merge only these")


def _gather(stores: Sequence[StudyStore]) -> tuple[dict, dict]:
    """The shards' done cells and extras, each with where it came from; a cell or extra two shards hold
    differently is refused."""
    done: dict[tuple[int, int], tuple[dict[str, Any], Path]] = {}
    shared: dict[str, tuple[Any, Path]] = {}
    for s in stores:
        for key, row in s._raw_done().items():
            if key in done and not _same_result(done[key][0], row):
                raise StoreError(f"merge: cell {key} is done in {done[key][1]} and {s.directory} with "
                                 "different results; keep only one of those shards")
            done.setdefault(key, (row, s.directory))
        for k, v in s.extras().items():
            if k == RUN_OPTIONS:  # how a shard was batched, not what it holds: the first shard's stands, and the
                # merged study is no one part of the split
                shared.setdefault(k, ({**v, "shard": None} if isinstance(v, dict) else v, s.directory))
                continue
            if k in shared and shared[k][0] != v:
                raise StoreError(f"merge: extra result {k!r} differs between {shared[k][1]} and "
                                 f"{s.directory}; remove it from one shard")
            shared.setdefault(k, (v, s.directory))
    return done, shared


def _write(out: StudyStore, done: dict, shared: dict, stores: Sequence[StudyStore]) -> None:
    """Cells, extras and zoom children into the output, in one transaction."""
    existing = out._raw_done()
    cols = [*RESULT_COLUMNS, *_RUN_COLUMNS]
    with out._tx() as conn:
        for key, (row, src) in sorted(done.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            if key in existing:
                if not _same_result(existing[key], row):
                    raise StoreError(f"merge: cell {key} in {out.directory} differs from {src}; "
                                     "merge into a new folder")
                continue
            conn.execute(f"UPDATE cells SET status='done', {', '.join(f'{c}=?' for c in cols)} "
                         "WHERE i=? AND j=?", [row[c] for c in cols] + [key[0], key[1]])
        for k, (v, _) in shared.items():
            old = out.get_extra(k, _MISSING)
            if old != _MISSING and k == RUN_OPTIONS:
                continue
            if old != _MISSING and old != v:
                raise StoreError(f"merge: extra result {k!r} in {out.directory} differs; merge into a new folder")
            conn.execute("INSERT OR REPLACE INTO extra VALUES (?, ?)", (k, canonical_json({"v": v})))
        for s in stores:
            for c in s.children():
                conn.execute("INSERT OR IGNORE INTO children VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (c.child_dir, c.x0, c.x1, c.y0, c.y1, c.level, c.created))


def _copy_child_folders(stores: Sequence[StudyStore], out_dir: Path) -> None:
    """Each shard's zoom-child folders into the merged study, so that the children it records exist there.
    A folder the output already has is kept (an earlier merge); each copy lands whole or not at all."""
    for s in stores:
        for c in s.children():
            src, dst = s.child_folder(c), out_dir / c.child_dir  # children() kept child_dir inside the study
            if not src.is_dir() or dst.exists():
                continue
            tmp = dst.with_name(dst.name + ".merging")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            tmp.rename(dst)


def _same_result(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(a[c] == b[c] for c in RESULT_COLUMNS)
