"""Pack each results folder's run records and logs into one ``raw.tar.xz`` (what is
committed under ``results/``; ``kvb-avalanche report DIR`` unpacks it again).

    .venv/bin/python scripts/pack_results.py results/split_cifar10 [more folders ...]

A folder is every folder below the ones given that holds a ``config.json`` and is not a
sweep's grid point (those travel inside their sweep's archive).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from kvb_avalanche.experiments.records import pack_raw

log = logging.getLogger("pack_results")


def folders(roots: list[Path]) -> list[Path]:
    found = {c.parent for root in roots for c in Path(root).rglob("config.json")}
    return sorted(f for f in found if "points" not in f.relative_to(f.anchor).parts)


def main(argv: list[str] | None = None) -> list[Path]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    roots = [Path(a) for a in (sys.argv[1:] if argv is None else argv)] or [Path("results")]
    packed = [a for f in folders(roots) if (a := pack_raw(f)) is not None]
    for archive in packed:
        log.info("packed %s (%.0f KB)", archive, archive.stat().st_size / 1024)
    return packed


if __name__ == "__main__":
    main()
