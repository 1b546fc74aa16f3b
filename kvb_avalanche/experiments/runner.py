"""The runner: an experiment's runs, each a strategy on a seed, through Avalanche.

Every strategy is trained on the same stream and measured by the same evaluation plugin
after every experience on the whole test stream (:func:`run_stream`), so KVB and the
baselines are measured by exactly the same code. A run's record is stored the moment it
finishes; a continual run is checkpointed between experiences (at most every
``RunOptions.checkpoint_every`` seconds) and resumed from there; a seed's fitted keys are
stored under ``OUT/checkpoints/keys/`` and read back instead of fitted again (an experiment
removes them once all its runs are stored; a sweep keeps them, to grow).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from avalanche.benchmarks.scenarios import split_online_stream
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics, loss_metrics
from avalanche.logging import BaseLogger, CSVLogger, InteractiveLogger
from avalanche.training.plugins import EvaluationPlugin

from kvb_avalanche.benchmarks.embedded import (
    DataOptions,
    EmbeddedSplits,
    class_order,
    embed_dataset,
)
from kvb_avalanche.bottleneck import KeyValueBottleneck
from kvb_avalanche.checkpoint import maybe_load_checkpoint, save_checkpoint
from kvb_avalanche.decoders import VotingDecoder
from kvb_avalanche.device import resolve_device
from kvb_avalanche.encoders import build_encoder, check_resolution
from kvb_avalanche.experiments.config import ConfigError, ExperimentConfig, ToyConfig
from kvb_avalanche.experiments.identity import Stage, changes, embedded_fields, identity
from kvb_avalanche.experiments.records import MatrixRow, RunRecord, RunStore
from kvb_avalanche.experiments.reports import (
    diagnostics_rows,
    key_sharing_rows,
    plot_regions,
    write_split_reports,
    write_toy_reports,
)
from kvb_avalanche.experiments.spec import point_frame
from kvb_avalanche.experiments.strategies import STRATEGIES, TOY, BuildContext
from kvb_avalanche.io import atomic_write
from kvb_avalanche.keys import KeyFitConfig
from kvb_avalanche.metrics import MetricsCSVLogger, kvb_metrics
from kvb_avalanche.model import KVBModel
from kvb_avalanche.plugin import FrozenCodesPlugin, KVBPlugin
from kvb_avalanche.strategy import CountingRegimeWarning

log = logging.getLogger(__name__)

_EXP_ACC = "Top1_Acc_Exp/eval_phase/test_stream/"


@dataclass(frozen=True)
class RunOptions:
    """How to run, not what: none of it changes a number."""

    data_root: Path | None = None  # a local copy of the data; default: kvb_avalanche's search
    cache_dir: Path | None = None  # embeddings and decoded images; default: default_cache_dir()
    download: bool = False  # fetch the data with torchvision when no copy is found
    progress: bool = True  # progress bars and Avalanche's interactive logger
    overwrite: bool = False  # discard OUT's runs of another configuration
    # a continual run saves its progress after an experience once this many seconds have
    # passed since its last save (0: after every experience). A checkpoint holds the whole
    # strategy: with 50 experiences of the paper's bottleneck (0.8 GB) saving after each
    # one doubled the run's time, so a killed run may redo up to this long plus one experience
    checkpoint_every: float = 120.0

    def __post_init__(self) -> None:
        if not self.checkpoint_every >= 0:
            raise ConfigError("checkpoint_every", "{checkpoint_every} must be seconds >= 0, "
                              f"got {self.checkpoint_every!r}")


# ---------------------------------------------------------------------------- one stream
def make_evaluator(loggers: Sequence[BaseLogger] = (), kvb: bool = False) -> EvaluationPlugin:
    """Accuracy and forgetting at experience and stream level, plus the stream loss; with
    ``kvb``, KVB's diagnostics too (:func:`kvb_avalanche.metrics.kvb_metrics`)."""
    return EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        loss_metrics(stream=True),
        *(kvb_metrics() if kvb else []),
        loggers=list(loggers),
    )


def evaluate(strategy: Any, benchmark: Any, name: str, seed: int, trained_through: int
             ) -> list[MatrixRow]:
    """Accuracy on every test experience, via the strategy's own evaluator."""
    metrics = strategy.eval(benchmark.test_stream)
    accs = {}
    for key, value in metrics.items():
        if key.startswith(_EXP_ACC):
            accs[int(key.rsplit("Exp", 1)[1])] = float(value)
    if len(accs) != len(benchmark.test_stream):
        raise RuntimeError(f"expected accuracy for every test experience, got {sorted(accs)}")
    return [MatrixRow(name, seed, trained_through, j, accs[j]) for j in sorted(accs)]


def run_stream(
    strategy: Any, benchmark: Any, name: str, seed: int,
    after_experience: Callable[[int], None] | None = None,
    checkpoint: Path | None = None,
    state: dict | None = None,
    checkpoint_every: float = 0.0,
    online: int | None = None,
) -> tuple[list[MatrixRow], float]:
    """Train on each experience in turn, evaluating the whole test stream after each.

    Returns accuracy-matrix rows and the training wall time in seconds (evaluation excluded).
    ``after_experience(t)`` is called after training on experience t, before its evaluation.
    With ``checkpoint``, the strategy, the rows so far and ``state`` (a dict the caller
    fills, e.g. from ``after_experience``) are saved there after an experience once
    ``checkpoint_every`` seconds have passed since the last save (0: after every one); a
    checkpoint found at the start is resumed from, restoring them (``state`` in place).
    With ``online`` (a mini-experience size), each experience is trained as Avalanche's
    ``split_online_stream`` of it (shuffled by the seed), still evaluated after its end.
    """
    rows: list[MatrixRow] = []
    train_seconds, start_at = 0.0, 0
    if checkpoint is not None:
        start_at, progress = maybe_load_checkpoint(strategy, checkpoint)
        if progress is not None:
            rows, train_seconds = progress["rows"], progress["train_seconds"]
            if state is not None:
                state.update(progress["state"])
            log.info("%s seed %d: resuming after experience %d from %s", name, seed,
                     start_at - 1, checkpoint)
    last_save = time.monotonic()
    for t, experience in enumerate(benchmark.train_stream):
        if t < start_at:
            continue
        start = time.perf_counter()
        if online is None:
            strategy.train(experience, eval_streams=[])
        else:
            for mini in split_online_stream([experience], online, shuffle=True,
                                            seed=seed * 1_000 + t):
                strategy.train(mini, eval_streams=[])
        train_seconds += time.perf_counter() - start
        if after_experience is not None:
            after_experience(t)
        rows += evaluate(strategy, benchmark, name, seed, t)
        last = t == len(benchmark.train_stream) - 1  # the caller stores the finished run
        if (checkpoint is not None and not last
                and time.monotonic() - last_save >= checkpoint_every):
            save_checkpoint(strategy, checkpoint, extra={
                "rows": rows, "train_seconds": train_seconds, "state": state or {}})
            last_save = time.monotonic()
    for plugin in getattr(strategy, "plugins", []):  # a run's counting-regime count, once
        if isinstance(plugin, CountingRegimeWarning) and (said := plugin.summary()):
            log.warning("%s seed %d: %s", name, seed, said)
    return rows, train_seconds


def seed_run(seed: int) -> None:
    """Seed every global generator a run may draw from (torch on every device, numpy,
    Python's ``random``), so that a run's numbers depend on its seed alone, not on what
    ran before it in the process (Avalanche's benchmarks and strategies draw from all three;
    seeding torch alone left numpy and ``random`` where the previous run left them)."""
    torch.manual_seed(seed)  # the CPU generator and every CUDA device's
    np.random.seed(seed)
    random.seed(seed)


# ---------------------------------------------------------------------------- split CIFAR
def run_identity(config: ExperimentConfig, strategy: str, seed: int) -> tuple:
    """What decides a run's numbers: runs that share it are the same run (a baseline at two
    settings of the bottleneck, say). Derived from the fields' stage declarations and the
    run stages the strategy reads."""
    return (strategy, seed, *identity(config, *STRATEGIES[strategy].reads))


def key_identity(config: ExperimentConfig, seed: int) -> tuple:
    """What decides a seed's fitted keys: configurations that share it share the keys."""
    return (seed, *identity(config, Stage.KEYS))


def needs_keys(config: ExperimentConfig) -> bool:
    """Whether a strategy of the configuration uses the bottleneck (so the key-initialisation
    data are embedded too)."""
    return any(STRATEGIES[s].uses_bottleneck for s in config.strategies)


def data_identity(config: ExperimentConfig) -> tuple:
    """What decides the embedded data: configurations that share it share the embeddings."""
    return (needs_keys(config), *(f"{name}={getattr(config, name)!s}"
                                  for name in embedded_fields(config)))


def is_reference(strategy: str, field_name: str) -> bool:
    """Whether ``strategy``'s runs do not depend on the field (a sweep over it runs them
    once and draws them as a line across)."""
    return not STRATEGIES[strategy].reads & changes(ExperimentConfig, field_name)


def embed_data(config: ExperimentConfig, options: RunOptions) -> EmbeddedSplits:
    """The configuration's embedded splits (from the cache when they are there)."""
    try:
        encoder = build_encoder(config.encoder, config.weights)
    except ValueError as e:  # a name or weights file the library refuses
        name = "weights" if config.weights is not None and str(config.weights) in str(e) \
            else "encoder"
        raise ConfigError(name, f"{{{name}}}: {e}") from e
    try:
        check_resolution(encoder, config.resolution)
    except ValueError as e:
        raise ConfigError("resolution", f"{{resolution}}: {e}") from e
    if config.projection in ("chunk", "learned") and \
            config.codebooks * config.dim_keys != encoder.dim:
        raise ConfigError("projection", f"{{projection}} {config.projection} splits the "
                          f"encoder's "
                          f"{encoder.dim} features: {{codebooks}} x {{dim_keys}} must be "
                          f"{encoder.dim}, got {config.codebooks} x {config.dim_keys}",
                          ["codebooks", "dim_keys"])
    return embed_dataset(
        config.dataset, encoder=encoder,
        resolution=config.resolution, max_per_class=config.max_per_class,
        test_max_per_class=config.test_max_per_class,
        key_init_data=config.key_init_data if needs_keys(config) else None,
        key_init_max_per_class=config.key_init_max_per_class,
        options=DataOptions(options.data_root, options.download, options.cache_dir,
                            str(device_of(config)), options.progress))


def device_of(config: ExperimentConfig) -> torch.device:
    """The configuration's device on this machine; ConfigError if it has none."""
    try:
        return resolve_device(config.device)
    except ValueError as e:
        raise ConfigError("device", f"{{device}}: {e}") from e


def seed_class_order(config: ExperimentConfig, seed: int) -> list[int]:
    """The experiences' order: classes (or domains) 0 .. n-1, or with ``shuffle_classes`` a
    permutation seeded by ``seed``."""
    return class_order(config.spec.order_size(), seed if config.shuffle_classes else None)


def new_bottleneck(config: ExperimentConfig, data: EmbeddedSplits, seed: int
                   ) -> KeyValueBottleneck:
    """The seed's bottleneck before its keys are fitted (projection drawn from the seed)."""
    return KeyValueBottleneck(data.dim, config.codebooks, config.num_pairs, config.dim_keys,
                              config.values_dim, topk=config.topk, values_init="zeros",
                              projection=config.projection, seed=seed,
                              mask_unused_keys=config.mask_unused_keys, sparse_grad=True,
                              key_init="random" if config.key_init == "official" else "kmeans")


def fit_bottleneck(config: ExperimentConfig, data: EmbeddedSplits, seed: int,
                   progress: bool = True) -> KeyValueBottleneck:
    """The seed's bottleneck, keys fitted without labels by :class:`KVBPlugin` and frozen,
    by ``config.key_init``'s procedure (ours, or the official code's).

    Keys are fitted on the key-initialisation data, or with ``key_init_data='none'`` on the
    first experience's training embeddings, shuffled by the seed.
    """
    bn = new_bottleneck(config, data, seed)
    x = data.key_init
    if x is None:
        order = seed_class_order(config, seed)
        x = data.train[0][config.spec.first_experience(data.train[1], order,
                                                       config.n_experiences)]
    perm = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))]
    batches = [perm[i : i + config.batch_size] for i in range(0, len(perm), config.batch_size)]
    if config.key_init == "official":
        fit = KeyFitConfig.official(config.key_epochs, seed=seed)
    else:
        fit = KeyFitConfig(epochs=config.key_epochs, kmeans_samples=config.kmeans_samples,
                           kmeans_iters=config.kmeans_iters, seed=seed)
    model = KVBModel(None, bn, VotingDecoder(config.values_dim))  # (no decoder is trained)
    device = device_of(config)
    KVBPlugin(key_init_loader=batches, key_fit=fit, progress=progress).prepare(
        model.to(device), device=device)
    return bn.cpu()


# what a stored bottleneck keeps: the rest is as new_bottleneck builds it (values zero, no
# fetches counted), and the EMA state is not needed once the keys are frozen
STORED_KEYS = ("projection", "keys")


def keys_path(folder: Path, config: ExperimentConfig, data: EmbeddedSplits, seed: int
              ) -> Path:
    """Where ``folder`` stores the seed's fitted keys: named by a digest of what decides
    them, the key identity and the embeddings' identities."""
    # key_init_data "none" has no key_init record: the keys come from the train split's
    embeddings = {split: r and r.get("embedding_cache_identity")
                  for split, r in data.record.items()}
    ident = json.dumps([key_identity(config, seed), embeddings], sort_keys=True)
    return Path(folder) / f"keys-{hashlib.sha256(ident.encode()).hexdigest()[:20]}.pt"


def save_keys(bottleneck: KeyValueBottleneck, path: Path) -> None:
    """Store fitted, frozen keys (with their fit's statistics) for :func:`load_keys`."""
    payload = {"buffers": {n: getattr(bottleneck, n) for n in STORED_KEYS},
               "fit_stats": bottleneck.fit_stats}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_keys(config: ExperimentConfig, data: EmbeddedSplits, seed: int, path: Path
              ) -> KeyValueBottleneck:
    """The bottleneck :func:`fit_bottleneck` gave when it stored ``path``, keys frozen."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    bn = new_bottleneck(config, data, seed)
    for name, tensor in payload["buffers"].items():
        if getattr(bn, name).shape != tensor.shape:
            raise ValueError(f"stored keys {path} hold {name} of shape {tuple(tensor.shape)}, "
                             f"not {tuple(getattr(bn, name).shape)}: delete the file to refit")
        getattr(bn, name).copy_(tensor)
    bn.keys_initialized.fill_(True)
    bn.freeze_keys()
    bn.fit_stats = payload["fit_stats"]
    return bn


def run_split(config: ExperimentConfig, data: EmbeddedSplits, strategy_name: str, seed: int,
              bottleneck: KeyValueBottleneck | None, codes: FrozenCodesPlugin | None,
              store: RunStore | None, progress: bool = True, checkpoint_every: float = 0.0
              ) -> RunRecord:
    """One strategy on one seed of a split benchmark; returns its record.

    With a ``store``, Avalanche's CSV logs go to its ``logs/`` and a continual run is
    checkpointed between experiences (see :func:`run_stream`) and resumed from its last
    checkpoint.
    """
    spec = STRATEGIES[strategy_name]
    order = seed_class_order(config, seed)
    stream = config.spec.stream(data.train, data.test, order, config.n_experiences)
    checkpoint = store.checkpoint(strategy_name, seed) if store and not spec.joint else None
    resuming = checkpoint is not None and checkpoint.exists()
    seed_run(seed)
    # a resumed strategy gets its loggers back from the checkpoint, their files reopened
    # where they were: new ones would start them afresh
    loggers: list[BaseLogger] = []
    if store is not None and not resuming:
        logs = store.logs(strategy_name, seed)
        loggers += [CSVLogger(log_folder=str(logs)), MetricsCSVLogger(logs / "metrics.csv")]
    if progress:
        loggers.append(InteractiveLogger())
    evaluator = make_evaluator(loggers, kvb=spec.uses_bottleneck)
    own = None
    if spec.uses_bottleneck:  # the run's own copy of the seed's keys, with the run's settings
        own = copy.deepcopy(bottleneck)
        own.mask_unused_keys = config.mask_unused_keys
    ctx = BuildContext(config, seed, data.dim, config.num_classes, evaluator, own,
                       codes if spec.uses_bottleneck else None, device_of(config))
    strategy = spec.build(ctx)
    try:
        if spec.joint:  # i.i.d. upper bound: all classes at once, then the same evaluation
            joint = config.spec.joint_stream(data.train, data.test, order)
            start = time.perf_counter()
            strategy.train(joint.train_stream[0], eval_streams=[])
            train_seconds = time.perf_counter() - start
            rows = evaluate(strategy, stream, strategy_name, seed, config.n_experiences - 1)
        else:
            rows, train_seconds = run_stream(
                strategy, stream, strategy_name, seed, checkpoint=checkpoint,
                checkpoint_every=checkpoint_every,
                online=config.experience_size if config.online else None)
    finally:
        for logger in strategy.evaluator.loggers:
            if isinstance(logger, CSVLogger | MetricsCSVLogger):
                logger.close()
    metrics = strategy.evaluator.get_all_metrics()
    sharing = [] if spec.joint else key_sharing_rows(strategy_name, seed, metrics)
    extra = {}
    if spec.uses_bottleneck:
        extra["kvb_diagnostics"] = diagnostics_rows(strategy_name, seed, metrics)
        fit = bottleneck.fit_stats if bottleneck is not None else None
        if fit:  # how the seed's keys were fitted (shared by the runs that share them)
            extra["key_fit"] = {k: fit[k] for k in ("keys_in_use", "keys_replaced", "seconds")
                                if k in fit}
    return RunRecord(strategy_name, seed, train_seconds, rows, sharing, order, extra)


class Workbench:
    """Runs split-benchmark runs in this process, embedding each configuration's data and
    fitting each seed's keys once, for every run that shares them."""

    def __init__(self, options: RunOptions, keys_dir: Path | None = None) -> None:
        self.options, self.keys_dir = options, keys_dir
        self._data: dict[tuple, EmbeddedSplits] = {}
        self._keys: dict[tuple, tuple[KeyValueBottleneck, FrozenCodesPlugin]] = {}

    def data(self, config: ExperimentConfig) -> EmbeddedSplits:
        key = data_identity(config)
        if key not in self._data:
            self._data[key] = embed_data(config, self.options)
        return self._data[key]

    def keys(self, config: ExperimentConfig, seed: int
             ) -> tuple[KeyValueBottleneck, FrozenCodesPlugin]:
        key = key_identity(config, seed)
        if key not in self._keys:
            bottleneck = self._stored_or_fitted(config, seed)
            self._keys = {key: (bottleneck, FrozenCodesPlugin(progress=self.options.progress))}
        return self._keys[key]

    def keys_path(self, config: ExperimentConfig, seed: int) -> Path | None:
        """Where the seed's keys are stored (None: they are not)."""
        return None if self.keys_dir is None else keys_path(self.keys_dir, config,
                                                            self.data(config), seed)

    def _stored_or_fitted(self, config: ExperimentConfig, seed: int) -> KeyValueBottleneck:
        """Keys stored by an earlier (perhaps killed) run, else fitted and stored."""
        path = self.keys_path(config, seed)
        if path is not None and path.exists():
            log.info("seed %d: keys stored by an earlier run: %s", seed, path)
            return load_keys(config, self.data(config), seed, path)
        bottleneck = fit_bottleneck(config, self.data(config), seed, self.options.progress)
        if path is not None:
            save_keys(bottleneck, path)
        return bottleneck

    def run(self, config: ExperimentConfig, strategy: str, seed: int,
            store: RunStore | None = None) -> RunRecord:
        data = self.data(config)
        bottleneck, codes = (self.keys(config, seed) if STRATEGIES[strategy].uses_bottleneck
                             else (None, None))
        start = time.perf_counter()
        record = run_split(config, data, strategy, seed, bottleneck, codes, store,
                           self.options.progress, self.options.checkpoint_every)
        final = sum(r.accuracy for r in record.matrix
                    if r.trained_through == config.n_experiences - 1) / config.n_experiences
        log.info("seed %d %-12s final accuracy %.3f  (%.0f s)", seed, strategy, final,
                 time.perf_counter() - start)
        return record


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what ``platform`` says)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    """Package versions, this checkout's git commit (None outside a checkout) and the
    machine: an MLP head's bits follow the CPU kernels torch dispatches to (its
    capability) and its thread count, and chaotic baselines (EWC, replay) amplify them."""
    out: dict[str, str | int | None] = {
        "cpu": cpu_model(), "torch cpu capability": torch.backends.cpu.get_cpu_capability(),
        "torch threads": torch.get_num_threads()}
    for pkg in ("kvb-avalanche", "torch", "torchvision", "avalanche-lib", "numpy", "pandas"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    git = ["git", "-C", str(Path(__file__).resolve().parent)]
    try:
        out["kvb-avalanche git commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        # tracked files changed since that commit: the run's code is not the commit's
        changed = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
            text=True, check=True).stdout.split("\n")
        out["kvb-avalanche uncommitted changes"] = ", ".join(
            line[3:] for line in changed if line) or "none"
    except (OSError, subprocess.CalledProcessError):
        out["kvb-avalanche git commit"] = None
    return out


def split_title(benchmark: str) -> str:
    """A benchmark's name for figure titles (split CIFAR-10, split_fmnist ...)."""
    return benchmark.replace("split_cifar", "split CIFAR-")


def run_experiment(config: ExperimentConfig, out: Path, options: RunOptions | None = None
                   ) -> Any:
    """Run (or resume) a split-CIFAR experiment into ``out``; returns the mean/std table.

    Raises ConfigError, DataError or ValueError before anything is written to ``out``.
    """
    options = options or RunOptions()
    device = device_of(config)
    # more seeds or strategies grow the folder; any other field must match its runs'
    store = RunStore(out, config.to_dict(), options.overwrite, frame=point_frame)
    store.check()
    code = versions()  # the code as the run starts (embedding may take minutes)
    bench = Workbench(options, keys_dir=store.checkpoints / "keys")
    data = bench.data(config)
    store.open({"kind": config.kind, "options": {k: str(v) for k, v in vars(options).items()},
                "device": str(device), "versions": code, "encoder": data.encoder,
                "data": data.record})
    records = []
    for seed in config.seeds:
        for name in config.strategies:
            record = store.load(name, seed)
            if record is not None:
                log.info("seed %d %-12s already done", seed, name)
            else:
                record = bench.run(config, name, seed, store)
                store.save(record)
            records.append(record)
    # every run is stored: the keys were kept for resuming only (80 MB a seed at 256 x 4096)
    shutil.rmtree(bench.keys_dir, ignore_errors=True)
    joint = {s for s in config.strategies if STRATEGIES[s].joint}
    title = split_title(config.benchmark) + (" (online)" if config.online else "")
    return write_split_reports(out, records, list(STRATEGIES), joint, title,
                               config.num_classes, config.spec.setting)


# ---------------------------------------------------------------------------- the 2-D toy
GRID = 100  # decision regions are stored as predictions on a GRID x GRID lattice


@torch.no_grad()
def region_predictions(model: torch.nn.Module) -> list[int]:
    """Predicted class on a GRID x GRID lattice of the unit square (row-major, y up)."""
    axis = torch.linspace(0, 1, GRID)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    model.eval()
    return model(grid).argmax(1).tolist()


def run_toy(config: ToyConfig, out: Path, options: RunOptions | None = None) -> Any:
    """Run (or resume) the 2-D toy into ``out``; returns the mean/std table."""
    from kvb_avalanche.benchmarks.toy import NUM_CLASSES, Toy2D

    options = options or RunOptions()
    store = RunStore(out, config.to_dict(), options.overwrite)
    store.check()
    store.open({"kind": config.kind, "versions": versions()})
    records = []
    for seed in config.seeds:
        bench = Toy2D(seed, std=config.std)
        for name in config.strategies:
            record = store.load(name, seed)
            if record is None:
                start = time.perf_counter()
                seed_run(seed)
                ctx = BuildContext(config, seed, 2, NUM_CLASSES, make_evaluator())
                strategy = TOY[name].build(ctx)
                matrix, seconds = run_stream(strategy, bench, name, seed)
                record = RunRecord(name, seed, seconds, matrix,
                                   extra={"regions": region_predictions(strategy.model)})
                store.save(record)
                final = sum(r.accuracy for r in matrix if r.trained_through == 3) / 4
                log.info("seed %d %-16s final accuracy %.3f (%.1fs)", seed, name, final,
                         time.perf_counter() - start)
            records.append(record)
        if seed == config.seeds[0]:
            regions = {r.strategy: r.extra["regions"] for r in records if r.seed == seed}
            plot_regions(regions, bench.test_points, out / "decision_regions.png", GRID)
    return write_toy_reports(out, records, config.strategies)
