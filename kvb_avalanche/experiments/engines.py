"""Where a sweep's runs execute: one :class:`Engine` interface, three engines.

- ``local`` (default): one run after another in this process.
- ``ray``: each run a Ray task (extra ``ray``); ``ray.init()`` starts a local cluster,
  ``address`` joins one. Embeddings go through Ray's object store, each seed's keys are
  fitted by one task that the runs needing them wait for.
- ``slurm``: SLURM job arrays through submitit (extra ``slurm``), one array per wave: the
  key fits first, then the runs, which depend on them. Jobs read the embedding cache and
  the stored keys from the shared file system; logs go to ``DIR/slurm/``.

Every engine keeps the same contract, which the sweep driver relies on: :meth:`Engine.open`
refuses (``ConfigError``, before anything is submitted or written) an option it cannot
honour or a resource request its cluster cannot meet; :meth:`Engine.submit` queues runs;
:meth:`Engine.results` yields each run's record or its failure (an :class:`Outcome`) as it
ends, until nothing is queued. Retries are the driver's: a failed run is submitted again.
Workers never write records (the driver does); they write the run's logs and mid-run
checkpoints under the run's point folder, an absolute path.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
import shutil
import subprocess
import sys
import time
import traceback
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from kvb_avalanche.experiments.config import ConfigError, ExperimentConfig
from kvb_avalanche.experiments.records import RunRecord, RunStore
from kvb_avalanche.experiments.runner import RunOptions, Workbench, key_identity
from kvb_avalanche.experiments.strategies import STRATEGIES, StrategySpec

log = logging.getLogger(__name__)

LOG_TAIL = 30  # lines of a failed run's log kept in failures.json


@dataclass(frozen=True)
class EngineOptions:
    """How an engine runs the grid; ``None`` is "not asked for". An engine refuses any
    option it cannot honour (``Engine.accepts``)."""

    retries: int = 1  # times a failed run is submitted again (every engine)
    address: str | None = None  # ray: the cluster to join ('auto', host:port)
    cpus_per_run: float | None = None  # ray, slurm
    gpus_per_run: float | None = None  # ray, slurm
    partition: str | None = None  # slurm
    time_min: int | None = None  # slurm: a job's time limit in minutes
    mem_gb: float | None = None  # slurm: a job's memory
    # modules registering strategies: imported by the driver, their code travels by value
    # to Ray and SLURM workers (which need not be able to import them)
    imports: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) \
                or self.retries < 0:
            raise ConfigError("retries", f"{{retries}} must be an integer >= 0, got "
                              f"{self.retries!r}")
        for name in ("cpus_per_run", "gpus_per_run", "time_min", "mem_gb"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 if name == "gpus_per_run" else value > 0):
                raise ConfigError(name, f"{{{name}}} must be a number "
                                  f"{'>= 0' if name == 'gpus_per_run' else '> 0'}, got {value!r}")

    def given(self) -> list[str]:
        """The engine-specific options asked for (not None)."""
        return [f.name for f in fields(self) if f.name not in ("retries", "imports")
                and getattr(self, f.name) is not None]


@dataclass(frozen=True)
class RunTask:
    """One run of the grid: a strategy on a seed at a grid point."""

    point: str  # the point's name (its folder under DIR/points/)
    config: ExperimentConfig
    strategy: str
    seed: int
    folder: Path  # the point's folder, absolute
    # the specs of the configuration's strategies travel with the task: a worker need not
    # know them (registered in the driver's __main__, or in a module it cannot import)
    specs: tuple[StrategySpec, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.point}/{self.strategy}/{self.seed}"

    def log_path(self) -> Path:
        return RunStore(self.folder, {}).logs(self.strategy, self.seed) / "run.log"


@dataclass
class Outcome:
    """How a run ended: its record, or (record None) the error and its log's last lines."""

    task: RunTask
    record: RunRecord | None
    error: str | None = None
    log_tail: list[str] = field(default_factory=list)


class RunError(RuntimeError):
    """A run's exception as it travels back from a worker, with its log's last lines."""

    def __init__(self, message: str, log_tail: list[str]) -> None:
        super().__init__(message)
        self.log_tail = log_tail

    def __reduce__(self) -> tuple:  # pickled by Ray and submitit with its log tail
        return type(self), (str(self), self.log_tail)


def import_modules(names: Sequence[str]) -> None:
    """Import the modules that register a user's strategies; ConfigError naming one that
    cannot be imported."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 (any import-time error is the user's to see)
            raise ConfigError("imports", f"{{imports}} {name}: cannot import it "
                              f"({type(e).__name__}: {e})") from e


def threads_for(cpus: float) -> int:
    """Torch threads of a run given ``cpus`` CPUs (Ray and SLURM alike): at least one."""
    return max(1, math.ceil(cpus))


def tail(path: Path, lines: int = LOG_TAIL) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def execute(task: RunTask, options: RunOptions, keys_dir: Path, threads: int | None = None,
            data: Any = None, bottleneck: Any = None, bench: Workbench | None = None
            ) -> RunRecord:
    """Run one task where the engine put it, its log in ``task.log_path()``; the record is
    returned, not stored. A failure raises :class:`RunError` with the log's last lines.

    ``data`` and ``bottleneck`` are the embeddings and the seed's keys when the engine
    shipped them (Ray); otherwise the Workbench reads them from the cache and ``keys_dir``
    (and fits and stores the keys if they are not there)."""
    from kvb_avalanche.experiments.runner import run_split
    from kvb_avalanche.plugin import FrozenCodesPlugin

    path = task.log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()  # everything the run logs, a user's strategy module included
    root.addHandler(handler)
    level = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        for spec in task.specs:
            if spec.name not in STRATEGIES:
                STRATEGIES.adopt(spec)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        log.info("run %s: start", task.name)
        store = RunStore(task.folder, task.config.to_dict())
        if data is None:
            bench = bench or Workbench(options, keys_dir=keys_dir)
            record = bench.run(task.config, task.strategy, task.seed, store)
        else:
            codes = FrozenCodesPlugin(progress=False) if bottleneck is not None else None
            record = run_split(task.config, data, task.strategy, task.seed, bottleneck, codes,
                               store, progress=False,
                               checkpoint_every=options.checkpoint_every)
        log.info("run %s: done", task.name)
        return record
    except Exception as e:
        log.error("run %s failed:\n%s", task.name, traceback.format_exc())
        handler.flush()
        raise RunError(f"{type(e).__name__}: {e}", tail(path)) from e
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def fit_keys(config: ExperimentConfig, seed: int, options: RunOptions, keys_dir: Path,
             threads: int) -> None:
    """A SLURM key-fit job: fit the seed's keys and store them under ``keys_dir``."""
    import torch

    torch.set_num_threads(threads)
    Workbench(options, keys_dir=keys_dir).keys(config, seed)


# ---------------------------------------------------------------------------- the interface
class Engine(ABC):
    """Runs a sweep's tasks; see the module's docstring for the contract."""

    name: ClassVar[str]
    accepts: ClassVar[frozenset[str]] = frozenset()  # EngineOptions it honours
    extra: ClassVar[str | None] = None  # the pip extra it needs
    module: ClassVar[str | None] = None  # the library of that extra
    # runs execute on other machines, where 'auto' could resolve to another device: the
    # sweep fixes it (cuda with GPUs per run, else cpu) before identities are derived
    resolves_auto_device: ClassVar[bool] = True

    def __init__(self, options: EngineOptions, run_options: RunOptions, out: Path,
                 bench: Workbench) -> None:
        self.options, self.run_options, self.out, self.bench = options, run_options, out, bench
        self.keys_dir = bench.keys_dir

    @classmethod
    def check_options(cls, options: EngineOptions) -> None:
        """ConfigError naming the first option this engine cannot honour."""
        for name in options.given():
            if name not in cls.accepts:
                takers = [e for e, c in ENGINES.items() if name in c.accepts]
                raise ConfigError(name, f"{{{name}}} is not an option of --engine {cls.name} "
                                  f"(it is one of --engine {' and '.join(takers)})")

    def open(self) -> None:  # noqa: B027 (a hook: the local engine needs none)
        """Connect to the cluster and check it can run what is asked; ConfigError if not.
        Nothing is written or submitted yet."""

    @abstractmethod
    def submit(self, tasks: Sequence[RunTask]) -> None:
        """Queue runs (one wave)."""

    @abstractmethod
    def results(self) -> Iterator[Outcome]:
        """Each queued run's outcome as it ends, until none is queued (runs submitted
        while iterating included)."""

    def close(self) -> None:  # noqa: B027 (a hook)
        """Release what :meth:`open` took."""


# ---------------------------------------------------------------------------- local
class LocalEngine(Engine):
    """One run after another in this process, sharing embeddings, keys and code caches."""

    name = "local"
    resolves_auto_device = False  # one machine: 'auto' is what it has

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queue: deque[RunTask] = deque()

    def submit(self, tasks: Sequence[RunTask]) -> None:
        self._queue.extend(tasks)

    def results(self) -> Iterator[Outcome]:
        while self._queue:
            task = self._queue.popleft()
            try:
                record = execute(task, self.run_options, self.keys_dir, bench=self.bench)
            except RunError as e:
                yield Outcome(task, None, str(e), e.log_tail)
            else:
                yield Outcome(task, record)


# ---------------------------------------------------------------------------- ray
def _ray_fit(config: ExperimentConfig, data: Any, seed: int, threads: int) -> Any:
    import torch

    from kvb_avalanche.experiments.runner import fit_bottleneck

    torch.set_num_threads(threads)
    return fit_bottleneck(config, data, seed, progress=False)


class RayEngine(Engine):
    """Each run a Ray task; records come back to the driver."""

    name = "ray"
    accepts = frozenset({"address", "cpus_per_run", "gpus_per_run"})
    extra, module = "ray", "ray"

    def open(self) -> None:
        import ray

        self._started = not ray.is_initialized()
        if self._started:
            try:
                ray.init(address=self.options.address, include_dashboard=False,
                         log_to_driver=False)
            except ConnectionError as e:
                self._started = False
                raise ConfigError("address", f"{{address}} {self.options.address}: no Ray "
                                  f"cluster answers there ({e})") from e
        self.cpus = self.options.cpus_per_run if self.options.cpus_per_run is not None else 1
        self.gpus = self.options.gpus_per_run or 0
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        for name, key, asked in (("cpus_per_run", "CPU", self.cpus),
                                 ("gpus_per_run", "GPU", self.gpus)):
            most = max((n.get(key, 0) for n in nodes), default=0)
            if asked > most:
                self.close()
                raise ConfigError(name, f"{{{name}}} {asked:g}: no node of the Ray cluster has "
                                  f"that many ({key} per node: at most {most:g})")
        for module in self.options.imports:  # their code travels with the tasks
            ray.cloudpickle.register_pickle_by_value(sys.modules[module])
        self.threads = threads_for(self.cpus)
        self._fit = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(_ray_fit)
        self._run = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(execute)
        self._data: dict[tuple, Any] = {}  # data identity -> object ref
        self._keys: dict[tuple, Any] = {}  # key identity -> object ref (a fit or stored keys)
        self._fits: dict[Any, tuple[tuple, Path]] = {}  # fit in flight -> its key identity, file
        self._pending: dict[Any, tuple[RunTask, Any]] = {}  # run -> its task, its keys' ref
        self._refused: list[Outcome] = []  # runs whose inputs the driver could not make

    def submit(self, tasks: Sequence[RunTask]) -> None:

        for task in tasks:
            try:  # the driver's own part (embeddings, stored keys) fails like a run
                dkey, keys = self._inputs(task)
            except Exception as e:  # noqa: BLE001
                self._refused.append(Outcome(task, None, f"{type(e).__name__}: {e}"[:2000]))
                continue
            ref = self._run.remote(task, self.run_options, self.keys_dir, self.threads,
                                   self._data[dkey], keys)
            self._pending[ref] = (task, keys)

    def _inputs(self, task: RunTask) -> tuple[tuple, Any]:
        """The task's data identity (its embeddings put in the object store) and its keys:
        stored by an earlier run, or the fit that the run waits for (one per key identity,
        fitted again only after it failed)."""
        import ray

        from kvb_avalanche.experiments.runner import data_identity, load_keys

        config, seed = task.config, task.seed
        dkey = data_identity(config)
        if dkey not in self._data:
            self._data[dkey] = ray.put(self.bench.data(config))
        if not STRATEGIES[task.strategy].uses_bottleneck:
            return dkey, None
        kkey = key_identity(config, seed)
        if kkey not in self._keys:
            path = self.bench.keys_path(config, seed)
            if path is not None and path.exists():  # stored by an earlier run
                self._keys[kkey] = ray.put(load_keys(config, self.bench.data(config), seed,
                                                     path))
            else:
                self._keys[kkey] = self._fit.remote(config, self._data[dkey], seed,
                                                    self.threads)
                self._fits[self._keys[kkey]] = (kkey, path)
        return dkey, self._keys[kkey]

    def results(self) -> Iterator[Outcome]:
        import ray

        from kvb_avalanche.experiments.runner import save_keys

        while self._pending or self._fits or self._refused:
            while self._refused:
                yield self._refused.pop(0)
            if not (self._pending or self._fits):
                break
            ready, _ = ray.wait([*self._fits, *self._pending], num_returns=1)
            ref = ready[0]
            if ref in self._fits:  # stored the moment it arrives, as a run's record is
                kkey, path = self._fits.pop(ref)
                try:
                    bottleneck = ray.get(ref)
                except ray.exceptions.RayError:  # its runs report it; a retry fits again
                    if self._keys.get(kkey) is ref:
                        del self._keys[kkey]
                else:
                    if path is not None:
                        save_keys(bottleneck, path)
                continue
            task, keys = self._pending.pop(ref)
            try:
                record = ray.get(ref)
            except ray.exceptions.RayError as e:  # the run's exception, or its worker died
                cause = getattr(e, "cause", None) or e
                kkey = key_identity(task.config, task.seed) if keys is not None else None
                if kkey is not None and self._keys.get(kkey) is keys and keys not in self._fits:
                    del self._keys[kkey]  # its object may be lost: a retry reads the keys
                    # the driver stored (or, if their fit failed, fits them again)
                yield Outcome(task, None, f"{type(cause).__name__}: {cause}"[:2000],
                              getattr(cause, "log_tail", []) or tail(task.log_path()))
            else:
                yield Outcome(task, record)

    def close(self) -> None:
        import ray

        if getattr(self, "_started", False):
            ray.shutdown()
            self._started = False


# ---------------------------------------------------------------------------- slurm
class SlurmEngine(Engine):
    """SLURM job arrays through submitit: per wave, one array of key fits and one of runs
    that depends on it. Needs a file system shared with the nodes (DIR, the embedding
    cache). Job states come from submitit (sacct), and from squeue where the cluster keeps
    no accounting: a job that ended without a result (cancelled, killed, out of time) is a
    failure either way, never a wait."""

    name = "slurm"
    accepts = frozenset({"cpus_per_run", "gpus_per_run", "partition", "time_min", "mem_gb"})
    extra, module = "slurm", "submitit"

    def open(self) -> None:
        import cloudpickle  # submitit's pickler

        if shutil.which("sbatch") is None:
            raise ConfigError("engine", "{engine} slurm: no sbatch on PATH; run the sweep on a "
                              "SLURM login node")
        gpus = self.options.gpus_per_run or 0
        if gpus != int(gpus):
            raise ConfigError("gpus_per_run", f"{{gpus_per_run}} {gpus:g}: SLURM gives whole "
                              "GPUs (an integer)")
        self.partition = self.options.partition or _default_partition()
        nodes = _partition_nodes(self.partition)
        cpus = self.options.cpus_per_run or 1
        for name, asked, most, unit in (
                ("cpus_per_run", cpus, max(n[0] for n in nodes), "CPUs"),
                ("mem_gb", self.options.mem_gb or 0, max(n[1] for n in nodes) / 1024, "GB"),
                ("gpus_per_run", gpus, max(n[2] for n in nodes), "GPUs")):
            if asked > most:
                raise ConfigError(name, f"{{{name}}} {asked:g}: no node of partition "
                                  f"{self.partition!r} has that many ({unit} per node: at most "
                                  f"{most:g})")
        limit = nodes[0][3]  # the partition's time limit (minutes; None: none)
        if self.options.time_min is not None and limit is not None \
                and self.options.time_min > limit:
            raise ConfigError("time_min", f"{{time_min}} {self.options.time_min}: partition "
                              f"{self.partition!r} allows at most {limit} minutes a job")
        self.time_min = self.options.time_min or min(limit or 24 * 60, 24 * 60)
        self.cpus, self.gpus = math.ceil(cpus), int(gpus)
        for module in self.options.imports:  # their code travels by value with the jobs
            cloudpickle.register_pickle_by_value(sys.modules[module])
        self.job_name = "kvb-sweep-" + _digest(str(self.out))
        self._cancelled_leftovers = False
        self._jobs: dict[str, tuple[Any, RunTask | None]] = {}  # job id -> job, its run
        self._ended: dict[str, float] = {}  # job id -> when squeue first showed it ended
        self._refused: list[Outcome] = []  # runs sbatch refused: failures like any other
        self._polled = 0.0

    def _cancel(self) -> None:
        user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        subprocess.run(["scancel", "--name", self.job_name, *(["--user", user] if user else [])],
                       capture_output=True, check=False)

    def _executor(self, what: str, dependency: str | None = None) -> Any:
        import submitit

        executor = submitit.AutoExecutor(folder=self.out / "slurm" / "%j", cluster="slurm")
        executor.update_parameters(
            name=self.job_name, slurm_partition=self.partition, cpus_per_task=self.cpus,
            timeout_min=self.time_min,
            **({"mem_gb": self.options.mem_gb} if self.options.mem_gb else {}),
            **({"gpus_per_node": self.gpus} if self.gpus else {}),
            slurm_additional_parameters={"dependency": dependency} if dependency else {},
            slurm_comment=what)
        return executor

    def submit(self, tasks: Sequence[RunTask]) -> None:
        if not tasks:
            return
        if not self._cancelled_leftovers:  # a killed driver's jobs may still run: cancelled,
            self._cancel()  # their runs submitted again (after every check has passed)
            self._cancelled_leftovers = True
        fits, seen = [], set()
        for task in tasks:  # keys not stored yet: one fit job per (keys, seed)
            if STRATEGIES[task.strategy].uses_bottleneck:
                kkey = key_identity(task.config, task.seed)
                path = self.bench.keys_path(task.config, task.seed)
                if kkey not in seen and not (path is not None and path.exists()):
                    seen.add(kkey)
                    fits.append((task.config, task.seed))
        try:
            dependency = None
            if fits:
                executor = self._executor("key fits")
                with executor.batch():
                    jobs = [executor.submit(fit_keys, config, seed, self.run_options,
                                            self.keys_dir, self.cpus) for config, seed in fits]
                self._jobs.update({job.job_id: (job, None) for job in jobs})
                dependency = "afterany:" + ":".join(sorted({j.job_id.split("_")[0]
                                                            for j in jobs}))
            executor = self._executor("runs", dependency)
            with executor.batch():
                jobs = [executor.submit(execute, task, self.run_options, self.keys_dir,
                                        self.cpus) for task in tasks]
        except Exception as e:  # noqa: BLE001 (sbatch's refusal, whatever its form)
            error = f"sbatch refused the jobs: {type(e).__name__}: {e}"[:2000]
            self._refused += [Outcome(task, None, error) for task in tasks]
            return
        self._jobs.update({job.job_id: (job, task) for job, task in zip(jobs, tasks,
                                                                        strict=True)})
        log.info("slurm: submitted %d key fit(s) and %d run(s) (job %s)", len(fits),
                 len(tasks), jobs[0].job_id.split("_")[0])

    def results(self) -> Iterator[Outcome]:
        while self._jobs or self._refused:
            while self._refused:
                yield self._refused.pop(0)
            ended = self._ended_without_result()
            finished = [i for i, (job, _) in self._jobs.items() if job.done() or i in ended]
            if not finished:
                time.sleep(1.0)
                continue
            for job_id in finished:
                job, task = self._jobs.pop(job_id)
                outcome = self._outcome(job, task, ended.get(job_id))
                if task is not None:
                    yield outcome
                elif outcome.error:  # a key fit: the runs that depend on it fit them again
                    log.warning("slurm: key fit job %s failed (its runs fit the keys "
                                "themselves): %s; log: %s", job_id, outcome.error,
                                job.paths.stderr)

    @staticmethod
    def _outcome(job: Any, task: RunTask | None, ended: str | None) -> Outcome:
        if ended is not None and not job.done():
            return Outcome(task, None, f"job {job.job_id} ended {ended} without a result",
                           tail(task.log_path()) if task else [])
        try:
            record = job.result()
        except Exception as e:  # noqa: BLE001 (the job's exception, or its end)
            # submitit gives the job's traceback as text: the run's own error is its last
            # RunError line; a job that ended without a result says so
            raised = re.findall(r"RunError: (.+)", str(e))
            error = raised[-1] if raised else f"{type(e).__name__}: {e}"
            return Outcome(task, None, error[:2000], tail(task.log_path()) if task else [])
        return Outcome(task, record)

    def _ended_without_result(self) -> dict[str, str]:
        """Job id -> its state, for jobs squeue shows ended for over GRACE_S seconds (their
        result, if any, has landed by then) that submitit has not seen end."""
        now = time.monotonic()
        if now - self._polled < 5.0 or not self._jobs:
            return {}
        self._polled = now
        states = _squeue_states(self.job_name)
        if states is None:  # squeue did not answer: ask again at the next poll
            return {}
        out = {}
        for job_id in self._jobs:
            state = states.get(job_id, "GONE")  # no longer listed (past MinJobAge): ended
            if state not in ENDED:
                self._ended.pop(job_id, None)  # requeued, say: its grace starts anew
                continue
            first = self._ended.setdefault(job_id, now)
            if now - first >= GRACE_S:
                out[job_id] = state
        return out

    def close(self) -> None:
        if getattr(self, "_jobs", None):
            self._cancel()


# job states after which a job writes no more results (GONE: squeue lists it no more)
ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "GONE", "NODE_FAIL",
         "OUT_OF_MEMORY", "REVOKED", "TIMEOUT"}
GRACE_S = 20.0  # a result file lands this long after its job's end, at most


def _squeue_states(job_name: str) -> dict[str, str] | None:
    """Job id (``123_4`` for array tasks, pending ones expanded) -> state of this user's jobs
    named ``job_name``, from squeue, which lists ended jobs for the cluster's MinJobAge:
    what the driver reads where sacct cannot answer. None if squeue failed."""
    out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "--me", "-n", job_name,
                          "-o", "%i %T"], capture_output=True, text=True)
    if out.returncode:
        return None
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _default_partition() -> str:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True)
    default = [p[:-1] for p in out.stdout.split() if p.endswith("*")]
    if out.returncode or not default:
        raise ConfigError("partition", "{partition}: the cluster names no default partition "
                          f"(sinfo: {out.stderr.strip() or out.stdout.strip()!r}); pass one")
    return default[0]


def _minutes(limit: str) -> int | None:
    """A SLURM time limit (``days-hours[:minutes[:seconds]]``, ``hours:minutes:seconds``,
    ``minutes:seconds``, ``minutes``) in whole minutes; None for ``infinite``."""
    if limit.lower() in ("infinite", "unlimited"):
        return None
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # days-hours[:minutes[:seconds]]
        parts = parts + [0] * (3 - len(parts))
    elif len(parts) == 1:  # minutes
        parts = [0, parts[0], 0]
    hours, minutes, seconds = [0] * (3 - len(parts)) + parts
    return int(days or 0) * 1440 + hours * 60 + minutes + (seconds > 0)


def _gpus(gres: str) -> int:
    """GPUs in a GRES string: ``gpu:4``, ``gpu:a100:4(S:0-1)``, ``(null)``."""
    total = 0
    for item in re.sub(r"\(.*?\)", "", gres).split(","):
        fields = item.split(":")
        if fields[0] == "gpu" and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def _partition_nodes(partition: str) -> list[tuple[int, int, int, int | None]]:
    """(CPUs, memory MB, GPUs, time limit in minutes) of each node configuration of
    ``partition``."""
    out = subprocess.run(["sinfo", "-h", "-p", partition, "-o", "%c %m %G %l"],
                         capture_output=True, text=True)
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode or not rows:
        raise ConfigError("partition", f"{{partition}} {partition!r}: no such partition "
                          f"(sinfo: {out.stderr.strip() or 'no nodes'})")
    return [(int(cpus.rstrip("+")), int(mem.rstrip("+")), _gpus(gres), _minutes(limit))
            for cpus, mem, gres, limit in rows]


ENGINES: dict[str, type[Engine]] = {e.name: e for e in (LocalEngine, RayEngine, SlurmEngine)}


def engine_class(name: str) -> type[Engine]:
    """The engine named ``name``; ConfigError if unknown or its extra is missing."""
    if name not in ENGINES:
        raise ConfigError("engine", f"{{engine}} must be one of {', '.join(ENGINES)}, "
                          f"got {name!r}")
    cls = ENGINES[name]
    if cls.module is not None:
        try:
            importlib.import_module(cls.module)
        except ImportError as e:
            what = "Ray" if cls.module == "ray" else cls.module
            raise ConfigError("engine", f"{{engine}} {name} needs {what}: pip install "
                              f"'kvb-avalanche[{cls.extra}]'") from e
    return cls
