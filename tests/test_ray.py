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

ray = pytest.importorskip("ray")

from vmap_sweep.errors import ConfigError, DataError  # noqa: E402
from vmap_sweep.run.pipeline import Progress, Worker, run_study  # noqa: E402
from vmap_sweep.run.ray_backend import INSTALL_HINT, RayBackend  # noqa: E402
from vmap_sweep.study.config import preset  # noqa: E402
from vmap_sweep.study.plan import Batch  # noqa: E402
from vmap_sweep.train.trainer import CellRecord  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# 4 x 4 cells: 4 learning rates x 1, 2, 4, 8 steps; 4 models per batch gives 4 batches of 4.
CFG = preset("tiny").with_overrides(resolution="4x4", y="tokens:256:2048:log")
K = 4
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
    with run_study(CFG, tmp_path_factory.mktemp("local"), K, device="cpu") as store:
        return store.rows(arrays=True)


class Recorder:
    """A backend factory that keeps the backend it built, to see which worker trained what."""

    def __init__(self, **kwargs):
        self.kwargs, self.backend = kwargs, None

    def __call__(self, cfg, device, micro_batch_size):
        self.backend = RayBackend(cfg, device, micro_batch_size, **self.kwargs)
        return self.backend


class Counting(Progress):
    """Counts commits per batch; optionally interrupts the run (Ctrl-C) after `stop_after` batches."""

    def __init__(self, stop_after: int | None = None):
        self.done: list[int] = []
        self.stop_after = stop_after

    def batch_done(self, batch: Batch, records: list[CellRecord], elapsed: float) -> None:
        self.done.append(batch.index)
        if self.stop_after is not None and len(self.done) >= self.stop_after:
            raise KeyboardInterrupt


class DiesOnce(Worker):
    """Trains the batch, then kills its process before the records go back, once per flag file: the worst
    moment to die, the work is done and lost. The replacement worker finds the flag and lives."""

    def __init__(self, cfg, device, micro_batch_size=None, flag: str = ""):
        super().__init__(cfg, device, micro_batch_size)
        self.flag = flag

    def train(self, hparams: list[dict]) -> list[CellRecord]:
        records = super().train(hparams)
        try:
            fd = os.open(self.flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # exactly one worker wins
        except FileExistsError:
            return records
        os.close(fd)
        os._exit(1)


class CannotLoad(Worker):
    message = "data.jsonl line 3: no `messages`; give each line a list of messages"

    def __init__(self, cfg, device, micro_batch_size=None):
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
    factory, progress = Recorder(num_workers=2), Counting()
    t = time.perf_counter()
    with run_study(CFG, tmp_path / "ray", K, device="cpu", progress=progress, backend_factory=factory) as store:
        rows = store.rows(arrays=True)
    print(f"\nray run, 2 workers: {time.perf_counter() - t:.1f}s")
    assert_same_rows(rows, reference)
    assert sorted(progress.done) == [0, 1, 2, 3]  # each batch committed exactly once
    assert len(set(factory.backend.assigned.values())) == 2, factory.backend.assigned  # both workers trained
    assert factory.backend.slots == [] and ray.is_initialized()  # close() left running the Ray it did not start
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2:  # ... and stopped its actors, which free their CPUs
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)


def test_worker_killed_mid_batch_loses_nothing(reference, tmp_path):
    flag = tmp_path / "died"
    factory, progress = Recorder(num_workers=2, worker_factory=partial(DiesOnce, flag=str(flag))), Counting()
    with run_study(CFG, tmp_path / "ray", K, device="cpu", progress=progress, backend_factory=factory) as store:
        rows = store.rows(arrays=True)
    assert flag.exists()  # a worker did die
    assert_same_rows(rows, reference)
    assert sorted(progress.done) == [0, 1, 2, 3]  # the lost batch was retried and committed once


def test_study_started_locally_is_finished_by_ray(reference, tmp_path):
    out = tmp_path / "study"
    with pytest.raises(KeyboardInterrupt):
        run_study(CFG, out, K, device="cpu", progress=Counting(stop_after=2))
    factory, progress = Recorder(num_workers=2), Counting()
    with run_study(CFG, out, K, device="cpu", progress=progress, backend_factory=factory) as store:
        rows = store.rows(arrays=True)
    assert len(progress.done) == 2 and sorted(factory.backend.assigned) == sorted(progress.done)  # only the rest
    assert_same_rows(rows, reference)


def test_an_error_inside_a_worker_comes_back_as_itself(ray_cluster, tmp_path):
    factory = Recorder(num_workers=1, worker_factory=CannotLoad)
    with pytest.raises(DataError) as e:
        run_study(CFG, tmp_path / "s", K, device="cpu", backend_factory=factory)
    # the user's one-line message, not Ray's wrapper with a remote traceback (the CLI prints it as is)
    assert type(e.value) is DataError and str(e.value) == CannotLoad.message


def test_without_ray_the_option_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ConfigError) as e:
        run_study(CFG, tmp_path / "s", K, device="cpu", backend_factory=RayBackend)
    assert str(e.value) == INSTALL_HINT == "--backend ray needs Ray: pip install 'vmap-sweep[ray]'"


def test_memory_probe_runs_on_a_worker(ray_cluster):
    backend = RayBackend(CFG, torch.device("cpu"), num_workers=1)
    try:
        assert backend.models_per_batch(16) == 8 and backend.models_per_batch(3) == 3  # CPU: min(limit, 8)
        assert " CPU pid " in backend.worker_names()[0]
    finally:
        backend.close()
