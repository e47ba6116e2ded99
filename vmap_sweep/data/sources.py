"""Where conversations come from: the built-in synthetic set, a local .jsonl/.parquet file, or the Hub.

Splits are "train" and "validation", and the two never share a conversation:
- "synthetic": train and validation come from different seed streams (and carry different source ids).
- a local .jsonl holds one conversation per line: {"messages": [...]}, or nanochat's CustomJSON
  (`tasks/customjson.py`), the bare array of {role, content} messages.
- a local file has no validation split of its own, so a fixed held-out tail is carved out of it:
  the rows are permuted with HOLDOUT_SEED and the last HOLDOUT_FRACTION of that permutation
  (at least one row once there are two) is "validation"; "train" is every other row, in file order.
  The split depends only on the number of rows, so it is the same on every run.
- a local directory holding one training file, train.jsonl/.parquet or NAME_train.jsonl/.parquet, and optionally
  one validation file, validation.* or NAME_validation.* / NAME_val.* (the same NAME), uses its validation file
  when there is one, else the held-out tail of train. Two training (or validation) files are refused: which
  one is the study's data is the user's to say.
- a Hub dataset id is read with `datasets.load_dataset(source, split=split)`, its own splits.
Every row is validated on load, so a malformed row fails here, naming its file:line or source and row index.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from vmap_sweep.data.render import validate_conversation
from vmap_sweep.data.synthetic import synthetic_docqa
from vmap_sweep.digest import sha256_of_files
from vmap_sweep.errors import DataError

DEFAULT_DATASET = "morgan/docvqa-nanochat"
SPLITS = ("train", "validation")
SYNTHETIC_SIZES = {"train": 4000, "validation": 400}
SYNTHETIC_SEEDS = {"train": 1234, "validation": 98765}  # different seed streams -> disjoint sets
HOLDOUT_SEED = 20251
HOLDOUT_FRACTION = 0.05
LOCAL_SUFFIXES = (".jsonl", ".parquet")


def load_conversations(source: str = DEFAULT_DATASET, split: str = "train", revision: str | None = None) -> list[dict]:
    """Conversations {"messages": [...]} of one split of `source` (see the module doc for the sources);
    `revision`: a Hub dataset's branch, tag or commit (default: its main branch)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for {source}; use one of {', '.join(SPLITS)}")
    path = Path(source).expanduser()
    _check_revision(source, revision)
    if source == "synthetic":
        rows = _checked(synthetic_docqa(SYNTHETIC_SIZES[split], SYNTHETIC_SEEDS[split]), f"synthetic ({split})")
    elif path.is_dir():
        rows = _load_directory(path, split)
    elif path.suffix in LOCAL_SUFFIXES:
        if path.exists() and not path.is_file():  # a pipe would block the read, and the digest would eat it
            raise DataError(f"{path}: not a regular file (a named pipe, device or socket); give a .jsonl or "
                            ".parquet file")
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        rows = _holdout_split(_read_file(path), split)
    elif path.is_absolute() or source.startswith((".", "~")):
        raise DataError(f"{path}: no such file or directory; expected a .jsonl/.parquet file or a directory")
    else:
        rows = _checked(_load_hub(source, split, revision), f"{source} ({split})")
    if not rows:
        raise DataError(
            f"{source} split {split!r}: no conversations; the dataset is empty "
            "(or has a single row, too few to hold out a validation split)"
        )
    return rows


def is_hub_dataset(source: str) -> bool:
    """Whether `source` names a Hub dataset (what load_conversations reads with `datasets`)."""
    path = Path(source).expanduser()
    return not (source == "synthetic" or path.is_dir() or path.suffix in LOCAL_SUFFIXES or path.is_absolute()
                or source.startswith((".", "~")))


def _check_revision(source: str, revision: str | None) -> None:
    if revision is not None and not is_hub_dataset(source):
        raise DataError(f"{source}: local data has no Hub revision; drop --data-revision {revision}")


def dataset_commit(source: str, revision: str | None = None) -> str | None:
    """The Hub commit `revision` (default: main) of a Hub dataset resolves to: asked of the Hub, else read from
    huggingface_hub's cache; None for local data. Unresolvable offline: the revision as given."""
    _check_revision(source, revision)
    if not is_hub_dataset(source):
        return None
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    from vmap_sweep.model.checkpoint import hub_cache_dir, hub_offline, hub_unreachable

    pinned = {} if revision is None else {"revision": revision}
    if not (hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
            or hub_unreachable()):
        try:
            return HfApi().dataset_info(source, **pinned).sha
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise DataError(f"{source}: no Hub dataset of that name{f' at revision {revision!r}' if revision else ''} "
                            f"({type(e).__name__}); check the name and --data-revision") from None
        except Exception:  # no network: the cache knows which commit it holds
            pass
    try:
        return Path(snapshot_download(source, repo_type="dataset", cache_dir=hub_cache_dir(), local_files_only=True,
                                      **pinned)).name
    except Exception:
        return revision


def _checked(rows: list[dict], source: str) -> list[dict]:
    """Validate every row up front, so a malformed one fails at load time naming its source and index."""
    for i, row in enumerate(rows):
        validate_conversation(row, i, source)
    return rows


def holdout_indices(n: int) -> set[int]:
    """Row indices of a local file's held-out validation tail (fixed by n and HOLDOUT_SEED)."""
    if n < 2:
        return set()
    order = list(range(n))
    random.Random(HOLDOUT_SEED).shuffle(order)
    k = max(1, round(n * HOLDOUT_FRACTION))
    return set(order[n - k:])


def _holdout_split(rows: list[dict], split: str) -> list[dict]:
    held = holdout_indices(len(rows))
    keep = (lambda i: i in held) if split == "validation" else (lambda i: i not in held)
    return [row for i, row in enumerate(rows) if keep(i)]


_TRAIN_NAMES = re.compile(r"(?:(.+)_)?train")
_VALIDATION_NAMES = re.compile(r"(?:(.+)_)?(validation|val)")


def _directory_files(path: Path) -> tuple[Path | None, Path | None]:
    """A data folder's (train, validation) files, each None where absent; DataError where the folder holds two
    of either, or a validation file of another set than its training file. A name held both as .jsonl and as
    .parquet is read from the .jsonl."""
    found: dict[str, dict[str, tuple[str | None, Path]]] = {"train": {}, "validation": {}}
    for f in sorted(path.iterdir(), key=lambda f: (LOCAL_SUFFIXES.index(f.suffix) if f.suffix in LOCAL_SUFFIXES
                                                   else len(LOCAL_SUFFIXES), f.name)):
        if f.suffix not in LOCAL_SUFFIXES or not f.is_file():
            continue
        for split, names, bare in (("train", _TRAIN_NAMES, "train"), ("validation", _VALIDATION_NAMES, "validation")):
            if (m := names.fullmatch(f.stem)) and (m.group(1) is not None or f.stem == bare):
                found[split].setdefault(f.stem, (m.group(1), f))  # the .jsonl of a stem held in both formats

    def one(split: str) -> tuple[str | None, Path | None]:
        files = found[split]
        if len(files) > 1:
            names = ", ".join(sorted(f.name for _, f in files.values()))
            raise DataError(f"{path}: {len(files)} {split} files ({names}); keep one in the folder, or pass the "
                            "file itself as --data")
        return next(iter(files.values()), (None, None))

    (train_set, train), (val_set, validation) = one("train"), one("validation")
    if train is not None and validation is not None and train_set != val_set:
        raise DataError(f"{path}: {validation.name} is not the validation split of {train.name} (the names differ "
                        f"before _train/_val); rename one to match, or pass the training file itself as --data")
    return train, validation


def _load_directory(path: Path, split: str) -> list[dict]:
    train, validation = _directory_files(path)
    if train is None:
        raise DataError(f"{path}: no training file in this directory; expected train.jsonl/.parquet or "
                        "NAME_train.jsonl/.parquet (with NAME_val or NAME_validation beside it for eval)")
    if validation is not None:
        return _read_file(validation if split == "validation" else train)
    return _holdout_split(_read_file(train), split)


def _read_file(path: Path) -> list[dict]:
    return _read_jsonl(path) if path.suffix == ".jsonl" else _read_parquet(path)


def data_fingerprint(source: str) -> str | None:
    """sha256 of the local files `source` reads (a file, or a folder's train and validation files); None for
    synthetic and Hub data. A study's cells must all see the same data, and a name says nothing of what a
    file holds now."""
    path = Path(source).expanduser()
    if source == "synthetic":
        return None
    if path.is_dir():
        files = [f for f in _directory_files(path) if f is not None]
    else:
        files = [path] if path.is_file() else []
    return sha256_of_files(files) if files else None


# A conversation line at most (a DocVQA row with its OCR text is ~100 KB). Python's JSON parser holds ~10x a line's
# size while it reads it, so a line is refused before it is read whole.
MAX_LINE_BYTES = 8 << 20


def _int_of_json(text: str) -> int:
    """A JSON integer, refused past 64 bits' worth of digits (int() of 100,000 digits is quadratic work, and
    Python refuses more than 4300 with a ValueError that names no line)."""
    if len(text.lstrip("-")) > 20:
        raise ValueError(f"an integer of {len(text.lstrip('-')):,} digits")
    return int(text)


def _lines(f, path: Path):
    """(line number, bytes) of each line, a line longer than MAX_LINE_BYTES refused after reading that much."""
    lineno = 0
    while raw := f.readline(MAX_LINE_BYTES + 1):
        lineno += 1
        if len(raw) > MAX_LINE_BYTES:
            raise DataError(f"{path}:{lineno}: a line longer than {MAX_LINE_BYTES >> 20} MiB, more than a "
                            "conversation holds; expected one {\"messages\": [...]} per line")
        yield lineno, raw


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open("rb") as f:
        for lineno, raw in _lines(f, path):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM is no error
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not UTF-8 text; save the file as UTF-8 JSON lines") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line, parse_int=_int_of_json)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: invalid JSON ({e.msg}); expected one {{\"messages\": [...]}} per line "
                    "(or nanochat's CustomJSON: one [messages] array per line)"
                ) from e
            except ValueError as e:  # from _int_of_json
                raise DataError(f"{path}:{lineno}: {e}, not a value a conversation holds; expected one "
                                "{\"messages\": [...]} per line") from None
            except RecursionError:
                raise DataError(f"{path}:{lineno}: JSON nested too deeply to be a conversation; "
                                "expected one {\"messages\": [...]} per line") from None
            if isinstance(row, list):  # nanochat's CustomJSON: the messages themselves
                row = {"messages": row}
            validate_conversation(row, None, f"{path}:{lineno}")
            rows.append({"messages": row["messages"]})
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises several types for a file that isn't parquet
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    if "messages" not in schema.names:
        raise DataError(f"{path}: no `messages` column (columns: {', '.join(schema.names)})")
    messages = pq.read_table(path, columns=["messages"]).column("messages").to_pylist()
    return _checked([{"messages": m} for m in messages], str(path))


def _load_hub(source: str, split: str, revision: str | None = None) -> list[dict]:
    """A Hub dataset through `datasets`, which honours HF_HUB_OFFLINE / HF_DATASETS_OFFLINE and its cache."""
    import datasets

    from vmap_sweep.model.checkpoint import hub_unreachable

    # unreachable: straight to the cache, not ~40 s of retries (datasets reads this flag per call)
    offline = bool(hub_unreachable()) and hasattr(datasets.config, "HF_HUB_OFFLINE")
    saved = getattr(datasets.config, "HF_HUB_OFFLINE", None)
    try:
        if offline:
            datasets.config.HF_HUB_OFFLINE = True
        ds = datasets.load_dataset(source, split=split, **({} if revision is None else {"revision": revision}))
    except Exception as e:  # network, missing repo, missing split, offline without a cache: all user-fixable
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"could not load Hub dataset {source!r} split {split!r} ({type(e).__name__}: {first_line}); "
            "check the name, use HF_HUB_OFFLINE=1 with a cached copy, or pass a local .jsonl/.parquet file (or "
            "run offline with --preset tiny)"
        ) from e
    finally:
        if offline:
            datasets.config.HF_HUB_OFFLINE = saved
    if "messages" not in ds.column_names:
        raise DataError(f"Hub dataset {source!r}: no `messages` column (columns: {', '.join(ds.column_names)})")
    return [{"messages": m} for m in ds["messages"]]

