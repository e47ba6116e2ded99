"""SHA-256 of files, read in chunks: what a study records of a local data file and of its base model's weights
(gigabytes for d20, so never read whole)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

CHUNK = 1 << 20


def sha256_of_files(files: Iterable[Path]) -> str:
    """One digest over the files in the order given, each name before its bytes (so a rename counts)."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()
