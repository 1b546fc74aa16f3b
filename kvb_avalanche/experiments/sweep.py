"""Sweeps: a grid of configurations x seeds x strategies (:mod:`.spec`), every run
independent, run by an engine (:mod:`.engines`: local, Ray or SLURM) under one contract.

Each grid point is a configuration with its own folder ``DIR/points/<name>/`` (runs,
checkpoints, logs, as an experiment's ``OUT``); every run lands there the moment it
finishes, and re-running the same command resumes. Each seed's keys are stored under
``DIR/checkpoints/keys/`` the moment they are fitted (named by what decides them), so a
killed or grown sweep does not fit them again. A run whose identity (derived from the
fields' stage declarations, :mod:`.identity`) is shared by several points runs once and is
stored at each: with only the bottleneck's fields swept, the baselines are references, not
repeated work.

Whatever the engine, a run that fails is submitted again up to ``retries`` times, then
written to ``DIR/failures.json`` (run, exception, its log's last lines) while the others go
on; the tables and figures (:mod:`.sweep_reports`) cover what finished, and
:class:`SweepFailed` says how many runs failed and how many table rows are missing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from kvb_avalanche.experiments.engines import (
    Engine,
    EngineOptions,
    Outcome,
    RunTask,
    engine_class,
    import_modules,
)
from kvb_avalanche.experiments.records import RunRecord, RunStore, write_json
from kvb_avalanche.experiments.runner import (
    RunOptions,
    Workbench,
    key_identity,
    run_identity,
    versions,
)
from kvb_avalanche.experiments.spec import (
    SweepSpec,
    load_spec,
    parse_spec,
    point_frame,
    point_name,
    read_spec,
    sweep_frame,
)
from kvb_avalanche.experiments.strategies import STRATEGIES
from kvb_avalanche.experiments.sweep_reports import write_sweep_reports

log = logging.getLogger(__name__)

__all__ = ["SweepFailed", "SweepSpec", "load_spec", "parse_spec", "report", "run_sweep"]


class SweepFailed(RuntimeError):
    """Some runs failed (after their retries); the others are stored."""


def _absolute(options: RunOptions) -> RunOptions:
    """The options with every path absolute: workers start elsewhere."""
    from dataclasses import replace

    from kvb_avalanche.benchmarks.embedded import default_cache_dir

    return replace(options,
                   data_root=options.data_root and Path(options.data_root).resolve(),
                   cache_dir=Path(options.cache_dir or default_cache_dir()).resolve())


def run_sweep(spec: SweepSpec, out: Path, options: RunOptions | None = None, *,
              engine: str = "local", engine_options: EngineOptions | None = None
              ) -> pd.DataFrame:
    """Run (or resume) every run of the sweep into ``out``; returns the summary table.

    Raises ConfigError before anything is written or submitted when the spec, the engine,
    an engine option or ``out`` is bad; SweepFailed at the end if runs failed after their
    retries (the rest are stored, the tables cover them).
    """
    engine_options = engine_options or EngineOptions()
    cls = engine_class(engine)
    cls.check_options(engine_options)
    import_modules(engine_options.imports)
    if cls.resolves_auto_device:  # 'auto' would resolve on each node to what that node has
        spec = spec.with_device("cuda" if engine_options.gpus_per_run else "cpu")
    out = Path(out).resolve()
    options = _absolute(options or RunOptions())
    sweep_store = RunStore(out, spec.to_dict(), options.overwrite, frame=sweep_frame)
    sweep_store.check()
    points = spec.points()
    stores = {point_name(p): RunStore(out / "points" / point_name(p), c.to_dict(),
                                      options.overwrite, frame=point_frame) for p, c in points}
    for store in stores.values():
        store.check()
    bench = Workbench(options, keys_dir=sweep_store.checkpoints / "keys")
    runner: Engine = cls(engine_options, options, out, bench)
    runner.open()  # the cluster can run what is asked, or ConfigError: nothing written yet
    try:
        for _, config in points:  # every data set embedded (or found cached) before a file
            bench.data(config)  # is written
        # the imports are read back by `kvb-avalanche report DIR` (their strategies)
        sweep_store.open({"kind": "sweep", "versions": versions(), "engine": engine,
                          "imports": list(engine_options.imports),
                          "options": {k: str(v) for k, v in vars(options).items()}})
        for (point, config), store in zip(points, stores.values(), strict=True):
            store.open({"kind": config.kind, "point": point})
        return _run_grid(spec, out, points, stores, runner, engine_options.retries,
                         options.progress)
    finally:
        runner.close()


def _run_grid(spec: SweepSpec, out: Path, points: list, stores: dict[str, RunStore],
              runner: Engine, retries: int, progress: bool) -> pd.DataFrame:
    runs = [(point_name(point), config, strategy, seed) for point, config in points
            for seed in spec.seeds for strategy in spec.strategies]
    records: dict[tuple, RunRecord] = {}
    finished: dict[tuple, RunRecord] = {}  # run identity -> its record, wherever it is stored
    for name, config, strategy, seed in runs:
        if (record := stores[name].load(strategy, seed)) is not None:
            records[name, strategy, seed] = record
            finished[run_identity(config, strategy, seed)] = record
    tasks: list[RunTask] = []
    shared: dict[str, list[tuple]] = {}  # a task's name -> the (point, strategy, seed) it fills
    first: dict[tuple, RunTask] = {}  # run identity -> the task that runs it
    for name, config, strategy, seed in runs:
        key, identity = (name, strategy, seed), run_identity(config, strategy, seed)
        if key in records:
            continue
        if identity in finished:  # run at another point already: stored here too
            stores[name].save(finished[identity])
            records[key] = finished[identity]
        elif identity in first:
            shared[first[identity].name].append(key)
        else:
            task = RunTask(name, config, strategy, seed, stores[name].out,
                           tuple(STRATEGIES[s] for s in config.strategies))
            first[identity], shared[task.name] = task, [key]
            tasks.append(task)
    log.info("sweep %s: %d runs, %d done, %d to run on %s, %d shared with another point", out,
             len(runs), len(records), len(tasks), runner.name,
             sum(len(v) - 1 for v in shared.values()))
    tasks.sort(key=lambda t: (key_identity(t.config, t.seed), t.seed))  # shared keys adjacent
    failures: dict[str, dict] = {}
    attempts: dict[str, int] = {}
    bar = tqdm(total=len(tasks), desc="sweep runs", disable=not progress)
    try:
        runner.submit(tasks)
        for outcome in runner.results():
            task = outcome.task
            attempts[task.name] = attempts.get(task.name, 0) + 1
            if outcome.record is not None:
                for where in shared[task.name]:
                    stores[where[0]].save(outcome.record)
                    records[where] = outcome.record
                bar.update()
            elif attempts[task.name] <= retries:
                log.warning("run %s failed (attempt %d of %d), submitted again: %s",
                            task.name, attempts[task.name], retries + 1, outcome.error)
                runner.submit([task])
            else:
                failures[task.name] = _failure(outcome, attempts[task.name],
                                               shared[task.name])
                log.error("run %s failed: %s", task.name, outcome.error)
                bar.update()
    except BaseException:  # the engine broke, or ^C: report what finished, then re-raise
        bar.close()
        if failures:
            write_json(failures, out / "failures.json")
        try:
            write_sweep_reports(out, spec, records)
        except Exception:  # noqa: BLE001 (the error on its way out is the one to see)
            log.exception("sweep %s: the reports of the finished runs could not be drawn", out)
        raise
    bar.close()
    # the failures first: a report that cannot be drawn must not lose them
    if failures:
        write_json(failures, out / "failures.json")
    else:
        (out / "failures.json").unlink(missing_ok=True)
    summary = write_sweep_reports(out, spec, records)
    if failures:
        missing = len(runs) - len(records)
        raise SweepFailed(f"{len(failures)} of {len(tasks)} runs failed (see "
                          f"{out / 'failures.json'}): {', '.join(failures)}; {missing} of "
                          f"{len(runs)} table rows are missing. The rest are stored: re-run "
                          "the same command to retry the failed ones")
    return summary


def _failure(outcome: Outcome, attempts: int, fills: Sequence[tuple]) -> dict:
    return {"run": outcome.task.name, "exception": outcome.error or "failed",
            "attempts": attempts, "log": str(outcome.task.log_path()),
            "log_tail": outcome.log_tail,
            "table_rows": ["/".join(map(str, where)) for where in fills]}


def sweep_records(out: Path, spec: SweepSpec) -> dict[tuple, RunRecord]:
    """The finished runs of a sweep folder."""
    records = {}
    for point, config in spec.points():
        store = RunStore(out / "points" / point_name(point), config.to_dict())
        for record in store.records():
            if record.seed in spec.seeds and record.strategy in spec.strategies:
                records[point_name(point), record.strategy, record.seed] = record
    return records


def report(out: Path) -> pd.DataFrame:
    """Redraw a sweep folder's tables and figures from what finished (importing the
    modules the sweep imported, for their strategies)."""
    import json

    import_modules(json.loads((Path(out) / "config.json").read_text()).get("imports", []))
    spec = read_spec(out)
    return write_sweep_reports(out, spec, sweep_records(out, spec))
