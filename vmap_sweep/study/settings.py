"""How a study's cells are computed, beside what they are (the config): device type, micro-batching,
determinism, compilation, the trainer's arithmetic version, and the torch, CUDA and GPU that run its kernels.

None of these change what a cell means, but each changes its last bits: a study is trained under one set of
them, stored once, and a resume or a zoom must match it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from vmap_sweep.errors import StoreError

# The version of the trainer's arithmetic (loss chunking, the shared first step, attention kernels): it sets
# a cell's last bits. Code of one version reads, analyses and exports a study of another, but does not train
# more cells into it, so that one study never mixes two arithmetics.
NUMERICS = 4
COMPILE_SETTINGS = ("0", "1", "auto")
ENVIRONMENT = ("torch", "cuda", "gpu")  # the RunSettings that describe the machine, not an option


def _optional_text(v: object) -> bool:
    return v is None or isinstance(v, str)


# What each stored setting may be (a study's database is input like any file: an edited one is named).
_KINDS = {
    "device": lambda v: isinstance(v, str) and bool(v),
    "micro_batch_size": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "deterministic": lambda v: isinstance(v, bool),
    "compile": lambda v: v in COMPILE_SETTINGS,
    "numerics": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "torch": _optional_text,
    "cuda": _optional_text,
    "gpu": _optional_text,
}


@dataclass(frozen=True)
class RunSettings:
    device: str = "cpu"  # the device type, "cpu" or "cuda": kernels round differently on each
    micro_batch_size: int | None = None  # rows per forward/backward; None: a whole step at once
    deterministic: bool = False  # bitwise-reproducible kernels
    compile: str = "0"  # VMAP_SWEEP_COMPILE as it applies on this device: "1", "0" or "auto"
    numerics: int = NUMERICS
    # The software and hardware under the kernels: another torch, CUDA or GPU model picks other kernels (cuBLAS
    # heuristics, SDPA backends, oneDNN), so they count like the device type. None: not known (settings made by
    # hand, as a library caller may); such a value is not compared. vmap-sweep's own version is
    # not here: what it changes of the arithmetic is `numerics`.
    torch: str | None = None
    cuda: str | None = None  # the CUDA torch was built with, on a CUDA device; "none" on a CPU
    gpu: str | None = None  # the GPU's name, or "cpu"

    def resume_options(self) -> str:
        """The options a command that resumes this study must repeat: those of these settings that differ from
        the defaults (" --device cpu --micro-batch-size 2", or "")."""
        return ((" --device cpu" if self.device == "cpu" else "")
                + (f" --micro-batch-size {self.micro_batch_size}" if self.micro_batch_size else "")
                + (" --deterministic" if self.deterministic else ""))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_stored(cls, stored: dict) -> RunSettings:
        """Settings as a study stored them: every field, each of its kind (ValueError naming the first that
        is not)."""
        if not isinstance(stored, dict):
            raise ValueError(f"a JSON {type(stored).__name__}, not an object")
        known = [f.name for f in fields(cls)]
        missing = [k for k in known if k not in stored]
        if missing:
            raise ValueError(f"no {missing[0]!r}")
        values = {k: stored[k] for k in known}
        for key, value in values.items():
            if not _KINDS[key](value):
                raise ValueError(f"{key}={value!r:.60}")
        return cls(**values)

    def check_trainable_here(self, where: object) -> None:
        """This code trains only studies of its own arithmetic; it names the release that trains another."""
        if self.numerics != NUMERICS:
            raise StoreError(f"{where} was trained with numerics version {self.numerics}, this vmap-sweep computes "
                             f"version {NUMERICS}; to add cells to it install the vmap-sweep release with numerics "
                             f"{self.numerics} (analysis, plots and export work here), or start a new --out")

    def check_same(self, stored: RunSettings, where: object) -> None:
        """A resume (or a zoom child) keeps the settings its study was trained with."""
        stored.check_trainable_here(where)
        mine, theirs = self.to_dict(), stored.to_dict()
        for key in ENVIRONMENT:
            if mine[key] is None or theirs[key] is None:  # not known on one side: nothing to compare
                mine[key] = theirs[key]
        if mine != theirs:
            diff = ", ".join(f"{k}: {theirs[k]!r} -> {v!r}" for k, v in mine.items() if theirs[k] != v)
            raise StoreError(f"{where} was trained with other run settings ({diff}); resume with the same "
                             "--device, --micro-batch-size, --deterministic and VMAP_SWEEP_COMPILE, on the same "
                             "torch, CUDA and GPU model, or use a new --out")
