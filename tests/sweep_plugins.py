"""Strategies a user registers in their own module (``--import sweep_plugins``): one
that fails on its first attempt only, one that always fails. Workers on Ray and SLURM
receive them by value, as they would a user's."""

import logging
import tempfile
import uuid
from pathlib import Path

from kvb_avalanche.experiments.identity import Stage
from kvb_avalanche.experiments.strategies import STRATEGIES, BuildContext

log = logging.getLogger(__name__)
# one folder of markers per import: a new test imports it anew, and its first attempts fail
MARKERS = Path(tempfile.gettempdir()) / f"kvb-sweep-plugins-{uuid.uuid4().hex}"
NAMES = ("fails_once", "always_fails", "kvb_fails_once")


def _first_attempt_fails(name: str, seed: int) -> None:
    marker = MARKERS / f"{name}-seed{seed}"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise RuntimeError(f"{name}: its first attempt fails")


@STRATEGIES.register("fails_once")
def fails_once(ctx: BuildContext):
    _first_attempt_fails("fails_once", ctx.seed)
    return STRATEGIES["linear_probe"].build(ctx)


@STRATEGIES.register("kvb_fails_once", uses_bottleneck=True, reads=Stage.BOTTLENECK_RUNS)
def kvb_fails_once(ctx: BuildContext):  # on the seed's fitted keys, as kvb
    _first_attempt_fails("kvb_fails_once", ctx.seed)
    return STRATEGIES["kvb"].build(ctx)


@STRATEGIES.register("always_fails")
def always_fails(ctx: BuildContext):
    log.info("always_fails: about to break")
    raise RuntimeError("always_fails breaks on every attempt")
