"""A study as the layers above the store see it: its folder's database, read through the study vocabulary.

`Study.open` and `Study.create` are the only ways in for code that trains: the config comes back as the
StudyConfig it was trained with (valid, as every StudyConfig is), beside its run settings, criterion and data digest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from vmap_sweep.errors import ConfigError, StoreError
from vmap_sweep.store import extras
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.config import StudyConfig
from vmap_sweep.study.grid import Cell
from vmap_sweep.study.settings import RunSettings


@dataclass
class Study:
    store: StudyStore
    config: StudyConfig

    @classmethod
    def open(cls, directory: str | os.PathLike) -> Study:
        store = StudyStore.open(directory)
        try:
            return cls(store, _trained_config(store))
        except BaseException:
            store.close()
            raise

    @classmethod
    def create(cls, directory: str | os.PathLike, config: StudyConfig, cells: Sequence[Cell]) -> Study:
        """A new study of `config`, or the one `directory` holds if it was made with the same config."""
        return cls(StudyStore.create_or_open(directory, config.to_dict(), cells), config)

    @property
    def directory(self):
        return self.store.directory

    @property
    def settings(self) -> RunSettings | None:
        return extras.run_settings(self.store)

    @property
    def criterion(self) -> dict:
        return extras.criterion(self.store)

    @property
    def data_digest(self) -> str | None:
        return extras.data_digest(self.store)

    @property
    def level(self) -> int:
        return extras.level(self.store)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Study:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _trained_config(store: StudyStore) -> StudyConfig:
    try:
        config = StudyConfig.from_dict(store.config)
    except (ConfigError, TypeError, ValueError) as e:
        raise StoreError(f"{store.path}: its stored config can't be used ({e}); it was not made by this "
                         "vmap-sweep, or was edited") from None
    return config
