"""Where a study's numbers came from: the base weights' SHA-256, the Hub commits of the model and data, and the
versions of vmap-sweep and Python, recorded when a study starts (the extra "provenance").

The torch, CUDA and GPU that run the kernels are run settings (study/settings.py): like the device type, a
resume must match them. Here the rest: a resume must load the same weights (their fingerprint) and the same Hub
commits, while vmap-sweep's and Python's versions are only shown (what vmap-sweep changes of the arithmetic is
its numerics version, a run setting; Python's version changes no number).

`pin_sources` turns a new study's Hub model and dataset into commits before anything trains, so the study's
config names exactly what it trained on and a resume loads that even after the repo moves on upstream.
"""

from __future__ import annotations

import platform
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from vmap_sweep.data.sources import dataset_commit
from vmap_sweep.digest import sha256_of_files
from vmap_sweep.errors import StoreError
from vmap_sweep.model.checkpoint import hub_commit, is_hub_id, locate_model, weight_files
from vmap_sweep.study.config import StudyConfig

SHOWN_ONLY = ("vmap_sweep", "python")  # versions shown beside a resume, never refused


def pin_sources(cfg: StudyConfig, stored: StudyConfig | None = None) -> StudyConfig:
    """`cfg` with its Hub model and dataset pinned to commits. A study being resumed (`stored`) keeps its own
    pins (none, for a local model or data) where none is given: its config must not change."""
    model_rev, data_rev = cfg.model_revision, cfg.data_revision
    if stored is not None and model_rev is None and stored.model == cfg.model:
        model_rev = stored.model_revision
    elif is_hub_id(cfg.model):
        model_rev = hub_commit(locate_model(cfg.model, revision=model_rev, model_format=cfg.model_format))
    if stored is not None and data_rev is None and stored.data == cfg.data:
        data_rev = stored.data_revision
    else:  # refuses a revision for local data, before anything loads
        data_rev = dataset_commit(cfg.data, data_rev)
    return replace(cfg, model_revision=model_rev, data_revision=data_rev)


def base_model_dir(cfg: StudyConfig) -> Path:
    """The folder (or file) the study's base model is read from, downloaded or pretrained as needed."""
    if cfg.model == "tiny":
        from vmap_sweep.train.tiny import tiny_base_dir

        return tiny_base_dir()
    return locate_model(cfg.model, revision=cfg.model_revision, model_format=cfg.model_format)


def collect(cfg: StudyConfig) -> dict:
    """What this run starts from: the versions beside the numerics, the model's Hub commit (None: not from the
    Hub) and the SHA-256 of its weight files' bytes, the dataset's Hub commit."""
    model_dir = base_model_dir(cfg)
    return {
        "vmap_sweep": _package_version(),
        "python": platform.python_version(),
        "model": {"source": cfg.model, "revision": hub_commit(model_dir) if is_hub_id(cfg.model) else None,
                  "sha256": sha256_of_files(weight_files(model_dir, model_format=cfg.model_format))},
        "data": {"source": cfg.data, "revision": cfg.data_revision},
    }


def check_same(stored: dict, current: dict, where: object) -> list[str]:
    """Refuse (one line) a resume on other weights or another Hub commit; return the version differences that
    are only shown."""
    for part, option in (("model", "--model-revision"), ("data", "--data-revision")):
        old, new = stored.get(part) or {}, current[part]
        if old.get("revision") != new["revision"]:
            raise StoreError(f"{new['source']}: {where} was trained on Hub revision {_short(old.get('revision'))}, "
                             f"this run loads {_short(new['revision'])}; resume with {option} "
                             f"{old.get('revision')}, or use a new --out")
    old_sha, new_sha = (stored.get("model") or {}).get("sha256"), current["model"]["sha256"]
    if old_sha is not None and old_sha != new_sha:
        raise StoreError(f"{current['model']['source']}: its weights changed since {where} was started (sha256 "
                         f"{old_sha[:12]} -> {new_sha[:12]}); restore them, or use a new --out for the new model")
    return [f"{where} was started with {key.replace('_', '-')} {stored[key]}, this run has {current[key]}"
            for key in SHOWN_ONLY if stored.get(key) not in (None, current[key])]


def _short(revision: str | None) -> str:
    return "none (not from the Hub)" if revision is None else revision[:12]


def _package_version() -> str:
    try:
        return version("vmap-sweep")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
