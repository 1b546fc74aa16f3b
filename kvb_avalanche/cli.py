"""The ``kvb-avalanche`` command: experiments, sweeps and reports.

    kvb-avalanche split-cifar10 --out OUT [--quick] [--seeds 0 1 2] [--kvb-epochs 10] ...
    kvb-avalanche BENCHMARK --out OUT [--online --experience-size N] ...  (any registered one)
    kvb-avalanche benchmarks   (lists them; --import MODULE registers a user's first)
    kvb-avalanche toy-2d --out OUT
    kvb-avalanche sweep SPEC.yaml --out DIR [--quick] [--engine local|ray|slurm] [--retries N]
    kvb-avalanche report DIR
    kvb-avalanche doctor [--fix-torchvision]

Every configuration field is a flag (``--field-name``); bad input stops with a message
naming the flag and exit status 2 before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from kvb_avalanche.benchmarks.cifar import DataError
from kvb_avalanche.benchmarks.registry import BENCHMARKS, DATASETS
from kvb_avalanche.experiments.config import (
    ONLINE,
    BaseConfig,
    ConfigError,
    ExperimentConfig,
    ToyConfig,
    benchmark_defaults,
    flag,
    quick,
)
from kvb_avalanche.experiments.runner import RunOptions
from kvb_avalanche.torchvision_compat import PTH_NAME

log = logging.getLogger("kvb_avalanche")


# ---------------------------------------------------------------------------- flags
def add_config_flags(parser: argparse.ArgumentParser, cls: type[BaseConfig],
                     skip: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> None:
    """A flag for every field of ``cls``, with its type, choices and help (which shows
    ``defaults`` over the class's). Defaults are left out (argparse.SUPPRESS), so the flags
    given can be told from the rest."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = (defaults or {}).get(f.name, default)
        kwargs: dict[str, Any] = dict(default=argparse.SUPPRESS, dest=f.name,
                                      help=f"{f.metadata.get('help', '')} (default: "
                                           f"{_shown(default)})")
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            hint = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(hint), typing.get_args(hint)
        if hint is bool:
            parser.add_argument(flag(f.name), action="store_true", **kwargs)
            continue
        if origin is Literal:
            kwargs["choices"] = list(args)
        elif origin is tuple:
            kwargs.update(nargs="+", type=args[0])
        else:
            kwargs["type"] = hint
        parser.add_argument(flag(f.name), **kwargs)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def add_run_flags(parser: argparse.ArgumentParser, data: bool = True) -> None:
    """Flags that change how a run goes, never its numbers."""
    if data:
        parser.add_argument("--data-root", type=Path, default=None,
                            help="folder holding the data (CIFAR: torchvision folders, "
                                 "ImageFolder trees or tar archives; see 'kvb-avalanche "
                                 "benchmarks'); default: $KVB_DATA_ROOT, else Avalanche's "
                                 "data folder (~/.avalanche/data)")
        parser.add_argument("--download", action="store_true",
                            help="download the data with torchvision if no local copy is found")
        parser.add_argument("--cache-dir", type=Path, default=None,
                            help="embedding and image cache; default: $KVB_CACHE_DIR, else "
                                 "~/.cache/kvb_avalanche")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard results in the output folder from another configuration")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars")
    parser.add_argument("--checkpoint-every", type=float, default=RunOptions.checkpoint_every,
                        metavar="SECONDS",
                        help="save a continual run's progress after an experience once this "
                             "many seconds have passed since its last save; 0: after every "
                             "experience (default: %(default)s)")


def options_from(args: argparse.Namespace) -> RunOptions:
    return RunOptions(data_root=getattr(args, "data_root", None),
                      cache_dir=getattr(args, "cache_dir", None),
                      download=getattr(args, "download", False), progress=args.progress,
                      overwrite=args.overwrite,
                      checkpoint_every=getattr(args, "checkpoint_every",
                                               RunOptions.checkpoint_every))


def config_from(args: argparse.Namespace, cls: type[BaseConfig], base: dict | None = None
                ) -> BaseConfig:
    """The configuration: ``base`` (a preset), then the flags given."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return cls.from_dict({**(base or {}), **given})


def check_out(out: Path) -> None:
    """ConfigError unless ``out`` is (or can be made) a writable folder."""
    out = out.resolve()
    probe = out if out.exists() else next(p for p in out.parents if p.exists())
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise ConfigError("out", f"{{out}} {out}: {probe} is not a writable folder")


# ---------------------------------------------------------------------------- commands
def split_config(args: argparse.Namespace, benchmark: str) -> ExperimentConfig:
    """The benchmark's defaults, then ``--quick``'s values, then the flags given."""
    base = {"benchmark": benchmark, **benchmark_defaults(benchmark),
            **(quick(benchmark) if args.quick else {}),
            **(ONLINE if getattr(args, "online", False) else {})}
    return config_from(args, ExperimentConfig, base)


def _split(args: argparse.Namespace, benchmark: str) -> Any:
    from kvb_avalanche.experiments.runner import run_experiment

    config = split_config(args, benchmark)
    check_out(args.out)
    table = run_experiment(config, args.out, options_from(args))
    _print_tables(table, args.out / "expectations.csv")
    return table


def _list_benchmarks(args: argparse.Namespace) -> int:
    rows = [("name", "setting", "classes", "experiences", "keys fitted on", "data")]
    for name in BENCHMARKS:
        b = BENCHMARKS[name]
        shape = DATASETS[b.dataset].image_shape
        size = "x".join(map(str, shape[:2])) if shape else "any size"
        rows.append((name, b.setting, str(b.num_classes), str(b.n_experiences),
                     b.key_init_data, f"{b.dataset} ({size})"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                         + "\n")
    return 0


def _imports(argv: list[str]) -> list[str]:
    """The modules ``--import MODULE`` (or ``--import=MODULE``) names in ``argv``."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--import" and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith("--import="):
            out.append(arg.split("=", 1)[1])
    return out


def _toy(args: argparse.Namespace) -> Any:
    from kvb_avalanche.experiments.runner import run_toy

    config = config_from(args, ToyConfig)
    check_out(args.out)
    table = run_toy(config, args.out, options_from(args))
    _print_tables(table)
    return table


def _sweep(args: argparse.Namespace) -> Any:
    from kvb_avalanche.experiments.engines import EngineOptions, engine_class, import_modules
    from kvb_avalanche.experiments.sweep import load_spec, run_sweep

    engine = engine_class(args.engine)
    engine_options = EngineOptions(
        retries=args.retries, address=args.address, cpus_per_run=args.cpus_per_run,
        gpus_per_run=args.gpus_per_run, partition=args.partition, time_min=args.time_min,
        mem_gb=args.mem_gb, imports=tuple(args.imports))
    engine.check_options(engine_options)  # the flags first, before the spec is read
    import_modules(engine_options.imports)  # their strategies are valid names in the spec
    spec = load_spec(args.spec)
    if args.quick:
        spec = spec.quick()
    check_out(args.out)
    summary = run_sweep(spec, args.out, options_from(args), engine=args.engine,
                        engine_options=engine_options)
    if len(summary):
        columns = [*spec.grid, "strategy"]
        means = summary.groupby(columns, sort=False)[["final_accuracy", "average_forgetting"]]
        _print_tables(means.agg(["mean", "std"]).reset_index())
    return summary


def _report(args: argparse.Namespace) -> None:
    from kvb_avalanche.experiments import sweep
    from kvb_avalanche.experiments.records import RAW_ARCHIVE, RunStore, unpack_raw
    from kvb_avalanche.experiments.reports import write_split_reports, write_toy_reports
    from kvb_avalanche.experiments.strategies import STRATEGIES

    path = args.dir / "config.json"
    if not path.is_file():
        raise ConfigError("dir", f"{{dir}} {args.dir} holds no config.json: not a results folder")
    record = json.loads(path.read_text())
    if unpack_raw(args.dir):  # committed results keep their run records packed
        log.info("unpacked %s into %s", RAW_ARCHIVE, args.dir)
    # folders of older versions say no "kind" and keep their flags under "arguments"
    legacy = record.get("arguments", {})
    kind = record.get("kind") or ("toy_2d" if "key_steps" in legacy
                                  else "split_cifar" if legacy else None)
    if kind == "sweep":
        sweep.report(args.dir)
        return
    config_values = record.get("config") or record.get("arguments", {})
    store = RunStore(args.dir, config_values)
    records = store.records()
    if not records:
        raise ConfigError("dir", f"{{dir}} {args.dir} holds no finished run under runs/")
    if kind == "toy_2d":
        _print_tables(write_toy_reports(args.dir, records, config_values.get("strategies", [])))
        return
    strategies = config_values.get("strategies") or list(STRATEGIES)
    joint = {s for s in strategies if s in STRATEGIES and STRATEGIES[s].joint}
    from kvb_avalanche.experiments.runner import split_title

    spec = BENCHMARKS[config_values.get("benchmark", "split_cifar10")]
    table = write_split_reports(args.dir, records, strategies, joint,
                                split_title(spec.name), spec.num_classes, spec.setting)
    _print_tables(table, args.dir / "expectations.csv")


def _doctor(args: argparse.Namespace) -> int:
    """Say whether torchvision works in this environment; with ``--fix-torchvision`` write
    the start-up hook that makes it work. Status 1 while it is needed and not installed."""
    from kvb_avalanche import torchvision_compat as compat

    error = compat.extension_error()
    lines = [f"python      {sys.version.split()[0]} ({sys.executable})"]
    for name in ("torch", "torchvision", "avalanche-lib", "kvb-avalanche"):
        lines.append(f"{name:<11} {compat.installed(name)}")
    hook = compat.site_packages() / compat.PTH_NAME
    if hook.is_file() and hook.read_text() != compat.pth_line() and not args.fix_torchvision:
        lines.append(f"{hook} loads another copy of torchvision_compat.py than this package's "
                     f"({Path(compat.__file__).resolve()}): run `kvb-avalanche doctor "
                     "--fix-torchvision` to point it here, or delete it (pip uninstall leaves "
                     "it behind)")
    if error is None:
        lines.append("torchvision's compiled extension loads: nothing to fix")
    elif args.fix_torchvision:
        path = compat.write_pth(args.site_packages)
        lines.append(f"wrote {path}: every interpreter of this environment now declares "
                     "torchvision's operators before torchvision is imported (delete the file "
                     "to undo)")
    elif compat.armed_at_start():
        lines.append(f"torchvision's compiled extension cannot load ({error}); the start-up "
                     f"hook {compat.PTH_NAME} is installed and serves")
    else:
        lines.append(compat.advice())
    print("\n".join(lines))  # noqa: T201 (CLI output)
    return int(error is not None and not args.fix_torchvision and not compat.armed_at_start())


def _print_tables(table: Any, checks: Path | None = None) -> None:
    """The command's output: the results table (and the claims checked)."""
    import pandas as pd

    with pd.option_context("display.width", 160):
        print(table.to_string(index=False, float_format="%.3f"))  # noqa: T201 (CLI output)
        if checks is not None and checks.exists():
            print(pd.read_csv(checks).to_string(index=False))  # noqa: T201


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvb-avalanche",
        description="Discrete key-value bottleneck experiments on Avalanche: KVB against "
                    "Avalanche's baselines on the same frozen features.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for benchmark in BENCHMARKS:
        spec = BENCHMARKS[benchmark]
        command = benchmark.replace("_", "-")
        what = spec.description or spec.name
        split = sub.add_parser(command, help=f"{spec.setting}: {what}",
                               description=f"{spec.setting.capitalize()} {what}, on frozen "
                                           "embeddings: KVB against the baselines.")
        split.add_argument("--out", type=Path, required=True, help="output folder")
        split.add_argument("--quick", action="store_true",
                           help="tiny end-to-end run: 100 train / 50 test images a class, 32 px, "
                                "small bottleneck, few epochs (for tests and a first look); "
                                "flags given explicitly win")
        add_config_flags(split, ExperimentConfig, skip=("benchmark",),
                         defaults=benchmark_defaults(benchmark))
        split.add_argument("--import", dest="imports", action="append", default=[],
                           metavar="MODULE", help="import MODULE first (it registers "
                           "strategies or benchmarks; repeatable)")
        add_run_flags(split)
        split.set_defaults(func=lambda a, b=benchmark: _split(a, b), parser=split)

    listing = sub.add_parser("benchmarks", help="list the registered benchmarks",
                             description="The registered benchmarks: name, setting, classes, "
                                         "default split, key-initialisation data, data.")
    listing.add_argument("--import", dest="imports", action="append", default=[],
                         metavar="MODULE", help="import MODULE first (it registers "
                         "benchmarks; repeatable)")
    listing.set_defaults(func=_list_benchmarks, parser=listing)

    toy = sub.add_parser("toy-2d", help="the paper's 2-D toy (Fig. 2)",
                         description="The paper's 2-D toy: 8 Gaussian blobs learned 2 classes "
                                     "at a time; KVB against naive learners.")
    toy.add_argument("--out", type=Path, required=True, help="output folder")
    add_config_flags(toy, ToyConfig)
    add_run_flags(toy, data=False)
    toy.set_defaults(func=_toy, parser=toy)

    sweep = sub.add_parser("sweep", help="a grid of configurations x seeds x strategies",
                           description="Run (or resume) a sweep file: a grid over any "
                                       "configuration fields x seeds x strategies.")
    sweep.add_argument("spec", type=Path, help="sweep file (YAML): experiment, parameters")
    sweep.add_argument("--out", type=Path, required=True, help="output folder")
    sweep.add_argument("--quick", action="store_true",
                       help="a first look: the same grid on the --quick preset, first seed only")
    engines = sweep.add_argument_group(
        "engines", "where the runs execute; an option the chosen engine cannot honour, or a "
        "request its cluster cannot meet, is refused before anything is written")
    engines.add_argument("--engine", default="local", metavar="ENGINE",
                         help="local (in this process, one run after another), ray (each run "
                              "a Ray task; pip install 'kvb-avalanche[ray]') or slurm (SLURM "
                              "job arrays through submitit; pip install 'kvb-avalanche[slurm]')")
    engines.add_argument("--retries", type=int, default=1,
                         help="times a failed run is submitted again, on every engine "
                              "(default: %(default)s)")
    engines.add_argument("--import", dest="imports", action="append", default=[],
                         metavar="MODULE",
                         help="import MODULE first (it registers strategies); its code "
                              "travels by value to Ray and SLURM workers (repeatable)")
    engines.add_argument("--address", default=None,
                         help="ray: the cluster to join ('auto', or host:port); default: "
                              "start a local one")
    engines.add_argument("--cpus-per-run", type=float, default=None,
                         help="ray, slurm: CPUs per run (default 1)")
    engines.add_argument("--gpus-per-run", type=float, default=None,
                         help="ray, slurm: GPUs per run (default 0)")
    engines.add_argument("--partition", default=None,
                         help="slurm: the partition (default: the cluster's default)")
    engines.add_argument("--time-min", type=int, default=None, metavar="MINUTES",
                         help="slurm: a job's time limit (default: the partition's limit "
                              "or 1440, whichever is shorter)")
    engines.add_argument("--mem-gb", type=float, default=None,
                         help="slurm: a job's memory (default: the partition's)")
    add_run_flags(sweep)
    sweep.set_defaults(func=_sweep, parser=sweep)

    report = sub.add_parser("report", help="redraw the tables and figures of a results folder")
    report.add_argument("dir", type=Path, help="a folder an experiment or sweep wrote")
    report.set_defaults(func=_report, parser=report)

    doctor = sub.add_parser("doctor", help="check this environment (torch, torchvision)",
                            description="Check that torchvision's compiled extension loads "
                                        "next to this torch, and fix it if asked.")
    doctor.add_argument("--fix-torchvision", action="store_true",
                        help=f"write {PTH_NAME} into site-packages: one line that declares "
                             "torchvision's two operators at interpreter start where its "
                             "extension cannot load (delete the file to undo)")
    doctor.add_argument("--site-packages", type=Path, default=None, metavar="DIR",
                        help="where --fix-torchvision writes (default: this environment's)")
    doctor.set_defaults(func=_doctor, parser=doctor)
    return parser


def main(argv: list[str] | None = None) -> Any:
    """Run the command; returns its table. Exits 2 on bad input (nothing written), 1 if
    runs of a sweep failed."""
    from kvb_avalanche.experiments.engines import import_modules
    from kvb_avalanche.experiments.sweep import SweepFailed

    argv = sys.argv[1:] if argv is None else argv
    try:  # a user's benchmarks and strategies are registered before the commands are built
        import_modules(_imports(argv))
    except ConfigError as e:
        sys.stderr.write(f"kvb-avalanche: error: {e.render(lambda _: '--import')}\n")
        raise SystemExit(2) from e
    args = build_parser().parse_args(argv)
    command = args.parser
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except ConfigError as e:  # fields the command has flags for are named by their flags
        flags = {a.dest: a.option_strings[0] for a in command._actions  # noqa: SLF001
                 if a.option_strings and a.option_strings[0].startswith("--")}
        message = e.render(lambda name: flags.get(name, name))
        command.exit(2, f"{command.prog}: error: {message}\n")
    except DataError as e:
        command.exit(2, f"{command.prog}: error: {e}\n")
    except SweepFailed as e:
        command.exit(1, f"{command.prog}: {e}\n")


def entry_point() -> None:
    """``kvb-avalanche`` (the console script)."""
    result = main()
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    entry_point()
