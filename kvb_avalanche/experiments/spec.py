"""Sweep files: a grid of configurations x seeds x strategies, parsed and validated.

A spec has the shape of the paper's official sweep files (wandb's)::

    experiment: split_cifar10        # any registered benchmark (kvb-avalanche benchmarks)
    preset: quick                    # optional: start from the --quick configuration
    parameters:
      codebooks: {values: [64, 256]} # swept
      kvb_lr: {value: 3.0}           # fixed
      seed: {values: [0, 1, 2]}      # seeds (or 'seeds')
      strategy: {values: [kvb, kvb_joint, joint_linear]}  # strategies (or 'strategies')

Every grid point must be a valid :class:`ExperimentConfig`: a bad entry is a
:class:`ConfigError` naming it, before anything runs or is written.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvb_avalanche.benchmarks.registry import BENCHMARKS
from kvb_avalanche.experiments.config import (
    ONLINE,
    ConfigError,
    ExperimentConfig,
    benchmark_defaults,
    quick,
)
from kvb_avalanche.experiments.strategies import BUILTIN

PRESETS = {"quick": quick}  # preset -> its values for an experiment
SEED_KEYS, STRATEGY_KEYS = ("seed", "seeds"), ("strategy", "strategies")


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

    def with_device(self, device: str) -> SweepSpec:
        """The spec with the device ``auto`` (the default) made ``device``: an engine whose
        runs execute on other machines decides it once, for all of them."""
        fixed, grid = dict(self.fixed), dict(self.grid)
        if "device" in grid:
            grid["device"] = [device if v == "auto" else v for v in grid["device"]]
            if len(set(grid["device"])) < len(grid["device"]):
                raise ConfigError("device", f"parameters.device: 'auto' is {device!r} on this "
                                  f"engine, which the grid lists too: {self.grid['device']}")
        elif fixed.get("device", "auto") == "auto":
            fixed["device"] = device
        return dataclasses.replace(self, fixed=fixed, grid=grid)

    def to_dict(self) -> dict:
        """Plain JSON types (lists, not tuples), as config.json holds it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def points(self) -> list[tuple[dict[str, Any], ExperimentConfig]]:
        """Every grid point's swept values and configuration, in grid order."""
        out = [{}]
        for name, values in self.grid.items():
            out = [{**p, name: v} for p in out for v in values]
        preset = PRESETS[self.preset](self.experiment) if self.preset else {}
        base = {**benchmark_defaults(self.experiment), **preset}
        run = {"benchmark": self.experiment, "seeds": list(self.seeds),
               "strategies": list(self.strategies)}
        configs = []
        for point in out:
            given = {**self.fixed, **point}
            online = ONLINE if given.get("online") else {}  # one pass, unless said otherwise
            try:
                configs.append((point, ExperimentConfig.from_dict({**base, **online, **given,
                                                                   **run})))
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
    """What a grid point's (or an experiment's) folder pins down: its configuration but the
    seeds and strategies (each run is stored on its own, by strategy and seed), a field that
    an older record lacks read as its default (a new field's default is the old behaviour)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ExperimentConfig)
                if f.default is not dataclasses.MISSING}
    return {k: v for k, v in {**defaults, **config}.items() if k not in ("seeds", "strategies")}


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
    if experiment not in BENCHMARKS:
        raise ConfigError("experiment", f"{where}: experiment must be a registered benchmark "
                          f"({', '.join(BENCHMARKS)}), got {experiment!r}")
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
    strategies = BUILTIN
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
            if len({json.dumps(v, sort_keys=True) for v in values}) < len(values):
                raise ConfigError(str(name), f"parameters.{name}.values lists a value twice: "
                                  f"{values!r}")
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



def read_spec(out: Path) -> SweepSpec:
    """The spec a sweep folder was run with (its ``config.json``)."""
    config = json.loads((Path(out) / "config.json").read_text())["config"]
    return SweepSpec(config["experiment"], config["preset"], config["fixed"], config["grid"],
                     tuple(config["seeds"]), tuple(config["strategies"]))
