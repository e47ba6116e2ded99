"""Where and how a study computes: the device, whether to compile, and the run settings a study records."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from vmap_sweep.errors import ConfigError
from vmap_sweep.model.gpt import GPT
from vmap_sweep.study.config import check_micro_batch_size
from vmap_sweep.study.settings import COMPILE_SETTINGS, RunSettings

# Compiling takes a minute or two and pays for itself only where steps are long: d20 runs 2-3x faster compiled,
# the tiny preset's whole 16 x 16 study takes 15 s eager and 73 s compiled (benchmarks/RESULTS.md).
COMPILE_MIN_PARAMS = 100_000_000


def resolve_device(device: str) -> torch.device:
    """--device auto|cpu|cuda[:N] -> a torch device that exists here, or a ConfigError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r}: choose auto, cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: choose auto, cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this machine has no CUDA device; use --device cpu or auto")
    return dev


def compile_setting(device: torch.device | None = None) -> str:
    """VMAP_SWEEP_COMPILE: 1 (always torch.compile), 0 (never) or unset: auto. With a device, auto on a CPU is
    reported as 0, what it means there: the setting a study records, and a resume must match."""
    setting = os.environ.get("VMAP_SWEEP_COMPILE", "auto")
    if setting not in COMPILE_SETTINGS:
        raise ConfigError(f"VMAP_SWEEP_COMPILE={setting!r}: set 1 (compile), 0 (eager) or unset it (auto)")
    return "0" if setting == "auto" and device is not None and device.type != "cuda" else setting


def compile_on(device: torch.device, model: GPT, setting: str | None = None) -> bool:
    """Whether to compile; auto: on a GPU, for models of COMPILE_MIN_PARAMS parameters or more."""
    setting = compile_setting() if setting is None else setting
    if setting == "auto":
        return device.type == "cuda" and model.num_params() >= COMPILE_MIN_PARAMS
    return setting == "1"


def run_settings(device: torch.device, rows_per_step: Sequence[int], micro_batch_size: int | None = None,
                 deterministic: bool = False) -> RunSettings:
    """The settings a run on `device` records, each checked: a bad one is refused before any folder is touched.
    rows_per_step: every batch size of the study (StudyConfig.rows_per_step); micro-batches split each evenly."""
    for rows in rows_per_step:
        check_micro_batch_size(micro_batch_size, rows)
    return RunSettings(device=device.type, micro_batch_size=micro_batch_size, deterministic=deterministic,
                       compile=compile_setting(device), **environment(device))


def environment(device: torch.device) -> dict[str, str]:
    """The torch release (without its build suffix), the CUDA it runs on a GPU ("none" on a CPU) and the
    GPU's name ("cpu"): what RunSettings records of the machine."""
    on_gpu = device.type == "cuda"
    return {"torch": torch.__version__.split("+")[0],
            "cuda": (torch.version.cuda or "none") if on_gpu else "none",
            "gpu": torch.cuda.get_device_name(device) if on_gpu else "cpu"}
