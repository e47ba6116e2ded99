"""What a run trains with when its folder may already hold a study: the options given, over the study's own.

A study resumes from its folder alone: an option left out is the study's (its config, its run settings, how it was
batched); an option given that changes the study's config is refused here, naming the option. The run settings a
resume must keep (device type, micro-batching, determinism, compile, torch, CUDA, GPU) are compared once the device
is known, by the pipeline (RunSettings.check_same); so are the Hub commits, once they are pinned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from vmap_sweep.errors import ConfigError
from vmap_sweep.store import extras
from vmap_sweep.store.db import DB_NAME, config_diff, shard_folders
from vmap_sweep.store.levels import level_refusal, refinement_level
from vmap_sweep.store.study import Study
from vmap_sweep.study.axes import parse_resolution
from vmap_sweep.study.config import StudyConfig
from vmap_sweep.study.config import preset as get_preset
from vmap_sweep.study.plan import shard_folder_name, shard_of_label
from vmap_sweep.study.settings import RunSettings

DEFAULT_PRESET = "d20-docvqa"
DEFAULT_MODELS_PER_BATCH = 8
# Pinned to a Hub commit after this policy (run/provenance.py pin_sources): compared where the pins are known.
_PINNED = ("model_revision", "data_revision")


@dataclass(frozen=True)
class StoredRun:
    """What a study folder holds of how it was run: its config, run settings (None: not trained yet), the
    options it was batched with (models_per_batch, share, shard; {}: none recorded), the part of a split it
    trains (shard), where it is a refinement level (level, finished) and its cells still to train (pending)."""

    config: StudyConfig
    settings: RunSettings | None = None
    options: dict = field(default_factory=dict)
    shard: tuple[int, int] | None = None
    level: tuple[int, bool] | None = None
    pending: frozenset[tuple[int, int]] | None = None  # (i, j) of the cells not stored; None: not read
    inferred: int = 0  # a finished level's cells that refinement inferred

    @classmethod
    def read(cls, folder: str | os.PathLike, pending: bool = False) -> StoredRun | None:
        """The study in `folder`, or None where there is none yet; pending: read which cells are still to train."""
        if not (Path(folder) / DB_NAME).is_file():
            return None
        with Study.open(folder) as study:
            store = study.store
            options = extras.run_options(store)
            return cls(study.config, study.settings, options, _shard_of(store, options), refinement_level(store),
                       frozenset(c.key for c in store.pending()) if pending else None,
                       store.cell_count() - store.done_count())


def _shard_of(store, options: dict) -> tuple[int, int] | None:
    """The part of a split a study trains: as its run recorded it, or (a study from before that record) as the
    cells it has trained are tagged, where they all name one part."""
    if "shard" in options:
        return shard_of_label(options["shard"])
    tags = store.shard_labels()
    return shard_of_label(tags.pop()) if len(tags) == 1 else None


def refuse_a_level(out: Path, stored: StoredRun | None) -> None:
    """`run` (and its dry run) on a refinement level's folder: refused, as run_study refuses it."""
    if stored is not None and stored.level is not None:
        raise level_refusal(out, *stored.level, stored.inferred)


def shard_folder(out: Path, shard: tuple[int, int] | None,
                 stored: StoredRun | None) -> tuple[Path, tuple[int, int] | None]:
    """Where a run trains and which part of the plan: with --shard K/N, OUT/shard-K-of-N; in a shard's own folder
    (`run --out OUT/shard-K-of-N`, with or without --shard), that part again. A folder that holds shards and no
    study of its own is refused rather than started as a new whole study. stored: the study in `out`."""
    own = stored.shard if stored is not None else None
    if own is not None:
        if shard is not None and shard != own:
            raise ConfigError(f"{out} holds shard {own[0]}/{own[1]} of its study, not {shard[0]}/{shard[1]}; give "
                              f"--out {out.parent} --shard {shard[0]}/{shard[1]} for that part")
        return out, own
    if shard is not None:
        return out / shard_folder_name(*shard), shard
    if stored is None:
        parts = shard_folders(out)
        if parts:
            raise ConfigError(f"{out} holds the shards {', '.join(parts)}, not a study of its own; give --shard K/N "
                              f"to run one, or `vmap-sweep merge` them")
    return out, None


@dataclass(frozen=True)
class RunOptions:
    """A run as asked for; None (False for deterministic) where an option was left out."""

    preset: str | None = None
    config: dict = field(default_factory=dict)  # StudyConfig fields given, e.g. {"seed": 3}; None values: left out
    fixed: dict = field(default_factory=dict)  # --set: fixed hyperparameters, already checked
    models_per_batch: int | str | None = None  # a positive integer, "auto", or its text
    share: bool | None = None
    device: str | None = None
    micro_batch_size: int | None = None
    deterministic: bool = False


@dataclass(frozen=True)
class ResolvedRun:
    """The config and options a run trains with."""

    config: StudyConfig
    models_per_batch: int | str
    share: bool
    device: str
    micro_batch_size: int | None
    deterministic: bool

    def run_settings(self) -> RunSettings:
        """The run settings on this machine's device (checked: a bad one is refused before any folder is touched)."""
        from vmap_sweep.run.policy import resolve_device, run_settings

        return run_settings(resolve_device(self.device), self.config.cell_rows_per_step(), self.micro_batch_size,
                            self.deterministic)


def check_models_per_batch(value: int | str) -> int | str:
    """A positive integer (or its text) or 'auto', as --models-per-batch takes it."""
    if value == "auto":
        return value
    try:
        k = int(value) if not isinstance(value, bool) and isinstance(value, int | str) else None
    except ValueError:
        k = None
    if k is None:
        raise ConfigError(f"--models-per-batch {str(value)!r}: give a positive integer or 'auto'")
    if k < 1:
        raise ConfigError(f"--models-per-batch {k}: give a positive integer or 'auto'")
    return k


def resolve_run(options: RunOptions, stored: StoredRun | None, where: object = "the study") -> ResolvedRun:
    """The run `options` ask for in a folder holding `stored` (None: a new study). Left out, an option is the
    study's: its config (unless --preset is given), its device, micro-batch size and determinism, how many models
    it trained at once and whether it shared trajectories; a new study takes the defaults. An option that changes
    a stored study's config is one ConfigError naming it."""
    kept = stored.options if stored is not None else {}
    k = check_models_per_batch(options.models_per_batch if options.models_per_batch is not None
                               else str(kept.get("models_per_batch", DEFAULT_MODELS_PER_BATCH)))
    share = options.share if options.share is not None else kept.get("share", True)
    device, micro, deterministic = options.device, options.micro_batch_size, options.deterministic
    if stored is not None and stored.settings is not None:
        device = device if device is not None else stored.settings.device
        micro = micro if micro is not None else stored.settings.micro_batch_size
        deterministic = deterministic or stored.settings.deterministic
    base = stored.config if options.preset is None and stored is not None \
        else get_preset(options.preset or DEFAULT_PRESET)
    cfg = base.with_overrides(**options.config, fixed={**base.fixed, **options.fixed})
    if stored is not None:
        if parse_resolution(cfg.resolution) == parse_resolution(stored.config.resolution):  # "12", "12x12": one grid
            cfg = replace(cfg, resolution=stored.config.resolution)
        _check_same_config(cfg, stored.config, options, where)
    return ResolvedRun(cfg, k, share, device if device is not None else "auto", micro, deterministic)


def _check_same_config(cfg: StudyConfig, stored: StudyConfig, options: RunOptions, where: object) -> None:
    mine, theirs = cfg.to_dict(), stored.to_dict()
    for key in _PINNED:  # a field left at None is not in the dict
        mine.pop(key, None)
        if key in theirs:
            mine[key] = theirs[key]
    if mine == theirs:
        return
    differ = [f.name for f in fields(StudyConfig) if mine.get(f.name) != theirs.get(f.name)]
    names = sorted({_option_name(key, options) for key in differ})
    # shown as each study means it: to_dict leaves out a value that every study once had (packing: true)
    shown = config_diff({**theirs, **{f: getattr(stored, f) for f in differ if f not in theirs}},
                        {**mine, **{f: getattr(cfg, f) for f in differ if f not in mine}})
    raise ConfigError(f"{where} holds a study made with other options ({shown}); leave out {', '.join(names)} (or "
                      "give the study's values) to resume it, or use a new --out for a new study")


def _option_name(key: str, options: RunOptions) -> str:
    """The option that set a config field: its own, --set for the fixed hyperparameters, else the preset's."""
    if key == "fixed" and options.fixed:
        return "--set"
    if options.config.get(key) is not None:
        return f"--{key.replace('_', '-')}"
    return "--preset"
