"""Sweeps: a grid of configurations x seeds x strategies, every run independent, run in this
process (``engine="local"``) or as Ray tasks (``engine="ray"``, the ``ray`` extra).

A spec has the shape of the paper's official sweep files (wandb's)::

    experiment: split_cifar10        # or split_cifar100
    preset: quick                    # optional: start from the --quick configuration
    parameters:
      codebooks: {values: [64, 256]} # swept
      kvb_lr: {value: 3.0}           # fixed
      seed: {values: [0, 1, 2]}      # seeds (or 'seeds')
      strategy: {values: [kvb, kvb_joint, joint_linear]}  # strategies (or 'strategies')

Each grid point is a configuration with its own folder ``DIR/points/<name>/`` (runs,
checkpoints, logs, as an experiment's ``OUT``); every run lands there the moment it
finishes, and re-running the same command resumes. Each seed's keys are stored under
``DIR/checkpoints/keys/`` the moment they are fitted (named by what decides them), so a
killed or grown sweep does not fit them again. A run that does not depend on a swept
field (a baseline, when only the bottleneck's fields are swept) runs once per seed and is
stored at every point that shares it: the baselines are references, not repeated work.
``DIR/summary.csv`` and ``DIR/accuracy_matrix.csv`` cover the whole grid with one column per
swept field (and KVB's diagnostics at the end of each run), ``DIR/sweep.png`` shows final
accuracy against each swept field, class-incremental and i.i.d. side by side, with the seed
spread and the references as lines, and ``DIR/sweep_diagnostics.png`` KVB's forgetting,
training loss, value scale and keys in use against them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from kvb_avalanche.experiments.config import (
    BENCHMARK_DEFAULTS,
    QUICK,
    ConfigError,
    ExperimentConfig,
)
from kvb_avalanche.experiments.records import SUMMARY_COLUMNS, RunRecord, RunStore, write_json
from kvb_avalanche.experiments.reports import (
    matrix_table,
    pyplot,
    savefig,
    summary_table,
    write_csv,
)
from kvb_avalanche.experiments.runner import (
    BOTTLENECK_FIELDS,
    RunOptions,
    Workbench,
    data_identity,
    fit_bottleneck,
    key_identity,
    load_keys,
    run_identity,
    run_split,
    save_keys,
    versions,
)
from kvb_avalanche.experiments.strategies import STRATEGIES

log = logging.getLogger(__name__)

EXPERIMENTS = ("split_cifar10", "split_cifar100")
PRESETS = {"quick": QUICK}
SEED_KEYS, STRATEGY_KEYS = ("seed", "seeds"), ("strategy", "strategies")
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: fixed field values, the swept fields' values, seeds, strategies."""

    experiment: str
    preset: str | None
    fixed: dict[str, Any]
    grid: dict[str, list[Any]]  # swept field -> values, in the spec's order
    seeds: tuple[int, ...]
    strategies: tuple[str, ...]

    def quick(self) -> SweepSpec:
        """A first look at the sweep: the ``quick`` preset under the same grid, one seed."""
        return dataclasses.replace(self, preset="quick", seeds=self.seeds[:1])

    def to_dict(self) -> dict:
        """Plain JSON types (lists, not tuples), as config.json holds it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def points(self) -> list[tuple[dict[str, Any], ExperimentConfig]]:
        """Every grid point's swept values and configuration, in grid order."""
        out = [{}]
        for name, values in self.grid.items():
            out = [{**p, name: v} for p in out for v in values]
        base = {**BENCHMARK_DEFAULTS[self.experiment], **PRESETS.get(self.preset or "", {}),
                **self.fixed,
                "benchmark": self.experiment, "seeds": list(self.seeds),
                "strategies": list(self.strategies)}
        configs = []
        for point in out:
            try:
                configs.append((point, ExperimentConfig.from_dict({**base, **point})))
            except ConfigError as e:
                raise ConfigError(e.field, f"parameters at {point_name(point)}: {e.template}",
                                  e._names) from e
        return configs


def sweep_frame(spec: dict) -> dict:
    """What a sweep folder pins down: the experiment, the preset, the fixed values and which
    fields are swept. Re-running it with other values, seeds or strategies extends it (each
    point's own store still refuses a configuration that differs from its runs')."""
    return {"experiment": spec.get("experiment"), "preset": spec.get("preset"),
            "fixed": spec.get("fixed"), "parameters": list(spec.get("grid") or {})}


def point_frame(config: dict) -> dict:
    """What a grid point's folder pins down: its configuration but the seeds and strategies
    (each run is stored on its own, by strategy and seed)."""
    return {k: v for k, v in config.items() if k not in ("seeds", "strategies")}


def point_name(point: dict[str, Any]) -> str:
    """A folder name for a grid point: field=value pairs, or 'base' for a grid of one."""
    if not point:
        return "base"
    name = ",".join(f"{k}={v}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", name)


def parse_spec(raw: Any, where: str = "spec") -> SweepSpec:
    """A SweepSpec from a parsed YAML/JSON mapping; ConfigError names the bad entry."""
    if not isinstance(raw, dict):
        raise ConfigError("spec", f"{where} must be a mapping with 'parameters', got "
                          f"{type(raw).__name__}")
    allowed = {"experiment", "preset", "method", "parameters", "program", "name", "description"}
    for key in raw:
        if key not in allowed:
            raise ConfigError(str(key), f"{where}: unknown entry {key!r}; the entries are "
                              f"{', '.join(sorted(allowed))}")
    experiment = raw.get("experiment", "split_cifar10")
    if experiment not in EXPERIMENTS:
        raise ConfigError("experiment", f"{where}: experiment must be one of "
                          f"{', '.join(EXPERIMENTS)}, got {experiment!r}")
    if raw.get("method", "grid") != "grid":
        raise ConfigError("method", f"{where}: only method 'grid' is supported, got "
                          f"{raw['method']!r}")
    preset = raw.get("preset")
    if preset is not None and preset not in PRESETS:
        raise ConfigError("preset", f"{where}: preset must be one of {', '.join(PRESETS)}, "
                          f"got {preset!r}")
    parameters = raw.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise ConfigError("parameters", f"{where}: 'parameters' must be a non-empty mapping of "
                          "field: {value: v} or {values: [v, ...]}")
    fields = [f.name for f in dataclasses.fields(ExperimentConfig)]
    fixed, grid = {}, {}
    seeds: tuple[int, ...] = ExperimentConfig.__dataclass_fields__["seeds"].default
    strategies = tuple(STRATEGIES)
    for name, entry in parameters.items():
        if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in (
                "value", "values"):
            raise ConfigError(str(name), f"parameters.{name} must be {{value: v}} or "
                              f"{{values: [v, ...]}}, got {entry!r}")
        kind, value = next(iter(entry.items()))
        values = value if kind == "values" else [value]
        if kind == "values" and (not isinstance(value, list) or not value):
            raise ConfigError(str(name), f"parameters.{name}.values must be a non-empty list, "
                              f"got {value!r}")
        if name in SEED_KEYS + STRATEGY_KEYS:
            flat = [x for v in values for x in (v if isinstance(v, list) else [v])]
            if name in SEED_KEYS:
                if not all(isinstance(s, int) and not isinstance(s, bool) for s in flat):
                    raise ConfigError(str(name), f"parameters.{name}: seeds must be integers, "
                                      f"got {flat!r}")
                seeds = tuple(flat)
            else:
                strategies = tuple(str(s) for s in flat)
            continue
        if name not in fields or name == "benchmark":
            close = difflib.get_close_matches(str(name), fields, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(str(name), f"parameters.{name}: unknown field{hint}; the fields "
                              f"of ExperimentConfig are {', '.join(f for f in fields)}")
        if kind == "values" and len(values) > 1:
            grid[name] = values
        else:
            fixed[name] = values[0]
    spec = SweepSpec(experiment, preset, fixed, grid, seeds, strategies)
    spec.points()  # every point must be a valid configuration
    return spec


def load_spec(path: Path) -> SweepSpec:
    """Read a YAML (or JSON) sweep file."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError("spec", f"sweep file {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError("spec", f"sweep file {path} is not valid YAML: {e}") from e
    return parse_spec(raw, where=f"sweep file {path}")


# ---------------------------------------------------------------------------- running
@dataclass(frozen=True)
class RunTask:
    point: dict[str, Any]
    config: ExperimentConfig
    strategy: str
    seed: int
    folder: Path  # the point's folder


class SweepFailed(RuntimeError):
    """Some runs failed (after their retries); the others are stored."""


def check_engine(engine: str) -> None:
    """ConfigError unless the engine exists and can be imported."""
    if engine not in ENGINES:
        raise ConfigError("engine", f"{{engine}} must be one of {', '.join(ENGINES)}, "
                          f"got {engine!r}")
    if engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise ConfigError("engine", "{engine} ray needs Ray: pip install "
                              "'kvb-avalanche[ray]'") from e


def run_sweep(spec: SweepSpec, out: Path, options: RunOptions | None = None, *,
              engine: str = "local", address: str | None = None, cpus_per_run: float = 1,
              gpus_per_run: float = 0, retries: int = 1) -> pd.DataFrame:
    """Run (or resume) every run of the sweep into ``out``; returns the summary table.

    Raises ConfigError before anything is written when the spec, the engine or ``out`` is
    bad; SweepFailed at the end if runs failed after ``retries`` (the rest are stored).
    """
    options = options or RunOptions()
    check_engine(engine)
    sweep_store = RunStore(out, spec.to_dict(), options.overwrite, frame=sweep_frame)
    sweep_store.check()
    points = spec.points()
    stores = {point_name(p): RunStore(out / "points" / point_name(p), c.to_dict(),
                                      options.overwrite, frame=point_frame) for p, c in points}
    for store in stores.values():
        store.check()
    bench = Workbench(options, keys_dir=sweep_store.checkpoints / "keys")
    for _, config in points:  # every data set embedded (or found cached) before a file is written
        bench.data(config)
    sweep_store.open({"kind": "sweep", "versions": versions(),
                      "options": {k: str(v) for k, v in vars(options).items()}})
    for (point, config), store in zip(points, stores.values(), strict=True):
        store.open({"kind": config.kind, "point": point})
    runs = [(point_name(point), config, point, strategy, seed) for point, config in points
            for seed in spec.seeds for strategy in spec.strategies]
    records: dict[tuple, RunRecord] = {}
    finished: dict[tuple, RunRecord] = {}  # run identity -> its record, wherever it is stored
    for name, config, _, strategy, seed in runs:
        if (record := stores[name].load(strategy, seed)) is not None:
            records[name, strategy, seed] = record
            finished[run_identity(config, strategy, seed)] = record
    tasks: list[RunTask] = []
    shared: dict[tuple, list[tuple]] = {}  # a task's key -> the points that share its run
    first: dict[tuple, tuple] = {}  # run identity -> the key of the task that runs it
    for name, config, point, strategy, seed in runs:
        key, identity = (name, strategy, seed), run_identity(config, strategy, seed)
        if key in records:
            continue
        if identity in finished:  # run at another point already: stored here too
            stores[name].save(finished[identity])
            records[key] = finished[identity]
        elif identity in first:
            shared[first[identity]].append(key)
        else:
            first[identity], shared[key] = key, []
            tasks.append(RunTask(point, config, strategy, seed, stores[name].out))
    log.info("sweep %s: %d runs, %d done, %d to run on %s, %d shared with another point", out,
             len(runs), len(records), len(tasks), engine,
             sum(len(v) for v in shared.values()))
    failures: dict[str, str] = {}
    bar = tqdm(total=len(tasks), desc="sweep runs", disable=not options.progress)

    def done(task: RunTask, record: RunRecord | None, error: str | None = None) -> None:
        key = (point_name(task.point), task.strategy, task.seed)
        if record is not None:
            for where in (key, *shared[key]):
                stores[where[0]].save(record)
                records[where] = record
        else:
            failures["/".join(map(str, key))] = error or "failed"
            log.error("run %s failed: %s", "/".join(map(str, key)), error)
        bar.update()

    tasks.sort(key=lambda t: (key_identity(t.config, t.seed), t.seed))  # shared keys adjacent
    if engine == "local":
        _run_local(tasks, bench, done)
    else:
        _run_ray(tasks, bench, done, address, cpus_per_run, gpus_per_run, retries)
    bar.close()
    summary = write_sweep_reports(out, spec, records)
    if failures:
        write_json(failures, out / "failures.json")
        raise SweepFailed(f"{len(failures)} of {len(tasks)} runs failed (see "
                          f"{out / 'failures.json'}): {', '.join(failures)}; the rest are "
                          "stored: re-run the same command to retry the failed ones")
    (out / "failures.json").unlink(missing_ok=True)
    return summary


def _run_local(tasks: list[RunTask], bench: Workbench,
               done: Callable[[RunTask, RunRecord | None, str | None], None]) -> None:
    for task in tasks:
        store = RunStore(task.folder, task.config.to_dict())
        done(task, bench.run(task.config, task.strategy, task.seed, store), None)


def _remote_fit(config: ExperimentConfig, data: Any, seed: int) -> Any:
    return fit_bottleneck(config, data, seed, progress=False)


def _remote_run(task: RunTask, data: Any, bottleneck: Any, threads: int,
                checkpoint_every: float) -> RunRecord:
    import torch

    from kvb_avalanche.plugin import FrozenCodesPlugin

    torch.set_num_threads(threads)
    store = RunStore(task.folder, task.config.to_dict())
    codes = FrozenCodesPlugin(progress=False) if bottleneck is not None else None
    return run_split(task.config, data, task.strategy, task.seed, bottleneck, codes, store,
                     progress=False, checkpoint_every=checkpoint_every)


def _run_ray(tasks: list[RunTask], bench: Workbench,
             done: Callable[[RunTask, RunRecord | None, str | None], None],
             address: str | None, cpus: float, gpus: float, retries: int) -> None:
    """Embeddings are computed here, once, and shared through Ray's object store; each
    (keys, seed) is fitted by one task; each run is a task that depends on them. Records
    come back to this process, which stores each the moment it arrives."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        data_refs: dict[tuple, Any] = {}
        key_refs: dict[tuple, Any] = {}
        fits: dict[Any, Path] = {}  # a fit in flight -> where its keys are stored
        fit = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=retries)(_remote_fit)
        run = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=retries,
                         retry_exceptions=retries > 0)(_remote_run)
        pending: dict[Any, RunTask] = {}
        for task in tasks:
            dkey = data_identity(task.config)
            if dkey not in data_refs:
                data_refs[dkey] = ray.put(bench.data(task.config))
            keys_ref = None
            if STRATEGIES[task.strategy].uses_bottleneck:
                kkey = key_identity(task.config, task.seed)
                if kkey not in key_refs:
                    path = bench.keys_path(task.config, task.seed)
                    if path is not None and path.exists():  # stored by an earlier run
                        key_refs[kkey] = ray.put(load_keys(task.config, bench.data(task.config),
                                                           task.seed, path))
                    else:
                        key_refs[kkey] = fit.remote(task.config, data_refs[dkey], task.seed)
                        if path is not None:
                            fits[key_refs[kkey]] = path
                keys_ref = key_refs[kkey]
            ref = run.remote(task, data_refs[dkey], keys_ref, max(1, int(cpus)),
                             bench.options.checkpoint_every)
            pending[ref] = task
        while pending or fits:
            ready, _ = ray.wait([*fits, *pending], num_returns=1)
            if ready[0] in fits:  # stored the moment it arrives, as a run's record is
                path = fits.pop(ready[0])
                try:
                    save_keys(ray.get(ready[0]), path)
                except ray.exceptions.RayError:
                    pass  # the runs that needed these keys report the failure
                continue
            task = pending.pop(ready[0])
            try:
                record = ray.get(ready[0])
            except ray.exceptions.RayError as e:  # the run's exception, or its worker died
                cause = getattr(e, "cause", None) or e
                done(task, None, f"{type(cause).__name__}: {cause}"[:2000])
            else:
                done(task, record, None)
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------- reports
# KVB's state at the end of a run (empty for the baselines)
DIAGNOSTIC_COLUMNS = {
    "keys_in_use": "keys in use (fraction of pairs trained)",
    "value_scale_mean": "mean |value| over trained pairs",
    "train_loss": "last epoch's training loss",
    "key_fit_seconds": "key fitting wall time (s)",
}


def kvb_columns(record: RunRecord) -> dict[str, float | None]:
    """A bottleneck run's :data:`DIAGNOSTIC_COLUMNS`, from its last experience's
    diagnostics and its keys' fit; None where the run has none."""
    rows = record.extra.get("kvb_diagnostics") or [{}]
    last, fit = rows[-1], record.extra.get("key_fit") or {}
    return {"keys_in_use": last.get("keys_in_use_stream"),
            "value_scale_mean": last.get("value_scale_mean"),
            "train_loss": last.get("train_loss"), "key_fit_seconds": fit.get("seconds")}


def sweep_tables(spec: SweepSpec, records: dict[tuple, RunRecord]
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, accuracy matrix) of the whole grid, one column per swept field first."""
    summaries, matrices = [], []
    for point, _ in spec.points():
        recs = [r for (name, _, _), r in records.items() if name == point_name(point)]
        if not recs:
            continue
        matrix = matrix_table(recs, spec.strategies)
        summary = summary_table(recs, matrix)
        joint = summary.strategy.map(lambda s: STRATEGIES[s].joint)
        summary.loc[joint.astype(bool), "average_forgetting"] = float("nan")
        diagnostics = {(r.strategy, r.seed): kvb_columns(r) for r in recs}
        for column in DIAGNOSTIC_COLUMNS:
            summary[column] = [diagnostics[k][column]
                               for k in zip(summary.strategy, summary.seed, strict=True)]
        for table, dest in ((summary, summaries), (matrix, matrices)):
            for i, (name, value) in enumerate(point.items()):
                table.insert(i, name, [value] * len(table))
            dest.append(table)
    columns = list(spec.grid)
    summary = (pd.concat(summaries, ignore_index=True) if summaries
               else pd.DataFrame(columns=columns + SUMMARY_COLUMNS + list(DIAGNOSTIC_COLUMNS)))
    matrix = pd.concat(matrices, ignore_index=True) if matrices else pd.DataFrame()
    return summary, matrix


def write_sweep_reports(out: Path, spec: SweepSpec, records: dict[tuple, RunRecord]
                        ) -> pd.DataFrame:
    summary, matrix = sweep_tables(spec, records)
    write_csv(summary, out / "summary.csv")
    write_csv(matrix, out / "accuracy_matrix.csv")
    if len(summary) and spec.grid:
        plot_sweep(summary, list(spec.grid), out / "sweep.png")
        plot_sweep_diagnostics(summary, list(spec.grid), out / "sweep_diagnostics.png")
    return summary


def _is_reference(strategy: str, field_name: str) -> bool:
    """A strategy that does not depend on the swept field: drawn as a line across."""
    return not STRATEGIES[strategy].uses_bottleneck and field_name in BOTTLENECK_FIELDS


def _axis(summary: pd.DataFrame, name: str) -> tuple[list, dict, bool]:
    """The swept field's values, their x positions, and whether they are numbers."""
    values = list(dict.fromkeys(summary[name]))
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    return values, {v: (v if numeric else i) for i, v in enumerate(values)}, numeric


def _curves(ax, summary: pd.DataFrame, name: str, others: list[str], column: str,
            references: bool = True) -> None:
    """``column`` against the swept field ``name``: per strategy (and setting of the other
    swept fields) the seed mean, the seeds' min-max as a band; references as lines."""
    values, position, numeric = _axis(summary, name)
    for key, g in summary.groupby(["strategy", *others], sort=False):
        key = key if isinstance(key, tuple) else (key,)
        if g[column].isna().all():
            continue
        label = ", ".join([str(key[0])] + [f"{o}={v}" for o, v in zip(others, key[1:],
                                                                   strict=True)])
        if _is_reference(key[0], name):
            if references:
                per_seed = g.groupby("seed")[column].first()
                line = ax.axhline(per_seed.mean(), ls="--", lw=1.2, color="0.35"
                                  if STRATEGIES[key[0]].joint else "0.6")
                ax.axhspan(per_seed.min(), per_seed.max(), color=line.get_color(), alpha=0.12)
                line.set_label(f"{label} (reference)")
            continue
        stats = g.groupby(name, sort=False)[column].agg(["mean", "min", "max"])
        stats = stats.reindex([v for v in values if v in stats.index])
        x = [position[v] for v in stats.index]
        ax.plot(x, stats["mean"], marker="o", ms=4, label=label)
        ax.fill_between(x, stats["min"], stats["max"], alpha=0.15)
    if numeric and min(values) > 0 and max(values) / min(values) >= 8:
        ax.set_xscale("log", base=2)
    labels = [f"{v:g}" if numeric else str(v) for v in values]  # 300000.0 -> 300000
    ax.set_xticks([position[v] for v in values], labels,
                  rotation=30 if sum(map(len, labels)) > 20 else 0)
    ax.minorticks_off()
    ax.set_xlabel(name)
    ax.grid(alpha=0.3)


def plot_sweep(summary: pd.DataFrame, fields: list[str], path: Path) -> None:
    """Final accuracy against each swept field (a row each): class-incremental and i.i.d.
    strategies side by side, every reference (a strategy the field does not touch) drawn
    as a dashed line in both with its seeds' range."""
    plt = pyplot()
    joint = summary.strategy.map(lambda s: STRATEGIES[s].joint).astype(bool)
    settings = [(title, mask) for title, mask in (("class-incremental", ~joint),
                                                  ("i.i.d. (joint)", joint)) if mask.any()]
    fig, axes = plt.subplots(len(fields), len(settings), squeeze=False,
                             figsize=(4.6 * len(settings), 3.6 * len(fields)))
    for row, name in zip(axes, fields, strict=True):
        others = [f for f in fields if f != name]
        refs = summary[[_is_reference(s, name) for s in summary.strategy]]
        for ax, (title, mask) in zip(row, settings, strict=True):
            own = summary[mask & ~summary.index.isin(refs.index)]
            _curves(ax, pd.concat([own, refs]), name, others, "final_accuracy")
            ax.set_title(title, fontsize=10)
            ax.set_ylabel("final accuracy")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7)
    fig.tight_layout()
    savefig(fig, path)


def plot_sweep_diagnostics(summary: pd.DataFrame, fields: list[str], path: Path) -> None:
    """Average forgetting and KVB's state at the end of its runs (training loss, mean
    |value|, keys in use) against each swept field, for the columns that have values."""
    columns = {"average_forgetting": "average forgetting",
               **{c: DIAGNOSTIC_COLUMNS[c] for c in ("train_loss", "value_scale_mean",
                                                     "keys_in_use")}}
    columns = {c: t for c, t in columns.items() if summary[c].notna().any()}
    if not columns:
        return
    plt = pyplot()
    fig, axes = plt.subplots(len(fields), len(columns), squeeze=False,
                             figsize=(4.2 * len(columns), 3.4 * len(fields)))
    for row, name in zip(axes, fields, strict=True):
        others = [f for f in fields if f != name]
        for ax, (column, title) in zip(row, columns.items(), strict=True):
            _curves(ax, summary, name, others, column, references=False)
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=7)
    fig.tight_layout()
    savefig(fig, path)


def sweep_records(out: Path, spec: SweepSpec) -> dict[tuple, RunRecord]:
    """The finished runs of a sweep folder."""
    records = {}
    for point, config in spec.points():
        store = RunStore(out / "points" / point_name(point), config.to_dict())
        for record in store.records():
            if record.seed in spec.seeds and record.strategy in spec.strategies:
                records[point_name(point), record.strategy, record.seed] = record
    return records


def read_sweep(out: Path) -> SweepSpec:
    """The spec a sweep folder was run with."""
    config = json.loads((out / "config.json").read_text())["config"]
    return SweepSpec(config["experiment"], config["preset"], config["fixed"], config["grid"],
                     tuple(config["seeds"]), tuple(config["strategies"]))


def report(out: Path) -> None:
    """Redraw a sweep folder's tables and figure."""
    spec = read_sweep(out)
    write_sweep_reports(out, spec, sweep_records(out, spec))

