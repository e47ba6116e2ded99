"""A study's results: one SQLite database (``study.db``) per study folder.

Why SQLite: a batch of cells is committed in one transaction, so a crash (OOM, SIGKILL, power) loses at
most the batch in flight and a rerun resumes from ``pending()``. WAL mode + synchronous=FULL makes each
commit durable. The config is stored as canonical JSON with its sha256; reopening with a different
config is refused so one database never mixes two experiments.

Floats: per-step arrays are float64 little-endian BLOBs and read back exactly. SQLite has no NaN in
REAL columns (it stores NULL), so scalar losses that are NaN read back as NaN from NULL; NaN payloads
and signs are canonicalised to numpy's quiet NaN on write (they carry no information for a loss).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import functools
import hashlib
import json
import math
import os
import shutil
import socket
import sqlite3
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vmap_sweep.errors import ConfigError, StoreError
from vmap_sweep.study import criterion as criterion_rules
from vmap_sweep.study.config import newer_keys
from vmap_sweep.study.grid import Cell
from vmap_sweep.study.plan import shard_of_folder

DB_NAME = "study.db"
# Held (an OS lock, released when the process ends, however it ends) by the one process that trains a study.
LOCK_NAME = "study.lock"
# The extra key holding the criterion a study's classes follow, and the one every study starts with
# (study/criterion.py): the store reads it inside each commit (record_batch); store/extras.py for everyone else.
CRITERION = criterion_rules.KEY
# labeller(criterion, record) -> (label, score)
Labeller = Callable[[dict, Any], tuple[str, float]]
APP = "vmap-sweep"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE cells (
    i             INTEGER NOT NULL,
    j             INTEGER NOT NULL,
    x             REAL NOT NULL,
    y             REAL NOT NULL,
    hparams       TEXT NOT NULL,
    status        TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done')),
    steps         INTEGER,
    steps_done    INTEGER,
    initial_loss  REAL,
    final_loss    REAL,
    eval_loss     REAL,
    unstable      INTEGER,
    unstable_step INTEGER,
    trajectory    BLOB,
    base_losses   BLOB,
    grad_norms    BLOB,
    lrs           BLOB,
    wall_time     REAL,
    label         TEXT,
    score         REAL,
    batch_index   INTEGER,
    shard         TEXT,
    finished_at   TEXT,
    PRIMARY KEY (j, i)
) WITHOUT ROWID;
CREATE INDEX cells_status ON cells (status);
CREATE TABLE children (
    child_dir TEXT PRIMARY KEY,
    x0        REAL NOT NULL,
    x1        REAL NOT NULL,
    y0        REAL NOT NULL,
    y1        REAL NOT NULL,
    level     INTEGER NOT NULL,
    created   TEXT NOT NULL
);
CREATE TABLE extra (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Columns that hold a cell's training results (what merge compares; label/score are recomputable and
# wall_time/batch_index/shard/finished_at describe the run, not the result).
RESULT_COLUMNS = ("steps", "steps_done", "initial_loss", "final_loss", "eval_loss", "unstable",
                  "unstable_step", "trajectory", "base_losses", "grad_norms", "lrs")
_RUN_COLUMNS = ("wall_time", "label", "score", "batch_index", "shard", "finished_at")
ARRAY_FIELDS = ("trajectory", "base_losses", "grad_norms", "lrs")
NUMERIC_FIELDS = ("x", "y", "steps", "steps_done", "initial_loss", "final_loss", "eval_loss", "unstable",
                  "unstable_step", "wall_time", "score", "batch_index")
_FLOAT_FIELDS = ("x", "y", "initial_loss", "final_loss", "eval_loss", "wall_time", "score")


def shard_folders(directory: Path) -> list[str]:
    """The names of the shard studies (shard-K-of-N) a folder holds: the --out of a sharded run."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if shard_of_folder(p.name) and (p / DB_NAME).is_file())


def study_dir(path: str | os.PathLike) -> Path:
    """The study folder a path names: the folder itself, or the one holding the study.db it names."""
    path = Path(path)
    return path.parent if path.name == DB_NAME and not path.is_dir() else path


def canonical_json(config: Mapping[str, Any]) -> str:
    """The config as JSON with sorted keys and no whitespace: equal configs give equal text."""
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"study config can't be stored as JSON ({e}); use plain numbers, strings, "
                          "lists and dicts") from None


def config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


_MISSING = "<missing>"
# A cell's optimizer steps at most (study/config.py's MAX_STEPS_PER_CELL): a stored count beyond is no real run.
_MAX_STEPS = 100_000


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 6) -> str:
    """``key: old -> new`` for every differing (dotted) key, at most ``limit`` of them; never empty for configs
    whose stored texts differ (values are compared as stored: 1 and 1.0 differ)."""
    a = {k: json.dumps(v) for k, v in _flatten(json.loads(canonical_json(old))).items()}
    b = {k: json.dumps(v) for k, v in _flatten(json.loads(canonical_json(new))).items()}
    # an empty mapping on one side is no difference of its own where the other side lists what it holds
    shown = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
             and not (a.get(k, b.get(k)) == "{}" and any(x.startswith(f"{k}.") for x in (b if k in a else a)))]
    diffs = [f"{k}: {a.get(k, json.dumps(_MISSING))} -> {b.get(k, json.dumps(_MISSING))}" for k in shown]
    if not diffs:
        return f"the same settings, stored as other text: sha256 {config_hash(old)[:12]} -> {config_hash(new)[:12]}"
    more = f" (and {len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def live_run(directory: str | os.PathLike) -> dict[str, Any] | None:
    """Whether a process holds a study folder's lock (trains it now) and what it published there; None if none.
    The probe takes a shared lock for an instant, without blocking: it fails exactly while a trainer holds it."""
    try:
        fd = os.open(Path(directory) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None  # no lock file (never trained here) or unreadable: nothing to show
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.pread(fd, 4096, 0).decode(errors="replace")
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
    finally:
        os.close(fd)
    holder, _, rest = text.partition("\n")
    info: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        parsed = json.loads(rest) if rest.strip() else {}
        info = parsed if isinstance(parsed, dict) else {}
    return {**info, "holder": holder.strip() or "another process"}


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _to_blob(values: Any) -> bytes:
    a = np.array(values, dtype=np.float64).reshape(-1)
    a[np.isnan(a)] = np.nan  # canonical quiet NaN; see module docstring
    return a.astype("<f8", copy=False).tobytes()


def _from_blob(blob: bytes | None) -> np.ndarray:
    if blob is None:
        return np.empty(0, dtype=np.float64)
    return np.frombuffer(blob, dtype="<f8").astype(np.float64)


def _opt_float(v: Any) -> float | None:
    """None stays None (NULL); everything else a Python float (NaN becomes NULL in SQLite anyway)."""
    return None if v is None else float(v)


def _nan(v: float | None) -> float:
    return math.nan if v is None else float(v)


def _cell_key(key: Any) -> tuple[int, int]:
    if hasattr(key, "i") and hasattr(key, "j"):
        return int(key.i), int(key.j)
    i, j = key
    return int(i), int(j)


# -------------------------------------------------------------------- storage errors, named as what they are
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
_NEARLY_FULL = 1 << 20  # bytes free below which an I/O error is the disk being full
_RESTORE = "restore study.db from a backup (`sqlite3 study.db .recover | sqlite3 recovered.db` saves what is readable)"


def read_only_error(path: Path, why: str) -> StoreError:
    return StoreError(f"{path}: the study is read-only ({why}); status, plot, export, fractal and rules read it "
                      "as it is, but to train or label it make the folder and study.db writable (chmod u+w) or "
                      "copy the folder somewhere writable")


def storage_error(path: Path, e: sqlite3.Error) -> StoreError:
    """An SQLite error as the one line that says what happened to the study and what to do about it."""
    code = getattr(e, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    # a full disk reaches SQLite as SQLITE_FULL, or as an I/O error where its shared memory or log can't grow
    if primary == sqlite3.SQLITE_FULL or (primary == sqlite3.SQLITE_IOERR and _disk_nearly_full(path)):
        return StoreError(f"{path}: the disk is full ({e}); nothing of this write was stored: free space on that "
                          "disk (or move the study folder) and run the same command again, it resumes")
    if primary == sqlite3.SQLITE_READONLY:
        return read_only_error(path, str(e))
    if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return StoreError(f"{path} is damaged ({e}); {_RESTORE}")
    if primary == sqlite3.SQLITE_IOERR:
        return StoreError(f"{path}: the disk reported an I/O error ({e}); check the disk (and that it is not full "
                          "or unplugged), then run the same command again")
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreError(f"{path}: another process holds the database ({e}); wait for it to finish, then run again")
    if primary == sqlite3.SQLITE_CANTOPEN:
        return StoreError(f"{path}: can't open the database ({e}); check that the folder exists and is readable")
    if "no such table" in str(e) or "no such column" in str(e):
        return StoreError(f"{path}: its tables are not the ones vmap-sweep writes ({e}); it was edited: {_RESTORE}")
    return StoreError(f"{path}: the database can't be read ({e}); {_RESTORE}")


def _disk_nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path.parent).free < _NEARLY_FULL
    except OSError:
        return False


def _reads(method):
    """A StudyStore method whose SQLite errors (a damaged page, an edited table) become one named StoreError."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as e:
            raise storage_error(self.path, e) from None

    return wrapper


def _damaged(path: Path, what: str) -> StoreError:
    return StoreError(f"{path}: {what}; the database was edited or damaged: {_RESTORE}")


def _json(path: Path, text: Any, what: str) -> Any:
    """A JSON value the store wrote, read back; anything else is named as the damage it is."""
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        raise _damaged(path, f"{what} is not valid JSON") from None


@dataclass(frozen=True)
class Child:
    """A zoom: the window (in axis units) of this study that ``child_dir`` (relative) re-sweeps."""

    x0: float
    x1: float
    y0: float
    y1: float
    child_dir: str
    level: int
    created: str

    @property
    def window(self) -> tuple[float, float, float, float]:
        return (self.x0, self.x1, self.y0, self.y1)


class StudyStore:
    """One study's database. Open with ``create_or_open`` (runs) or ``open`` (analysis, merge)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, read_only: bool = False) -> None:
        self.path = path
        self.directory = path.parent
        self._conn = conn
        self.read_only = read_only  # opened read-only (the folder or file can't be written): writers refuse
        self._writer: int | None = None  # the lock file's descriptor while this process trains the study
        self._holder = ""
        self._task: dict = {}
        self._file = _identity(path)  # the database file this connection opened
        meta = _verified_meta(conn, path)
        stored = json.loads(meta["config"])
        self.config: dict[str, Any] = newer_keys(stored)
        if self.config == stored:
            self.config_json, self.config_hash = meta["config"], meta["config_hash"]
        else:  # a read-only older study, read under today's keys: its text and hash as a migration would write them
            self.config_json = canonical_json(self.config)
            self.config_hash = config_hash(self.config)
        self.created: str = meta["created"]
        self.study_id: str | None = meta.get("study_id")  # studies made before it was recorded have none
        self.nx = int(meta["nx"])
        self.ny = int(meta["ny"])
        self._grid_rows = _check_rows(conn, path, self.config, self.nx, self.ny)
        self._registered = self._file is not None
        if self._registered:
            _OPEN_HERE[self._file] = _OPEN_HERE.get(self._file, 0) + 1

    # ---------------------------------------------------------------- opening
    @classmethod
    def create_or_open(cls, directory: str | os.PathLike, config: Mapping[str, Any],
                       cells: Sequence[Cell]) -> StudyStore:
        """First call creates ``directory/study.db`` with the config and one pending row per cell;
        later calls reopen it if (and only if) the config is the same. Errors change nothing."""
        directory = Path(directory)
        text = canonical_json(config)
        digest = hashlib.sha256(text.encode()).hexdigest()
        if not cells:
            raise ConfigError(f"{directory}: a study needs at least one cell")
        keys = [(int(c.i), int(c.j)) for c in cells]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"{directory}: the cell list repeats a cell (i, j); build it with Grid.cells()")
        if directory.exists() and not directory.is_dir():
            raise StoreError(f"{directory}: a file, not a folder; give --out a new or empty folder for the study")
        if _foreign_folder(directory):  # a study goes into a new or empty folder, never among the user's files
            raise StoreError(f"{directory} is not empty and holds no study; choose an empty or new folder")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{directory}: can't create the study folder ({e.strerror or e}); "
                             "choose a writable --out") from None
        path = directory / DB_NAME
        if path.exists() and not path.is_file():
            raise StoreError(f"{path} is not a file; remove it or choose another --out")
        if not path.exists() and not os.access(directory, os.W_OK):
            raise StoreError(f"{directory}: folder is not writable; choose a writable --out")
        if path.exists() and not _writable(path):  # a study to resume, on read-only media or write-protected
            cls.open(directory).close()  # ... but still a study? (else that is the error to show)
            raise read_only_error(path, "its folder or study.db can't be written")
        if path.exists():
            check_own_journal(path)
        conn = _connect(path)
        try:
            if _is_empty(conn, path):
                _create(conn, path, text, digest, cells)
            else:
                _read_older_names(conn, path, read_only=False)
                _check_ours(conn, path)
                meta = _verified_meta(conn, path)
                if meta["config_hash"] != digest:
                    raise StoreError(
                        f"{path} was made with a different config ({config_diff(json.loads(meta['config']), config)}); "
                        "use a new --out folder for a new study, or the same options to resume this one")
                _check_cells(conn, path, cells)
                _pragmas(conn, path)
            return cls(path, conn)
        except sqlite3.Error as e:
            conn.close()
            raise storage_error(path, e) from None
        except BaseException:
            conn.close()
            raise

    @classmethod
    def open(cls, directory: str | os.PathLike) -> StudyStore:
        """Open an existing study (no config needed)."""
        directory = Path(directory)
        path = directory / DB_NAME if directory.is_dir() or not directory.exists() else directory
        if path.exists() and not path.is_file():
            raise StoreError(f"{path}: not a regular file (a folder, named pipe, device or socket), so not a study "
                             "database; pass the folder a run wrote (its --out)")
        if not path.is_file():
            parts = shard_folders(directory)
            if parts:  # the --out of a sharded run: its parts are the studies
                raise StoreError(f"{directory}: no {DB_NAME} here, but the shards {', '.join(parts)}; give one of "
                                 f"them, or `vmap-sweep merge` them into one study")
            raise StoreError(f"{directory}: no {DB_NAME} here; is this a study folder (the --out of a run)?")
        if path.name != DB_NAME:
            raise StoreError(f"{directory}: a file, not a study folder; pass the folder a run wrote (its --out)")
        read_only = not _writable(path)
        check_own_journal(path)
        conn = _connect(path, read_only)
        try:
            if _is_empty(conn, path):
                raise StoreError(f"{path} is not a vmap-sweep study database (it is empty); pass the folder a "
                                 "run wrote (its --out)")
            _read_older_names(conn, path, read_only)
            _check_ours(conn, path)
            if not read_only:
                _pragmas(conn, path)
            return cls(path, conn, read_only)
        except sqlite3.Error as e:
            conn.close()
            raise storage_error(path, e) from None
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        if self._registered:
            self._registered = False
            _OPEN_HERE[self._file] -= 1
            if not _OPEN_HERE[self._file]:
                del _OPEN_HERE[self._file]
        self._conn.close()
        if self._writer is not None:
            os.close(self._writer)  # releases the lock
            self._writer = None

    def claim_writer(self, task: str | None = None) -> None:
        """Make this process the study's only trainer until close(). Another process that trains it (a second
        `run` or `zoom`) is refused at once, naming the holder; readers are never blocked. The lock is the OS's,
        so a killed process leaves none behind."""
        if self.read_only:
            raise read_only_error(self.path, "its folder or study.db can't be written")
        links = _link_count(self.path)
        if links > 1:  # another name of the same file, in a folder whose lock this one can't see
            raise StoreError(f"{self.path} has {links} hard links: the same database is reachable under another "
                             "name, so a second run could train it unseen; train a copy (cp, not cp -l or ln)")
        lock = lock_path(self.path)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"{lock}: can't take the study's lock ({e.strerror or e}); make "
                             "the study folder writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 300).decode(errors="replace").strip().split("\n")[0] or "another process"
            os.close(fd)
            where = self.directory if lock.parent == self.directory.resolve() else \
                f"{self.directory} (its study.db is {self.path.resolve()})"
            raise StoreError(f"{where} is being trained by {holder}; wait for it to finish (or stop it), "
                             "then run again: `vmap-sweep status` shows its progress") from None
        self._holder = f"pid {os.getpid()} on {socket.gethostname()} since {_now()}"
        self._task = {"task": task} if task else {}  # what other processes may ask of the holder (live_run)
        os.ftruncate(fd, 0)
        os.write(fd, (f"{self._holder}\n{json.dumps(self._task)}\n" if task else self._holder).encode())
        self._writer = fd

    def publish_progress(self, info: Mapping[str, Any]) -> None:
        """While this process trains the study: its progress (JSON) as the lock file's second line, under the
        holder's, for `status` in another process (live_run). Never raises: progress is not a result."""
        if self._writer is None:
            return
        data = f"{self._holder}\n{json.dumps({**dict(info), **self._task}, sort_keys=True)}\n".encode()
        with contextlib.suppress(OSError):
            os.pwrite(self._writer, data, 0)
            os.ftruncate(self._writer, len(data))

    def live_run(self) -> dict[str, Any] | None:
        """The process training this study now, if any (its lock is held): {"holder": "pid N on HOST since T",
        and what it last published: batch, batches, done, total, eta_seconds, updated}; None when none is."""
        return live_run(self.directory)

    def __enter__(self) -> StudyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it commits or none of it does; refused if the database file was
        deleted or replaced since it was opened (SQLite would go on writing into the unlinked file, and the
        results would be lost without a word)."""
        if _identity(self.path) != self._file:
            raise StoreError(f"{self.path} was deleted or replaced while this process had it open; nothing more is "
                             "written to it. Restore the folder from a backup or start again with a new --out")
        if self.read_only:
            raise read_only_error(self.path, "its folder or study.db can't be written")
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise storage_error(self.path, e) from None
        try:
            yield self._conn
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            raise storage_error(self.path, e) from None
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            raise
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            raise storage_error(self.path, e) from None

    # ---------------------------------------------------------------- writing
    def record_batch(self, results: Iterable[tuple[Any, Any]], batch_index: int | None = None,
                     shard: str | None = None, labeller: Labeller | None = None) -> list[str | None]:
        """Store the results of one batch atomically. ``results``: (Cell or (i, j), CellRecord-like).

        ``labeller(criterion, record) -> (label, score)`` classifies each record by the criterion the study
        holds at the moment of this commit (read inside its transaction), so that results and classes commit
        together and a `classify` that lands between two batches is followed by the next one.
        Refuses (and writes nothing) if any cell is unknown or already done. Returns the stored labels."""
        now = _now()
        results = list(results)
        rows = []
        for key, rec in results:
            i, j = _cell_key(key)
            losses = np.array(rec.losses, dtype=np.float64).reshape(-1)
            ds = rec.unstable_step
            rows.append({
                "i": i, "j": j, "steps": int(rec.steps), "steps_done": int(rec.steps_done),
                "initial_loss": _opt_float(rec.initial_loss),
                "final_loss": float(losses[-1]) if len(losses) else None,
                "eval_loss": _opt_float(rec.eval_loss),
                "unstable": int(bool(rec.unstable)), "unstable_step": None if ds is None else int(ds),
                "trajectory": _to_blob(losses), "grad_norms": _to_blob(rec.grad_norms),
                "base_losses": _to_blob(rec.base_losses), "lrs": _to_blob(rec.lrs),
                "wall_time": _opt_float(rec.wall_time), "batch_index": batch_index, "shard": shard,
                "finished_at": now, "label": None, "score": None,
            })
        with self._tx() as conn:
            if labeller is not None:
                criterion = self._criterion(conn)
                for r, (_, rec) in zip(rows, results, strict=True):
                    label, score = labeller(criterion, rec)
                    r["label"], r["score"] = label, _opt_float(score)
            for r in rows:
                self._require(conn, r["i"], r["j"], want="pending")
                conn.execute(
                    "UPDATE cells SET status='done', steps=:steps, steps_done=:steps_done, "
                    "initial_loss=:initial_loss, final_loss=:final_loss, eval_loss=:eval_loss, "
                    "unstable=:unstable, unstable_step=:unstable_step, trajectory=:trajectory, "
                    "base_losses=:base_losses, "
                    "grad_norms=:grad_norms, lrs=:lrs, wall_time=:wall_time, batch_index=:batch_index, "
                    "shard=:shard, finished_at=:finished_at, label=:label, score=:score WHERE i=:i AND j=:j", r)
        return [r["label"] for r in rows]

    def _criterion(self, conn: sqlite3.Connection) -> dict:
        row = conn.execute("SELECT value FROM extra WHERE key=?", (CRITERION,)).fetchone()
        return dict(criterion_rules.DEFAULT if row is None else self._extra_value(CRITERION, row[0]))

    def _extra_value(self, key: str, text: Any) -> Any:
        value = _json(self.path, text, f"extra {key!r}")
        if not isinstance(value, dict) or "v" not in value:
            raise _damaged(self.path, f"extra {key!r} is not what vmap-sweep stores")
        v = value["v"]
        # a criterion stored under an older option name reads under today's, for every reader (classes, merge)
        return criterion_rules.newer_form(v) if key == CRITERION and isinstance(v, dict) else v

    def _require(self, conn: sqlite3.Connection, i: int, j: int, want: str) -> None:
        row = conn.execute("SELECT status FROM cells WHERE i=? AND j=?", (i, j)).fetchone()
        if row is None:
            raise StoreError(f"{self.path}: cell ({i}, {j}) is not in this study ({self.nx}x{self.ny})")
        if want == "pending" and row[0] == "done":
            raise StoreError(f"{self.path}: cell ({i}, {j}) is already done; two runs writing one study? "
                             "Give each run its own --shard or --out")
        if want == "done" and row[0] != "done":
            raise StoreError(f"{self.path}: cell ({i}, {j}) is still pending; only done cells get labels")

    def relabel(self, classify: Callable[[list[dict[str, Any]]], Mapping[Any, tuple[str, float]]],
                criterion: dict, check: Callable[[], None] | None = None) -> Mapping[Any, tuple[str, float]]:
        """Every done cell's (label, score) as `classify` computes it from `rows(arrays=True)`, and the criterion
        they follow, in one transaction: read and written with no commit between, all or nothing. check: run
        first inside the transaction, to refuse (raise) on what no other writer can change meanwhile."""
        with self._tx() as conn:
            if check is not None:
                check()
            labels = classify(self.rows(arrays=True))
            for key, (label, score) in labels.items():
                i, j = _cell_key(key)
                conn.execute("UPDATE cells SET label=?, score=? WHERE i=? AND j=? AND status='done'",
                             (str(label), _opt_float(score), i, j))
            conn.execute("INSERT OR REPLACE INTO extra VALUES (?, ?)", (CRITERION, canonical_json({"v": criterion})))
        return labels

    def add_child(self, window: tuple[float, float, float, float], child_dir: str, level: int) -> Child:
        """Register a zoom child (``child_dir`` relative to this study's folder). Idempotent for the
        same window; a different window for the same folder is refused."""
        x0, x1, y0, y1 = (float(v) for v in window)
        inside(self.directory, str(child_dir), f"{self.path}: zoom child {str(child_dir)!r}")
        with self._tx() as conn:
            old = conn.execute("SELECT x0, x1, y0, y1, level FROM children WHERE child_dir=?",
                               (str(child_dir),)).fetchone()
            if old is None:
                conn.execute("INSERT INTO children VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (str(child_dir), x0, x1, y0, y1, int(level), _now()))
            elif tuple(old) != (x0, x1, y0, y1, int(level)):
                raise StoreError(f"{self.path}: zoom folder {child_dir!r} already holds window "
                                 f"{tuple(old[:4])} (level {old[4]}); choose another folder for window "
                                 f"{(x0, x1, y0, y1)}")
        return next(c for c in self.children() if c.child_dir == str(child_dir))

    @_reads
    def children(self) -> list[Child]:
        """The zoom children, each checked to lie inside this study's folder (see `inside`)."""
        rows = self._conn.execute(
            "SELECT x0, x1, y0, y1, child_dir, level, created FROM children "
            "ORDER BY level, created, child_dir")
        children = [Child(*r) for r in rows]
        for c in children:
            inside(self.directory, c.child_dir, f"{self.path}: zoom child {c.child_dir!r}")
        return children

    def child_folder(self, child: Child) -> Path:
        """The folder of a zoom child: this study's folder joined with the relative path it records."""
        return inside(self.directory, child.child_dir, f"{self.path}: zoom child {child.child_dir!r}")

    def put_extra(self, key: str, value: Any) -> None:
        """Store any JSON-serialisable value under ``key`` (overwrites)."""
        text = canonical_json({"v": value})
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO extra VALUES (?, ?)", (str(key), text))

    def get_extra_settled(self, key: str, default: Any = None) -> Any:
        """An extra as it stands once every write begun before this read has committed (read in a write
        transaction: a relabel under way finishes first)."""
        with self._tx():
            return self.get_extra(key, default)

    @_reads
    def get_extra(self, key: str, default: Any = None) -> Any:
        row = self._conn.execute("SELECT value FROM extra WHERE key=?", (str(key),)).fetchone()
        return default if row is None else self._extra_value(str(key), row[0])

    @_reads
    def extras(self) -> dict[str, Any]:
        rows = self._conn.execute("SELECT key, value FROM extra ORDER BY key")
        return {k: self._extra_value(k, v) for k, v in rows}

    # ---------------------------------------------------------------- reading
    @_reads
    def _cells(self, where: str = "") -> list[Cell]:
        rows = self._conn.execute(f"SELECT i, j, x, y, hparams FROM cells {where} ORDER BY j, i")
        return [Cell(i, j, x, y, self._hparams(i, j, hp)) for i, j, x, y, hp in rows]

    def _hparams(self, i: int, j: int, text: Any) -> dict:
        rows = self._grid_rows
        if rows is not None and rows.parsed is not None and rows.has(i, j) and text == rows.text(i, j):
            return rows.hparams(i, j)  # the text the store writes for this cell
        hparams = _json(self.path, text, f"cell ({i}, {j})'s hparams")
        if not isinstance(hparams, dict):
            raise _damaged(self.path, f"cell ({i}, {j})'s hparams are not a JSON object")
        return hparams

    def cells(self) -> list[Cell]:
        """All cells, row-major (j, i)."""
        return self._cells()

    def pending(self) -> list[Cell]:
        """Cells not done yet, row-major (j, i): what a resumed run still has to train."""
        return self._cells("WHERE status='pending'")

    @_reads
    def done_count(self) -> int:
        return self._conn.execute("SELECT count(*) FROM cells WHERE status='done'").fetchone()[0]

    @_reads
    def cell_count(self) -> int:
        return self._conn.execute("SELECT count(*) FROM cells").fetchone()[0]

    @_reads
    def shard_labels(self) -> set[str | None]:
        """The shards ("K/N") the done cells were trained in; None for cells trained outside a split."""
        return {s for (s,) in self._conn.execute("SELECT DISTINCT shard FROM cells WHERE status='done'")}

    @_reads
    def label_counts(self) -> dict[str, int]:
        """Done cells per label; done cells without a label count as 'unlabelled'."""
        rows = self._conn.execute(
            "SELECT coalesce(label, 'unlabelled'), count(*) FROM cells WHERE status='done' "
            "GROUP BY 1 ORDER BY 1")
        return dict(rows.fetchall())

    @_reads
    def grid_arrays(self, field: str) -> np.ndarray:
        """(ny, nx) float64 array of a numeric field; NaN where pending (x and y are always filled)."""
        if field not in NUMERIC_FIELDS:
            raise ConfigError(f"unknown field {field!r}; numeric fields: {', '.join(NUMERIC_FIELDS)}")
        out = np.full((self.ny, self.nx), np.nan)
        where = "" if field in ("x", "y") else "WHERE status='done'"
        for i, j, v in self._conn.execute(f"SELECT i, j, {field} FROM cells {where}"):
            out[j, i] = self._number(i, j, field, v)
        return out

    def _number(self, i: int, j: int, field: str, value: Any) -> float:
        """A stored number as a float (NULL: NaN); text or a blob where a number belongs is damage, named."""
        if isinstance(value, bool) or not isinstance(value, int | float | None):
            raise _damaged(self.path, f"cell ({i}, {j})'s {field} is {value!r:.40}, not a number")
        return _nan(value)

    @_reads
    def labels_array(self) -> np.ndarray:
        """(ny, nx) str array of labels; '' where pending or unlabelled."""
        out = [[""] * self.nx for _ in range(self.ny)]
        for i, j, lab in self._conn.execute("SELECT i, j, label FROM cells WHERE label IS NOT NULL"):
            out[j][i] = lab
        return np.array(out, dtype=str)

    @_reads
    def trajectories(self, field: str = "trajectory") -> dict[tuple[int, int], np.ndarray]:
        """Per-step arrays of done cells: training losses (default), ``base_losses`` (the base model's loss
        on the same batches), ``grad_norms`` or ``lrs``."""
        if field not in ARRAY_FIELDS:
            raise ConfigError(f"unknown per-step field {field!r}; use one of {', '.join(ARRAY_FIELDS)}")
        rows = self._conn.execute(f"SELECT i, j, {field} FROM cells WHERE status='done' ORDER BY j, i")
        return {(i, j): self._array(i, j, field, b) for i, j, b in rows}

    def _array(self, i: int, j: int, field: str, blob: Any) -> np.ndarray:
        """A per-step array as stored: whole float64s, else the cell is named as damaged."""
        if blob is not None and (not isinstance(blob, bytes) or len(blob) % 8):
            size = f"{len(blob)} bytes" if isinstance(blob, bytes) else f"a {type(blob).__name__}"
            raise _damaged(self.path, f"cell ({i}, {j})'s {field} is {size}, not whole float64 values")
        return _from_blob(blob)

    @_reads
    def rows(self, arrays: bool = False, done_only: bool = False) -> list[dict[str, Any]]:
        """Every cell (with ``done_only``, every done cell) as a dict, row-major. Missing floats are NaN, missing ints
        None; with ``arrays`` also trajectory, base_losses, grad_norms and lrs (empty when pending)."""
        cols = ["i", "j", "x", "y", "hparams", "status", *RESULT_COLUMNS[:7], *_RUN_COLUMNS]
        if arrays:
            cols += list(ARRAY_FIELDS)
        out = []
        where = "WHERE status='done'" if done_only else ""
        for r in self._conn.execute(f"SELECT {', '.join(cols)} FROM cells {where} ORDER BY j, i"):
            d = dict(zip(cols, r, strict=True))
            d["hparams"] = self._hparams(d["i"], d["j"], d["hparams"])
            for f in _FLOAT_FIELDS:
                d[f] = self._number(d["i"], d["j"], f, d[f])
            d["unstable"] = None if d["unstable"] is None else bool(d["unstable"])
            for f in ARRAY_FIELDS if arrays else ():
                d[f] = self._array(d["i"], d["j"], f, d[f])
            out.append(d)
        return out

    @_reads
    def _raw_done(self) -> dict[tuple[int, int], dict[str, Any]]:
        cols = ["i", "j", *RESULT_COLUMNS, *_RUN_COLUMNS]
        rows = self._conn.execute(f"SELECT {', '.join(cols)} FROM cells WHERE status='done'")
        return {(r[0], r[1]): dict(zip(cols, r, strict=True)) for r in rows}

    @_reads
    def integrity_check(self) -> str:
        return self._conn.execute("PRAGMA integrity_check").fetchone()[0]


# -------------------------------------------------------------------- every row, checked once when opened
def _check_rows(conn: sqlite3.Connection, path: Path, config: Mapping[str, Any], nx: int,
                ny: int) -> _GridRows | None:
    """Every cell row as vmap-sweep writes it, else the first bad one named by its cell: its coordinates and
    hyperparameters those of the study's grid (and of each other), and its results of the types and ranges a run
    stores (step counts, losses, flags, labels). Every command reads a study through here, so an edited row is
    refused before status, export, plot, fractal or rules could trust it. Per-step arrays are checked as they
    are read (`_array`)."""
    expected = _grid_rows(config, nx, ny)
    rows = conn.execute(
        "SELECT i, j, x, y, hparams, status, steps, steps_done, initial_loss, final_loss, eval_loss, unstable, "
        "unstable_step, typeof(trajectory), length(trajectory), label, score, length(base_losses) "
        "FROM cells ORDER BY j, i").fetchall()
    for (i, j, x, y, hparams, status, steps, steps_done, initial, final, evals, unstable, unstable_step,
         kind, size, label, score, base_size) in rows:
        why = _bad_row(i, j, x, y, hparams, expected)
        if why is None and status == "done":
            why = _bad_result(steps, steps_done, (initial, final, evals), unstable, unstable_step, kind, size,
                              label, score)
        if why is None and status == "done" and kind == "blob" and isinstance(size, int):
            why = _bad_lengths(size, base_size, initial)
        if why is not None:
            raise _damaged(path, f"cell ({i}, {j}){why}")
    return expected


class _GridRows:
    """The cells a study's grid holds, as its rows must hold them: coordinates, and hyperparameters as the JSON
    text the store writes. The text comes from one template per grid, so that a 1017² level's million rows are
    checked, and read, without a JSON parse each."""

    _MARK = "\x00vmap-sweep axis {}\x00"

    def __init__(self, grid):
        self.grid, self.xs, self.ys = grid, grid.xs.tolist(), grid.ys.tolist()
        x_text = [json.dumps(grid.x.convert(v)) for v in self.xs]
        y_text = [json.dumps(grid.y.convert(v)) for v in self.ys]
        marks = {grid.x.name: self._MARK.format("x"), grid.y.name: self._MARK.format("y")}
        template = canonical_json({**grid.base, **marks})
        x_mark, y_mark = (json.dumps(marks[a.name], ensure_ascii=False) for a in (grid.x, grid.y))
        self.texts, self.parsed = None, None
        if template.count(x_mark) != 1 or template.count(y_mark) != 1:
            return  # never for a real config; every row then takes the JSON comparison
        swap = template.index(y_mark) < template.index(x_mark)
        first, second = (y_mark, x_mark) if swap else (x_mark, y_mark)
        head, rest = template.split(first)
        middle, tail = rest.split(second)
        self.texts = (head, middle, tail, y_text if swap else x_text, x_text if swap else y_text, swap)
        # a row of this text parses to the template's object (its keys in its order) with the axes' values in it;
        # rows share the template's values, so only where none of them could be changed in place
        parsed = json.loads(template)
        if all(isinstance(v, str | int | float | bool | None) for v in parsed.values()):
            self.parsed = (parsed, [json.loads(t) for t in x_text], [json.loads(t) for t in y_text])

    def has(self, i: Any, j: Any) -> bool:
        return (isinstance(i, int) and isinstance(j, int) and 0 <= i < self.grid.nx and 0 <= j < self.grid.ny)

    def text(self, i: int, j: int) -> str | None:
        if self.texts is None:
            return None
        head, middle, tail, first, second, swap = self.texts
        a, b = (j, i) if swap else (i, j)
        return head + first[a] + middle + second[b] + tail

    def hparams(self, i: int, j: int) -> dict:
        """json.loads(self.text(i, j)), without parsing it."""
        template, xs, ys = self.parsed
        out = dict(template)
        out[self.grid.x.name], out[self.grid.y.name] = xs[i], ys[j]
        return out


def _grid_rows(config: Mapping[str, Any], nx: int, ny: int) -> _GridRows | None:
    """The cells the config's grid holds; None for a config that is not a study's (tests' stores)."""
    from vmap_sweep.study.axes import parse_axis_spec
    from vmap_sweep.study.grid import Grid

    try:
        return _GridRows(Grid(parse_axis_spec(config["x"]), parse_axis_spec(config["y"]), nx, ny,
                              dict(config.get("fixed") or {}), int(config.get("seq_len") or 1)))
    except (KeyError, TypeError, ValueError, AttributeError, ConfigError):
        return None


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _bad_row(i: Any, j: Any, x: Any, y: Any, hparams: Any, expected: _GridRows | None) -> str | None:
    if not (_is_number(x) and _is_number(y)):
        return f" has coordinates {x!r:.40}, {y!r:.40}, not numbers"
    if expected is None:
        return None
    if not expected.has(i, j):
        return " is not a cell of the study's grid"
    want_x, want_y = expected.xs[i], expected.ys[j]
    if not (math.isclose(x, want_x, rel_tol=1e-12) and math.isclose(y, want_y, rel_tol=1e-12)):
        return f" sits at ({x:.6g}, {y:.6g}), but the study's grid puts it at ({want_x:.6g}, {want_y:.6g})"
    if hparams == expected.text(i, j):  # as the store writes it
        return None
    try:
        stored = json.loads(hparams)
    except (TypeError, ValueError, RecursionError):
        return None  # named as invalid JSON where the hparams are read
    want = expected.grid.cell(i, j).hparams
    if stored != json.loads(canonical_json(want)):
        keys = sorted(k for k in set(stored) | set(want) if stored.get(k) != want.get(k)) \
            if isinstance(stored, dict) else ["(not an object)"]
        return (f" has hyperparameters that disagree with its coordinates and the study's config "
                f"({', '.join(f'{k}={stored.get(k) if isinstance(stored, dict) else stored!r}' for k in keys[:3])}, "
                f"the grid says {', '.join(f'{k}={want.get(k)!r}' for k in keys[:3])})")
    return None


def _bad_lengths(size: int, base_size: Any, initial: Any) -> str | None:
    """A finished run's losses: at least one, the base model's losses one per loss (or none, in studies made before
    they were stored), and an initial loss above 0."""
    if size % 8 or (isinstance(base_size, int) and base_size % 8):
        return None  # not whole float64s: named where the array is read (`_array`)
    if size == 0:
        return " holds no loss, though it is done (a run stores at least the loss of its first step)"
    if isinstance(base_size, int) and base_size not in (0, size):
        return f" holds {base_size // 8} base-model losses for its {size // 8} losses (one each)"
    if _is_number(initial) and initial <= 0:
        return f" has initial_loss {initial!r}: the loss before any update is above 0"
    return None


def _bad_result(steps: Any, steps_done: Any, losses: tuple, unstable: Any, unstable_step: Any, kind: str,
                size: Any, label: Any, score: Any) -> str | None:
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= _MAX_STEPS:
        return f" has {steps!r:.40} steps; a run takes 1 to {_MAX_STEPS:,}"
    if not isinstance(steps_done, int) or not 0 <= steps_done <= steps:
        return f" has {steps_done!r:.40} steps done of its {steps}"
    for name, v in zip(("initial_loss", "final_loss", "eval_loss"), losses, strict=True):
        if v is not None and not _is_number(v):
            return f"'s {name} is {v!r:.40}, not a number"
        if v is not None and v < 0:  # a cross-entropy is never negative (inf and NaN are a divergence's)
            return f" has {name} {v!r}, below 0, which no cross-entropy loss is"
    if unstable not in (0, 1):
        return f" has unstable={unstable!r:.40}, not 0 or 1"
    if unstable_step is not None and (not isinstance(unstable_step, int) or not 0 <= unstable_step <= steps):
        return f" stopped at step {unstable_step!r:.40}, outside its {steps} steps"
    if kind == "blob" and isinstance(size, int) and size % 8 == 0 and size // 8 > steps + 1:
        return f" holds {size // 8} losses for its {steps} steps"
    if label is not None and label not in criterion_rules.LABELS:
        return f" is labelled {label!r:.40}; a class is one of {', '.join(criterion_rules.LABELS)}"
    if score is not None and not _is_number(score):
        return f" has score {score!r:.40}, not a number"
    return None


# -------------------------------------------------------------------- the study's own lock and journal
def lock_path(path: Path) -> Path:
    """The lock file of the database at `path`: beside the file itself, wherever `path` reaches it from (a
    study.db that is a symbolic link into a study being trained is that study, and waits for its lock)."""
    return path.resolve().parent / LOCK_NAME


def _link_count(path: Path) -> int:
    try:
        return os.stat(path).st_nlink
    except OSError:
        return 1


def being_trained(path: Path) -> bool:
    """Whether a process holds the training lock of the database at `path` now (without taking it)."""
    try:
        fd = os.open(lock_path(path), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


_WAL_HEADER = 32  # bytes of a write-ahead log's header; a log no longer than it holds no commit
# (device, inode) of every study database this process has open: its log is this process's own
_OPEN_HERE: dict[tuple[int, int], int] = {}
# Every SQLite connection to a database in WAL mode holds a shared POSIX lock on this byte of its -shm file
# (os_unix.c: UNIX_SHM_DMS) for as long as it is open.
_SHM_DMS = 128


def _open_elsewhere(path: Path) -> bool:
    """Whether a connection of another process has the database open now (its log is then that connection's,
    live). Asked with F_GETLK, which takes no lock; Linux's struct flock layout."""
    shm = path.with_name(path.name + "-shm")
    if not sys.platform.startswith("linux") or not shm.is_file():
        return False
    try:
        fd = os.open(shm, os.O_RDONLY)
    except OSError:
        return False
    try:
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, _SHM_DMS, 1, 0)
        return struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, query))[0] != fcntl.F_UNLCK
    except OSError:
        return False
    finally:
        os.close(fd)


def check_own_journal(path: Path) -> None:
    """Refuse a journal beside study.db that is not the study's own, before SQLite replays it into the study.

    SQLite replays whatever ``study.db-wal`` (or hot ``study.db-journal``) lies beside a database when it opens it,
    even for a read: a study restored from a backup beside another study's (or an older) log would be replaced by
    that log's pages, silently. A study never uses a rollback journal (it is in WAL mode from its first write), so
    a non-empty ``-journal`` is never its own. A log is its own if replaying it, in a scratch copy, leaves the same
    study with every result it already holds (a log only adds results); one being written by the study's trainer
    right now is its own by construction."""
    journal = path.with_name(path.name + "-journal")
    if os.path.lexists(journal) and (not journal.is_file() or journal.stat().st_size > 0):
        raise StoreError(f"{journal}: a rollback journal beside {path.name}, which a study never writes (it is not "
                         f"this study's own): SQLite would roll it into the study; move it away, then run again")
    wal = path.with_name(path.name + "-wal")
    if not os.path.lexists(wal):
        return
    if wal.is_symlink() or not wal.is_file():
        raise StoreError(f"{wal}: not a plain file (a link, folder or pipe where the study's write-ahead log "
                         "belongs), so not this study's own log; move it away, then run again")
    if wal.stat().st_size <= _WAL_HEADER or _identity(path) in _OPEN_HERE or being_trained(path) \
            or _open_elsewhere(path):
        return
    for _ in range(2):  # a writer that checkpoints during the copy can tear it once; a foreign log stays
        why = _foreign_log(path, wal)
        if why is None:
            return
    raise StoreError(f"{wal} is not this study's own write-ahead log ({why}): SQLite would replay it over "
                     f"{path.name} and lose its results; move {wal.name} (and {path.name}-shm) away, then run again")


def _foreign_log(path: Path, wal: Path) -> str | None:
    """Why replaying `wal` over `path` would change what the study already holds, or None if it would not."""
    import tempfile

    try:
        before = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
    except sqlite3.Error:
        return None
    with tempfile.TemporaryDirectory(prefix="vmap-sweep-log-") as scratch:
        copy = Path(scratch) / DB_NAME
        try:
            shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
            shutil.copyfile(path, copy)
        except OSError:
            before.close()
            return None  # can't tell here: the open that follows names what is wrong with the files
        after = sqlite3.connect(copy)
        try:
            return _lost_by_replay(before, after)
        finally:
            before.close()
            after.close()


def _lost_by_replay(before: sqlite3.Connection, after: sqlite3.Connection) -> str | None:
    try:
        tables = {r[0] for r in before.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error:
        return None  # study.db alone is not readable: nothing a log could lose; the open names it
    if not {"meta", "cells", "children"} <= tables:
        return None  # a study whose first commit is still in its log
    try:
        meta_before = dict(before.execute("SELECT key, value FROM meta"))
        meta_after = dict(after.execute("SELECT key, value FROM meta"))
    except sqlite3.Error as e:
        return f"with it, the study can't be read: {e}"
    if meta_before != meta_after:
        changed = sorted(k for k in set(meta_before) | set(meta_after) if meta_before.get(k) != meta_after.get(k))
        return f"it would change the study's {', '.join(changed)}"
    cols = ", ".join(RESULT_COLUMNS)
    query = f"SELECT i, j, {cols} FROM cells WHERE status='done' ORDER BY j, i"
    try:
        done_after = after.execute(f"SELECT i, j, {cols} FROM cells WHERE status='done' ORDER BY j, i")
        lost = 0
        row_after = next(done_after, None)
        for row in before.execute(query):
            while row_after is not None and (row_after[1], row_after[0]) < (row[1], row[0]):
                row_after = next(done_after, None)
            if row_after is None or row_after != row:
                lost += 1
        children = set(before.execute("SELECT child_dir, x0, x1, y0, y1, level FROM children"))
        children -= set(after.execute("SELECT child_dir, x0, x1, y0, y1, level FROM children"))
    except sqlite3.Error as e:
        return f"with it, the study can't be read: {e}"
    if lost:
        return f"it would undo or change {lost} finished cell(s)"
    if children:
        return f"it would drop {len(children)} zoom child(ren)"
    return None


# -------------------------------------------------------------------- outputs
STUDY_FILES = (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", f"{DB_NAME}-journal", LOCK_NAME)
# how a SQLite database, its write-ahead log (either byte order) and its shared-memory index begin
_DATABASE_HEADS = (SQLITE_MAGIC, b"\x37\x7f\x06\x82", b"\x37\x7f\x06\x83", b"\x18\xe2\x2d\x00")


def check_output(path: str | os.PathLike) -> Path:
    """`path`, refused where writing it would overwrite a study's own file: its database, journals or lock, reached
    by name, by a symbolic link or by a hard link under another name (an existing file that begins as a SQLite
    database, log or shared-memory index does). Every file a command writes (pictures, reports, exports, JSON)
    passes here first."""
    path = Path(path)
    target = path.resolve()
    why = None
    if target.name in STUDY_FILES:
        why = f"it is {target}" if target != path.absolute() else f"its name is a study's {target.name}"
    else:
        try:
            with open(target, "rb") as f:
                head = f.read(len(SQLITE_MAGIC)) if target.is_file() else b""
        except OSError:
            head = b""
        if any(head.startswith(h) for h in _DATABASE_HEADS):
            why = f"{target} is a SQLite database or one of its journals"
    if why is not None:
        raise ConfigError(f"{path}: an output may not replace a study's own file ({why}); choose another file name")
    return path


# -------------------------------------------------------------------- helpers
def inside(folder: Path, relative: Any, what: str) -> Path:
    """``folder / relative`` for a path read from a study's database, refused unless it is a relative path that
    stays below ``folder`` (symbolic links followed): a hand-edited ``../..`` or absolute path would make merge
    copy, classify relabel and zoom write another folder than the study's own."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise StoreError(f"{what}: not a folder name; the database was edited: remove that row, or {_RESTORE}")
    path = folder / relative
    if Path(relative).is_absolute() or not path.resolve().is_relative_to(folder.resolve()) \
            or path.resolve() == folder.resolve():
        raise StoreError(f"{what} leads outside the study folder {folder}; the database was edited: remove that "
                         f"row, or {_RESTORE}")
    return path


def _connect(path: Path, read_only: bool = False) -> sqlite3.Connection:
    """A connection to write through, or (read_only) one that only reads: on read-only media SQLite can't make the
    shared-memory file WAL readers use, so there the file is read as immutable (nobody can change it anyway)."""
    try:
        if not read_only:
            return sqlite3.connect(str(path), isolation_level=None, timeout=30.0)
        uri = path.resolve().as_uri()
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None, timeout=30.0)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN):
                return conn  # not about writing: the checks that follow name it
            conn.close()
            wal = path.with_name(path.name + "-wal")
            if wal.is_file() and wal.stat().st_size:  # immutable would read past the commits the log holds
                raise StoreError(f"{path}: the study is read-only and {wal.name} beside it holds commits not yet in "
                                 "study.db, which SQLite can't read without writing; make the folder writable once, or "
                                 "copy it somewhere writable") from None
            conn = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None)
        return conn
    except sqlite3.Error as e:
        raise StoreError(f"{path}: can't open ({e}); choose a writable --out") from None


def _writable(path: Path) -> bool:
    """Whether this process may write the study database at `path` (and the journal files beside it)."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at path now, None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _foreign_folder(directory: Path) -> bool:
    """An existing folder with entries but no study.db: the user's files, not a study (new or empty folders are
    fine, and a study folder resumes)."""
    if not directory.is_dir() or (directory / DB_NAME).exists():
        return False
    try:
        return any(True for _ in directory.iterdir())
    except OSError:  # unreadable: the writability checks below say what is wrong
        return False


def _is_sqlite(path: Path) -> bool:
    """Whether the file starts as every SQLite database does (an empty file is a new database)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError:
        return True  # can't tell: let SQLite's own error speak
    return head in (b"", SQLITE_MAGIC)


def holds_schema(directory: str | os.PathLike) -> bool:
    """A study.db in `directory` with a schema: not missing, and not the empty file that a process killed while
    creating a study leaves (creating it again goes on from there). Unreadable or foreign files count as
    holding one: opening them names what is wrong."""
    path = Path(directory) / DB_NAME
    if not path.is_file():
        return False
    try:
        conn = _connect(path, read_only=not _writable(path))  # a writer's connection leaves no -wal/-shm behind
        try:
            return not _is_empty(conn, path)
        finally:
            conn.close()
    except (sqlite3.Error, StoreError):
        return True


def _is_empty(conn: sqlite3.Connection, path: Path) -> bool:
    """True for a new (or zero-length) database with no schema at all."""
    try:
        return conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    except sqlite3.Error as e:
        if not _is_sqlite(path):
            raise StoreError(f"{path} is not a vmap-sweep study database (not SQLite); "
                             "remove it or choose another --out") from None
        raise storage_error(path, e) from None


# Studies written before the trainer's flag and the class were named apart: the flag's columns were `diverged`
# and `diverged_step`, and the class "not converged" was stored as "diverged".
_OLDER_COLUMNS = {"diverged": "unstable", "diverged_step": "unstable_step"}


def _read_older_names(conn: sqlite3.Connection, path: Path, read_only: bool) -> None:
    """Let a study written under the older names read as today's. A writable one is migrated where it lies, in one
    transaction (columns renamed, labels rewritten, its config's keys renamed and hashed again), so every later
    reader and writer sees one schema. A read-only one can't be written: a temporary view named `cells` (it shadows
    the table for this connection only) maps the older names as rows are read, the store reads its config under
    today's keys, and, opened read-only, writes nothing."""
    try:
        have = {r[1] for r in conn.execute("PRAGMA main.table_info(cells)")}
    except sqlite3.Error as e:
        raise storage_error(path, e) from None
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        ours = meta.get("app") == APP and meta.get("schema_version") == str(SCHEMA_VERSION)
        stored = json.loads(meta["config"]) if ours and "config" in meta else None
    except (sqlite3.Error, TypeError, ValueError, RecursionError):
        ours, stored = False, None
    if not ours:  # no study's meta, another app's or version's, or a damaged one: the checks that follow name it
        return
    renamed = {a: b for a, b in _OLDER_COLUMNS.items() if a in have and b not in have}
    newer = newer_keys(stored) if isinstance(stored, dict) else stored
    if not renamed and newer == stored:
        return
    if not read_only:  # the config's hash is checked against its text as it is before it is rewritten
        _verified_meta(conn, path)
    older = "', '".join(criterion_rules.LEGACY_LABELS)
    relabel = " ".join(f"WHEN '{a}' THEN '{b}'" for a, b in criterion_rules.LEGACY_LABELS.items())
    try:
        if read_only:
            if renamed:
                columns = ", ".join(renamed.get(c, c) for c in _ordered_columns(conn))
                mapped = ", ".join(f"{c} AS {renamed[c]}" if c in renamed
                                   else f"CASE label {relabel} ELSE label END AS label" if c == "label" else c
                                   for c in _ordered_columns(conn))
                conn.execute(f"CREATE TEMP VIEW cells ({columns}) AS SELECT {mapped} FROM main.cells")
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            for a, b in renamed.items():
                conn.execute(f"ALTER TABLE cells RENAME COLUMN {a} TO {b}")
            if renamed:
                conn.execute(f"UPDATE cells SET label = CASE label {relabel} END WHERE label IN ('{older}')")
            if newer != stored:
                conn.executemany("UPDATE meta SET value = ? WHERE key = ?",
                                 [(canonical_json(newer), "config"), (config_hash(newer), "config_hash")])
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except sqlite3.Error as e:
        raise storage_error(path, e) from None


def _ordered_columns(conn: sqlite3.Connection) -> list[str]:
    return [r[1] for r in conn.execute("PRAGMA main.table_info(cells)")]


def _check_ours(conn: sqlite3.Connection, path: Path) -> None:
    """A vmap-sweep study of this schema version, every table with every column it writes."""
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
    except sqlite3.Error as e:
        raise storage_error(path, e) from None
    if (meta.get("app") != APP or "schema_version" not in meta) and {"cells", "children", "extra"} <= tables:
        raise _damaged(path, "its meta table is missing or not vmap-sweep's, beside a study's tables")
    if meta.get("app") != APP or "schema_version" not in meta:
        raise StoreError(f"{path} is not a vmap-sweep study database (no vmap-sweep meta table); "
                         "remove it or choose another --out")
    if meta["schema_version"] != str(SCHEMA_VERSION):
        raise StoreError(f"{path}: study schema version {meta['schema_version']}, this vmap-sweep reads "
                         f"{SCHEMA_VERSION}; use the vmap-sweep version that made it")
    for table, columns in _schema_columns().items():
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        if not have:
            raise _damaged(path, f"its table {table!r} is missing")
        if missing := [c for c in columns if c not in have]:
            raise _damaged(path, f"its table {table!r} lacks column {', '.join(missing)}")


@functools.cache
def _schema_columns() -> dict[str, tuple[str, ...]]:
    """Each table of the schema with its columns, as SQLite reads _SCHEMA."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(_SCHEMA)
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: tuple(r[1] for r in conn.execute(f"PRAGMA table_info({t})")) for t in tables}
    finally:
        conn.close()


def _verified_meta(conn: sqlite3.Connection, path: Path) -> dict[str, str]:
    """The meta table, checked against what the store wrote: the config text hashes to its stored hash (an edited
    config would be trusted by every command that reads it), and nx x ny are the cells' grid."""
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    missing = [k for k in ("config", "config_hash", "created", "nx", "ny") if not isinstance(meta.get(k), str)]
    if missing:
        raise _damaged(path, f"its meta table lacks {', '.join(missing)}")
    text, digest = meta["config"], hashlib.sha256(meta["config"].encode()).hexdigest()
    if digest != meta["config_hash"]:
        raise StoreError(f"{path}: its stored config does not match its stored hash (sha256 {digest[:12]}, stored "
                         f"{meta['config_hash'][:12]!r}): it was edited after the study was made; {_RESTORE}, or "
                         "start a new --out")
    if not isinstance(_json(path, text, "its stored config"), dict):
        raise _damaged(path, "its stored config is not a JSON object")
    n, i0, i1, j0, j1 = conn.execute("SELECT count(*), min(i), max(i), min(j), max(j) FROM cells").fetchone()
    try:
        nx, ny = int(meta["nx"]), int(meta["ny"])
    except ValueError:
        raise _damaged(path, f"its grid size nx={meta['nx']!r}, ny={meta['ny']!r} is not two whole numbers") from None
    if (nx, ny, n) != (i1 + 1 if n else 0, j1 + 1 if n else 0, nx * ny) or (n and (i0, j0) != (0, 0)):
        raise _damaged(path, f"its grid size nx={nx}, ny={ny} does not match its {n} cells (i {i0}..{i1}, "
                             f"j {j0}..{j1})")
    return meta


def _check_cells(conn: sqlite3.Connection, path: Path, cells: Sequence[Cell]) -> None:
    stored = {(i, j): (x, y) for i, j, x, y in conn.execute("SELECT i, j, x, y FROM cells")}
    given = {(int(c.i), int(c.j)): (float(c.x), float(c.y)) for c in cells}
    if stored != given:
        raise StoreError(f"{path}: its cells differ from this run's grid although the config matches; "
                         "use a new --out folder")


def _pragmas(conn: sqlite3.Connection, path: Path) -> None:
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        conn.execute("PRAGMA synchronous=FULL")
    except sqlite3.Error as e:
        raise StoreError(f"{path}: can't open for writing ({e}); is the folder read-only?") from None
    if str(mode).lower() != "wal":
        raise StoreError(f"{path}: can't switch to WAL mode (got {mode}); put the study on a local disk")


def _create(conn: sqlite3.Connection, path: Path, text: str, digest: str, cells: Sequence[Cell]) -> None:
    _pragmas(conn, path)
    meta = {"app": APP, "schema_version": str(SCHEMA_VERSION), "config": text, "config_hash": digest,
            "created": _now(), "study_id": os.urandom(16).hex(),  # tells apart two studies of one config
            "nx": str(max(int(c.i) for c in cells) + 1),
            "ny": str(max(int(c.j) for c in cells) + 1)}
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as e:
        raise StoreError(f"{path}: can't write ({e}); choose a writable --out") from None
    try:
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise StoreError(f"{path}: another process created this study at the same time; run again")
        for stmt in _SCHEMA.split(";"):
            if stmt.strip():
                conn.execute(stmt)
        conn.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
        conn.executemany(
            "INSERT INTO cells (i, j, x, y, hparams) VALUES (?, ?, ?, ?, ?)",
            [(int(c.i), int(c.j), float(c.x), float(c.y), canonical_json(c.hparams)) for c in cells])
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
