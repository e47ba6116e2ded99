"""The Ray backend on CPU: a local Ray instance with two one-CPU workers must store exactly what one process
stores, lose nothing when a worker dies mid-batch, and finish a study another backend started."""

from __future__ import annotations

import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_local

ray = pytest.importorskip("ray")

from vmap_sweep.errors import ConfigError, DataError  # noqa: E402
from vmap_sweep.run.pipeline import Progress  # noqa: E402
from vmap_sweep.run.ray_backend import INSTALL_HINT, RayBackend  # noqa: E402
from vmap_sweep.run.worker import Worker  # noqa: E402
from vmap_sweep.study.config import preset  # noqa: E402
from vmap_sweep.study.plan import Batch  # noqa: E402
from vmap_sweep.study.settings import RunSettings  # noqa: E402
from vmap_sweep.train.trainer import CellRecord  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# 4 x 4 cells: 4 learning rates x 1, 2, 4, 8 steps at a constant LR: each learning rate's 4 dataset sizes are read
# out of one trajectory; one trunk per batch gives 4 batches of 4 cells.
CFG = preset("tiny").with_overrides(resolution="4x4", y="tokens:256:2048:log", schedule="constant")
K = 1
RUN_ONLY = ("wall_time", "finished_at")  # the only columns allowed to differ between two runs


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One local Ray instance (2 CPUs) for the module: starting Ray takes seconds, so it is shared.

    The tiny base model is pretrained here first, so the workers only read it from the cache; the workers
    inherit this environment (cache folder, import path) when Ray starts.
    """
    from vmap_sweep.train.tiny import tiny_base_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VMAP_SWEEP_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        tiny_base_model()
        t = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=str(tmp_path_factory.mktemp("ray")))  # Ray's logs and sockets, not /tmp/ray
        print(f"\nray.init took {time.perf_counter() - t:.1f}s")
        # The test workers below live in this module: send them by value, the workers can't import tests.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        try:
            yield
        finally:
            ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
            ray.shutdown()
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory) -> list[dict]:
    """The study run by the single-process backend: what every Ray run must reproduce bit for bit."""
    with run_local(CFG, tmp_path_factory.mktemp("local"), K) as store:
        return store.rows(arrays=True)


def ray_backend(**kwargs) -> RayBackend:
    """CPU workers with the settings a CPU run records."""
    return RayBackend(CFG, RunSettings(), **kwargs)


class Counting(Progress):
    """Counts commits per batch; optionally interrupts the run (Ctrl-C) after `stop_after` batches."""

    def __init__(self, stop_after: int | None = None):
        self.done: list[int] = []
        self.stop_after = stop_after

    def batch_done(self, batch: Batch, labels: list[str | None], elapsed: float) -> None:
        self.done.append(batch.index)
        if self.stop_after is not None and len(self.done) >= self.stop_after:
            raise KeyboardInterrupt


class DiesOnce(Worker):
    """Trains the batch, then kills its process before the records go back, once per flag file: the worst
    moment to die, the work is done and lost. The replacement worker finds the flag and lives."""

    def __init__(self, cfg, device, settings, flag: str = ""):
        super().__init__(cfg, device, settings)
        self.flag = flag

    def train(self, lanes: list[list[dict]], evaluate: bool = True) -> list[CellRecord]:
        records = super().train(lanes, evaluate)
        try:
            fd = os.open(self.flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # exactly one worker wins
        except FileExistsError:
            return records
        os.close(fd)
        os._exit(1)


class CannotLoad(Worker):
    message = "data.jsonl line 3: no `messages`; give each line a list of messages"

    def __init__(self, cfg, device, settings):
        raise DataError(self.message)


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) == 16
    for g, w in zip(got, want, strict=True):
        assert g["status"] == w["status"] == "done", (g["i"], g["j"])
        for key in w:
            if key in RUN_ONLY:
                continue
            a, b = g[key], w[key]
            if isinstance(b, np.ndarray):
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (g["i"], g["j"], key)
            elif isinstance(b, float) and math.isnan(b):
                assert isinstance(a, float) and math.isnan(a), (g["i"], g["j"], key)
            else:
                assert a == b, (g["i"], g["j"], key, a, b)


def test_two_workers_store_what_one_process_stores(reference, tmp_path):
    progress = Counting()
    t = time.perf_counter()
    with ray_backend(num_workers=2) as backend, \
            run_local(CFG, tmp_path / "ray", K, backend, progress=progress) as store:
        rows = store.rows(arrays=True)
    print(f"\nray run, 2 workers: {time.perf_counter() - t:.1f}s")
    assert_same_rows(rows, reference)
    assert sorted(progress.done) == [0, 1, 2, 3]  # each batch committed exactly once
    assert len(set(backend.assigned.values())) == 2, backend.assigned  # both workers trained
    assert all(" CPU pid " in name for name in backend.assigned.values()), backend.assigned  # named by their host
    assert backend.slots == [] and ray.is_initialized()  # close() left running the Ray it did not start
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2:  # ... and stopped its actors, which free their CPUs
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)


def test_worker_killed_mid_batch_loses_nothing(reference, tmp_path):
    flag = tmp_path / "died"
    progress = Counting()
    with ray_backend(num_workers=2, worker_factory=partial(DiesOnce, flag=str(flag))) as backend, \
            run_local(CFG, tmp_path / "ray", K, backend, progress=progress) as store:
        rows = store.rows(arrays=True)
    assert flag.exists()  # a worker did die
    assert_same_rows(rows, reference)
    assert sorted(progress.done) == [0, 1, 2, 3]  # the lost batch was retried and committed once


def test_study_started_locally_is_finished_by_ray(reference, tmp_path):
    out = tmp_path / "study"
    with pytest.raises(KeyboardInterrupt):
        run_local(CFG, out, K, progress=Counting(stop_after=2))
    progress = Counting()
    with ray_backend(num_workers=2) as backend, run_local(CFG, out, K, backend, progress=progress) as store:
        rows = store.rows(arrays=True)
    assert len(progress.done) == 2 and sorted(backend.assigned) == sorted(progress.done)  # only the rest
    assert_same_rows(rows, reference)


def test_an_error_inside_a_worker_comes_back_as_itself(ray_cluster, tmp_path):
    with pytest.raises(DataError) as e, ray_backend(num_workers=1, worker_factory=CannotLoad) as backend:
        run_local(CFG, tmp_path / "s", K, backend)
    # the user's one-line message, not Ray's wrapper with a remote traceback (the CLI prints it as is)
    assert type(e.value) is DataError and str(e.value) == CannotLoad.message


def test_without_ray_the_option_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ConfigError) as e:
        ray_backend()
    assert str(e.value) == INSTALL_HINT == "--backend ray needs Ray: pip install 'vmap-sweep[ray]'"


def test_memory_probe_runs_on_a_worker(ray_cluster):
    backend = ray_backend(num_workers=1)
    try:
        assert backend.models_per_batch(16) == 8 and backend.models_per_batch(3) == 3  # CPU: min(limit, 8)
    finally:
        backend.close()
