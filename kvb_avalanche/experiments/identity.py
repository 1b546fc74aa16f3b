"""What decides each stage's output: identities derived from the configuration's own field
declarations, never from hand-kept lists of field names.

An experiment has four stages whose outputs can be shared between runs and grid points:

    embeddings ─┬─> keys ──> bottleneck runs      (kvb, kvb_joint, ...: uses_bottleneck)
                └──────────> baseline runs        (every other strategy)

Every field of :class:`~kvb_avalanche.experiments.config.ExperimentConfig` declares in its
metadata (``stage=``) the stages whose output it changes; everything downstream of them
changes with them. Two configurations share a stage's output exactly when they agree on
every field declared for that stage or upstream of it. ``none`` marks what selects runs
without changing any (seeds, strategies).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from enum import StrEnum
from typing import Any


class Stage(StrEnum):
    EMBEDDINGS = "embeddings"  # the embedded train and test data
    KEYS = "keys"  # a seed's fitted bottleneck (projection, keys, the code cache on them),
    #                and the key-initialisation embeddings it is fitted on
    BOTTLENECK_RUNS = "bottleneck_runs"  # runs of strategies that use the bottleneck
    BASELINE_RUNS = "baseline_runs"  # runs of the other strategies
    RUNS = "runs"  # every run: both of the above
    NONE = "none"  # selects runs (seeds, strategies) but changes none


# a stage's output is decided by what is declared for it and for the stages upstream of it
UPSTREAM: dict[Stage, tuple[Stage, ...]] = {
    Stage.EMBEDDINGS: (),
    Stage.KEYS: (Stage.EMBEDDINGS,),
    Stage.BOTTLENECK_RUNS: (Stage.KEYS, Stage.EMBEDDINGS),
    Stage.BASELINE_RUNS: (Stage.EMBEDDINGS,),
}


def declared(f: dataclasses.Field) -> frozenset[Stage]:
    """The stages a field declares it changes (RUNS expanded); KeyError if it declares none."""
    stages = f.metadata["stage"]
    stages = {Stage(s) for s in ((stages,) if isinstance(stages, str) else stages)}
    if Stage.RUNS in stages:
        stages |= {Stage.BOTTLENECK_RUNS, Stage.BASELINE_RUNS}
    return frozenset(stages - {Stage.RUNS, Stage.NONE})


def undeclared(cls: type) -> list[str]:
    """Fields of ``cls`` with no (or an unknown) stage declaration."""
    missing = []
    for f in dataclasses.fields(cls):
        try:
            declared(f)
        except (KeyError, ValueError):
            missing.append(f.name)
    return missing


def closure(stages: Iterable[Stage]) -> frozenset[Stage]:
    """``stages`` and every stage downstream of them."""
    out = set(stages)
    for stage, upstream in UPSTREAM.items():
        if out & set(upstream):
            out.add(stage)
    return frozenset(out)


def stage_fields(config: Any, stage: Stage) -> tuple[str, ...]:
    """The fields that decide ``stage``'s output for ``config``, in declaration order.

    With keys fitted on the first experience (``key_init_data='none'``) the fields marked
    ``first_experience`` (which decide that experience) decide the keys too.
    """
    deciding = {stage, *UPSTREAM[stage]}
    first_experience = getattr(config, "key_init_data", None) == "none"
    names = []
    for f in dataclasses.fields(config):
        stages = declared(f)
        if first_experience and f.metadata.get("first_experience"):
            stages = stages | {Stage.KEYS}
        if stages & deciding:
            names.append(f.name)
    return tuple(names)


def identity(config: Any, *stages: Stage) -> tuple[str, ...]:
    """``field=value`` for every field deciding any of ``stages``: equal identities, equal
    output."""
    names = {name for stage in stages for name in stage_fields(config, stage)}
    return tuple(f"{f.name}={getattr(config, f.name)!s}" for f in dataclasses.fields(config)
                 if f.name in names)


def embedded_fields(config: Any) -> tuple[str, ...]:
    """The fields that decide which images are embedded, and how: the embeddings' and the
    key-initialisation data's (fields marked ``embedded``)."""
    return tuple(f.name for f in dataclasses.fields(config)
                 if Stage.EMBEDDINGS in declared(f) or f.metadata.get("embedded"))


def changes(cls: type, name: str) -> frozenset[Stage]:
    """The stages (downstream ones included) whose output a change of field ``name`` moves."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return closure(declared(f))
