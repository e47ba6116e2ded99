"""Run a study's batches on every GPU of a machine or a Ray cluster: one Ray actor per GPU.

The driver (the process in run_study) stays the only writer of the study database: actors train and send
back records, and the driver commits each batch once, as it arrives. A batch whose worker dies goes back on
the queue and a fresh worker trains it from the start. A cell's result depends on its hyperparameters, the
base model and the data order, never on the worker or its batch companions, so a retried, split or
re-ordered batch gives the same numbers, and a crashed driver resumes from the store as with one GPU.

Ray is optional (`pip install 'vmap-sweep[ray]'`); nothing here imports it before a RayBackend is built.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from vmap_sweep.errors import ConfigError, VmapSweepError
from vmap_sweep.run.worker import Job, Worker, job_lanes
from vmap_sweep.study.config import StudyConfig
from vmap_sweep.study.settings import RunSettings
from vmap_sweep.study.sizes import Budgets
from vmap_sweep.train.trainer import CellRecord

log = logging.getLogger(__name__)

INSTALL_HINT = "--backend ray needs Ray: pip install 'vmap-sweep[ray]'"

WorkerFactory = Callable[[StudyConfig, torch.device, RunSettings], Worker]


class WorkersLostError(VmapSweepError):
    """Ray workers keep dying on one batch, or none can start: a cluster problem, never a result."""


def import_ray() -> Any:
    """The ray module, or a one-line ConfigError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


def _lost_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """Errors meaning "the worker (process, node) went away", as opposed to an error raised by training."""
    ex = ray.exceptions
    names = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OutOfMemoryError")
    return tuple(getattr(ex, n) for n in names if hasattr(ex, n))


class RayWorker:
    """The body of one Ray actor: a run.worker.Worker (model and data loaded once) on the actor's device.

    Loading happens in load(), not __init__, so that an error there (a bad checkpoint, a missing file)
    comes back to the driver as itself instead of as an actor that died while starting.
    """

    def __init__(self, cfg: StudyConfig, settings: RunSettings, use_gpu: bool, threads: int | None,
                 worker_factory: WorkerFactory):
        self.cfg, self.settings, self.use_gpu = cfg, settings, use_gpu
        self.threads, self.worker_factory = threads, worker_factory
        self.worker: Worker | None = None

    def load(self) -> str:
        """Builds the Worker with the driver's run settings; returns a name for progress and logs."""
        if self.threads:
            torch.set_num_threads(self.threads)
        device = torch.device("cuda" if self.use_gpu else "cpu")
        self.worker = self.worker_factory(self.cfg, device, self.settings)
        if self.use_gpu:
            import ray

            ids = ray.get_gpu_ids()
            what = f"GPU {','.join(map(str, ids))} ({torch.cuda.get_device_name(device)})"
        else:
            what = "CPU"
        return f"{socket.gethostname()} {what} pid {os.getpid()}"  # the pid tells apart workers sharing a GPU

    def train(self, lanes: list[list[dict]], evaluate: bool = True) -> list[CellRecord]:
        assert self.worker is not None, "load() first"
        return self.worker.train(lanes, evaluate)

    def models_per_batch(self, limit: int) -> int:
        assert self.worker is not None, "load() first"
        return self.worker.models_per_batch(limit)

    def budgets(self, budgets: list[int], unit: str = "tokens") -> Budgets:
        assert self.worker is not None, "load() first"
        return self.worker.data.stream.budgets(budgets, unit)


@dataclass(eq=False)
class _Slot:
    """One actor and what the driver knows about it."""

    actor: Any
    ready_ref: Any
    since: float
    name: str = "starting"


class RayBackend:
    """Batches as Ray actor calls, one GPU per actor (or one CPU per actor where the cluster has no GPU).

    Same protocol as run.worker.LocalBackend, and owned by its caller likewise (close it, or use `with`).

    - address: a Ray cluster ("auto", "ray://head:10001"); None starts a local Ray instance unless this
      process is connected already (then that one is used and left running).
    - num_workers: actors to start; default one per GPU (gpus_per_worker each), or one per CPU.
    - gpus_per_worker: None picks 1 where the cluster has GPUs and 0 (CPU workers) where it has none;
      0 asks for CPU workers, e.g. for --device cpu. The settings' device is only checked: on a cluster
      the driver may run on a head node without the GPUs its workers have.
    - worker_factory: builds the Worker inside each actor (tests use it to kill an actor mid-batch).
    - max_attempts: a batch that loses its worker this many times stops the study (WorkersLostError).
    - start_timeout_s: how long to wait, with no worker alive, for one to start before giving up.
    """

    def __init__(self, cfg: StudyConfig, settings: RunSettings, address: str | None = None,
                 num_workers: int | None = None, gpus_per_worker: float | None = None,
                 worker_factory: WorkerFactory = Worker, max_attempts: int = 3, start_timeout_s: float = 600.0):
        self.settings = settings
        ray = self.ray = import_ray()
        self.lost = _lost_errors(ray)
        self.slots: list[_Slot] = []
        self.started_ray = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, log_to_driver=True)
            except (ConnectionError, RuntimeError) as e:
                raise ConfigError(f"--address {address}: can't reach a Ray cluster ({str(e).splitlines()[0]}); "
                                  "start one with `ray start --head` or leave --address out") from None
            self.started_ray = True
        try:
            self._start(cfg, num_workers, gpus_per_worker, worker_factory)
        except BaseException:
            self.close()
            raise
        self.max_attempts, self.start_timeout_s = max_attempts, start_timeout_s
        self.assigned: dict[int, str] = {}  # batch index -> name of the worker that trained it (progress, tests)

    def _start(self, cfg: StudyConfig, num_workers: int | None, gpus_per_worker: float | None,
               worker_factory: WorkerFactory) -> None:
        resources = self.ray.cluster_resources()
        gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if gpus > 0 else 0.0
        if gpus_per_worker < 0:
            raise ConfigError(f"gpus_per_worker {gpus_per_worker}: give 0 (CPU workers) or a positive number")
        if self.settings.device == "cuda" and gpus_per_worker == 0:
            raise ConfigError("--device cuda with --backend ray: the Ray cluster has no GPU; "
                              "start Ray on GPU machines or use --device cpu")
        self.use_gpu = gpus_per_worker > 0
        capacity = int(gpus // gpus_per_worker) if self.use_gpu else int(cpus)
        if num_workers is None:
            num_workers = max(capacity, 1)
        if num_workers < 1:
            raise ConfigError(f"--workers {num_workers}: give a number >= 1")
        if num_workers > capacity:
            log.warning("%d workers asked for, the Ray cluster has room for %d now; the rest start when it grows",
                        num_workers, capacity)
        self.gpus_per_worker = gpus_per_worker
        # CPU workers: one thread each, so that N workers share N cores instead of fighting over them.
        threads = None if self.use_gpu else 1
        remote = self.ray.remote(RayWorker)
        # the compile setting travels in the run settings: workers on other nodes follow the driver's
        opts: dict[str, Any] = {"num_cpus": 1, "num_gpus": gpus_per_worker, "max_restarts": 0, "max_task_retries": 0}
        self._spawn_args = (cfg, self.settings, self.use_gpu, threads, worker_factory)
        self._remote = remote.options(**opts)
        self.slots = [self._spawn() for _ in range(num_workers)]

    def _spawn(self) -> _Slot:
        actor = self._remote.remote(*self._spawn_args)
        return _Slot(actor, actor.load.remote(), time.monotonic())

    def _replace(self, slot: _Slot) -> _Slot:
        """A dead (or unreachable) actor is killed for good and a fresh one takes its place."""
        try:
            self.ray.kill(slot.actor, no_restart=True)
        except Exception:  # already gone
            pass
        new = self._spawn()
        self.slots[self.slots.index(slot)] = new
        return new

    def _get(self, ref: Any) -> Any:
        """ray.get, with an error raised by our code inside the actor re-raised as itself when it is ours."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, VmapSweepError):
                raise e.cause from None
            raise

    def _wait_ready(self) -> _Slot:
        """The first worker that finishes loading (others keep loading in the background)."""
        failures = 0
        while True:
            for s in self.slots:
                if s.ready_ref is None:
                    return s
            pending = {s.ready_ref: s for s in self.slots}
            done, _ = self.ray.wait(list(pending), num_returns=1, timeout=self.start_timeout_s)
            if not done:
                raise self._no_start_error()
            slot = pending[done[0]]
            try:
                slot.name = self._get(done[0])
                slot.ready_ref = None
            except self.lost:
                failures += 1
                if failures > 2 * len(self.slots):
                    raise self._died_starting_error() from None
                self._replace(slot)

    def models_per_batch(self, limit: int) -> int:
        """The memory probe, on one worker: the workers of one cluster are assumed alike (a batch that does
        not fit on a smaller GPU is split there, which changes no result)."""
        for _ in range(self.max_attempts):
            slot = self._wait_ready()
            try:
                return int(self._get(slot.actor.models_per_batch.remote(limit)))
            except self.lost:
                self._replace(slot)
        raise WorkersLostError(f"the memory probe lost its Ray worker {self.max_attempts} times; "
                               "see the Ray logs (/tmp/ray/session_latest/logs), or give --models-per-batch N")

    def budgets(self, budgets: list[int], unit: str = "tokens") -> Budgets:
        """From one worker's data: every worker loads the same."""
        for _ in range(self.max_attempts):
            slot = self._wait_ready()
            try:
                return self._get(slot.actor.budgets.remote(budgets, unit))
            except self.lost:
                self._replace(slot)
        raise WorkersLostError(f"reading the data lost its Ray worker {self.max_attempts} times; "
                               "see the Ray logs (/tmp/ray/session_latest/logs)")

    def run(self, jobs: list[Job], started: Callable[[Job], None],
            evaluate: bool = True) -> Iterator[tuple[Job, list[CellRecord]]]:
        """Yields (job, records) in completion order; every job exactly once, whatever workers die."""
        # Longest batches first, so that the last batches to finish are short ones and no GPU waits long.
        queue = deque(sorted(jobs, key=lambda j: -j[0].steps * len(j[1])))
        attempts: Counter[int] = Counter()
        load_failures = 0
        idle: list[_Slot] = [s for s in self.slots if s.ready_ref is None]
        loading: dict[Any, _Slot] = {s.ready_ref: s for s in self.slots if s.ready_ref is not None}
        running: dict[Any, tuple[_Slot, Job]] = {}
        no_worker_since = time.monotonic()

        def dispatch() -> None:
            while queue and idle:
                slot, job = idle.pop(0), queue.popleft()
                ref = slot.actor.train.remote(job_lanes(job), evaluate)
                running[ref] = (slot, job)
                self.assigned[job[0].index] = slot.name
                started(job)

        def replace(slot: _Slot) -> None:
            new = self._replace(slot)
            loading[new.ready_ref] = new

        while queue or running:
            dispatch()
            if running or idle:
                no_worker_since = time.monotonic()
            elif time.monotonic() - no_worker_since > self.start_timeout_s:
                raise self._no_start_error()
            done, _ = self.ray.wait([*running, *loading], num_returns=1, timeout=5.0)
            finished: list[tuple[Job, list[CellRecord]]] = []
            for ref in done:
                if ref in loading:
                    slot = loading.pop(ref)
                    try:
                        slot.name = self._get(ref)
                        slot.ready_ref = None
                        idle.append(slot)
                    except self.lost:
                        load_failures += 1
                        if load_failures > 2 * len(self.slots):
                            raise self._died_starting_error() from None
                        replace(slot)
                    continue
                slot, job = running.pop(ref)
                try:
                    records = self._get(ref)
                except self.lost as e:
                    attempts[job[0].index] += 1
                    log.warning("worker %s lost during batch %d (%s); the batch goes back on the queue",
                                slot.name, job[0].index, type(e).__name__)
                    if attempts[job[0].index] >= self.max_attempts:
                        raise WorkersLostError(
                            f"batch {job[0].index} ({len(job[1])} cells) lost its Ray worker {self.max_attempts} "
                            "times; see the Ray logs (/tmp/ray/session_latest/logs): host or GPU memory? "
                            "Try a smaller --models-per-batch") from None
                    queue.appendleft(job)
                    replace(slot)
                    continue
                idle.append(slot)
                finished.append((job, records))
            dispatch()  # keep the workers busy while the driver stores what came back
            yield from finished

    def _no_start_error(self) -> WorkersLostError:
        what = f"{self.gpus_per_worker:g} GPU" if self.use_gpu else "1 CPU"
        return WorkersLostError(f"no Ray worker ({what} each) started within {self.start_timeout_s:.0f} s; "
                                "`ray status` shows what the cluster has free")

    def _died_starting_error(self) -> WorkersLostError:
        return WorkersLostError("Ray workers keep dying while loading the model and data; see the Ray logs "
                                "(/tmp/ray/session_latest/logs)")

    def __enter__(self) -> RayBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops the actors; shuts Ray down only if this backend started it."""
        for slot in self.slots:
            try:
                self.ray.kill(slot.actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.slots = []
        if self.started_ray:
            self.ray.shutdown()
            self.started_ray = False
