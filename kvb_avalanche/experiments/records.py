"""What a run leaves behind: typed rows and records, and the store that keeps them.

A run is one strategy on one seed of one configuration. Its :class:`RunRecord` is written
to ``OUT/runs/<strategy>-seed<seed>.json`` the moment it finishes, atomically, so a killed
experiment loses only the run in progress (and that one only back to its last
checkpointed experience).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvb_avalanche.experiments.config import ConfigError
from kvb_avalanche.io import atomic_write

SUMMARY_COLUMNS = ["strategy", "seed", "final_accuracy", "average_forgetting", "train_seconds"]
MATRIX_COLUMNS = ["strategy", "seed", "trained_through", "evaluated_on", "accuracy"]


@dataclass(frozen=True)
class MatrixRow:
    """Accuracy on test experience ``evaluated_on`` after training through ``trained_through``."""

    strategy: str
    seed: int
    trained_through: int
    evaluated_on: int
    accuracy: float


@dataclass(frozen=True)
class KeySharingRow:
    """Of the (codebook, key) pairs experience ``experience`` selected, how many, the share
    already selected by earlier experiences, and the share of all pairs selected so far."""

    strategy: str
    seed: int
    experience: int
    keys_selected: int
    fraction_shared_with_earlier: float
    fraction_ever_selected: float


@dataclass
class RunRecord:
    """One strategy on one seed: its accuracy matrix, training time and diagnostics."""

    strategy: str
    seed: int
    train_seconds: float
    matrix: list[MatrixRow]
    key_sharing: list[KeySharingRow] = field(default_factory=list)
    class_order: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the toy's decision regions

    def to_json(self) -> dict:
        out = {"strategy": self.strategy, "seed": self.seed, "train_seconds": self.train_seconds,
               "matrix": [dataclasses.asdict(r) for r in self.matrix],
               "key_sharing": [dataclasses.asdict(r) for r in self.key_sharing],
               "class_order": self.class_order}
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, d: dict, strategy: str | None = None, seed: int | None = None
                  ) -> RunRecord:
        known = {"strategy", "seed", "train_seconds", "matrix", "key_sharing", "class_order"}
        return cls(d.get("strategy", strategy), d.get("seed", seed), d["train_seconds"],
                   [MatrixRow(**r) for r in d["matrix"]],
                   [KeySharingRow(**r) for r in d.get("key_sharing", [])],
                   list(d.get("class_order", [])),
                   {k: v for k, v in d.items() if k not in known})


def write_json(obj: dict, path: Path) -> None:
    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)

    atomic_write(path, dump)


class RunStore:
    """Finished runs of one configuration under ``OUT/runs/``, unfinished ones' checkpoints
    under ``OUT/checkpoints/``, and ``OUT/config.json``, the configuration's record.

    A different configuration pointed at the same ``OUT`` is refused (naming the fields that
    differ) unless ``overwrite``, which discards the stored runs and checkpoints. ``frame``
    maps an identity to the part of it that must match (default: all of it), so that a sweep
    may grow more values, seeds or strategies over the same folder.
    """

    def __init__(self, out: Path, identity: dict, overwrite: bool = False,
                 frame: Callable[[dict], dict] | None = None) -> None:
        self.out, self.identity, self.overwrite = Path(out), identity, overwrite
        self.frame = frame or (lambda identity: identity)
        self.runs = self.out / "runs"

    def check(self) -> None:
        """Raise ConfigError (field ``out``) if OUT holds another configuration's runs;
        writes nothing."""
        config = self.out / "config.json"
        if self.overwrite or not config.exists():
            return
        try:
            written = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError("out", f"{{out}} {self.out}: its config.json is unreadable ({e}); "
                              "use another {out}, or {overwrite}", ["overwrite"]) from e
        if "config" not in written:
            raise ConfigError("out", f"{{out}} {self.out} holds results written by an older "
                              "kvb-avalanche (its config.json has no 'config'), which cannot be "
                              "resumed; use another {out}, or {overwrite} to discard them",
                              ["overwrite"])
        previous = written["config"]
        before, now = self.frame(previous), self.frame(self.identity)
        differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if differ:
            shown = ", ".join(f"{{{k}}} ({before.get(k)!r} -> {now.get(k)!r})"
                              for k in differ)
            raise ConfigError("out", f"{{out}} {self.out} holds results of a different "
                              f"configuration: {shown}. Use another {{out}}, or {{overwrite}} "
                              "to discard them.", [*differ, "overwrite"])

    def open(self, record: dict) -> None:
        """Create OUT and write config.json (``record`` beside the configuration)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.overwrite:  # finished runs and the checkpoints of unfinished ones
            for f in [*self.runs.glob("*.json"), *self.checkpoints.glob("*.pt")]:
                f.unlink()
            (self.out / RAW_ARCHIVE).unlink(missing_ok=True)
        else:  # committed results keep their runs packed: resume and grow from them
            unpack_raw(self.out)
        write_json({"config": self.identity, **record}, self.out / "config.json")

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def checkpoint(self, strategy: str, seed: int) -> Path:
        return self.checkpoints / f"{strategy}-seed{seed}.pt"

    def logs(self, strategy: str, seed: int) -> Path:
        return self.out / "logs" / f"{strategy}-seed{seed}"

    def _path(self, strategy: str, seed: int) -> Path:
        return self.runs / f"{strategy}-seed{seed}.json"

    def load(self, strategy: str, seed: int) -> RunRecord | None:
        path = self._path(strategy, seed)
        if not path.exists():
            return None
        return RunRecord.from_json(json.loads(path.read_text()), strategy, seed)

    def save(self, record: RunRecord) -> None:
        """Write the record, then drop the run's checkpoint: it is finished."""
        write_json(record.to_json(), self._path(record.strategy, record.seed))
        self.checkpoint(record.strategy, record.seed).unlink(missing_ok=True)

    def records(self) -> list[RunRecord]:
        """Every finished run in OUT (for reports), by file name."""
        out = []
        for path in sorted(self.runs.glob("*.json")):
            strategy, _, seed = path.stem.rpartition("-seed")
            out.append(RunRecord.from_json(json.loads(path.read_text()), strategy, int(seed)))
        return out


# ---------------------------------------------------------------------------- raw archives
RAW_ARCHIVE = "raw.tar.xz"
RAW_DIRS = ("runs", "logs", "points")  # what a results folder holds beside its tables


def pack_raw(folder: Path) -> Path | None:
    """Pack ``folder``'s run records and logs (:data:`RAW_DIRS`) into one compressed
    :data:`RAW_ARCHIVE` and remove them (committed results keep the tables, figures and
    this one file: 19 MB of JSON and CSV become 0.3 MB). None if there was nothing."""
    import shutil
    import tarfile

    folder = Path(folder)
    present = [d for d in RAW_DIRS if (folder / d).is_dir()]
    if not present:
        return None
    archive = folder / RAW_ARCHIVE

    def pack(tmp: Path) -> None:
        with tarfile.open(tmp, "w:xz") as tar:
            for d in present:
                tar.add(folder / d, arcname=d)

    atomic_write(archive, pack)
    for d in present:
        shutil.rmtree(folder / d)
    return archive


def unpack_raw(folder: Path) -> bool:
    """Unpack the raw folders of ``folder``'s :data:`RAW_ARCHIVE` that are not there (so
    ``report`` redraws, and a re-run resumes, committed results). Each folder is extracted
    aside and renamed into place, so a killed unpacking leaves none half-written. True if
    it unpacked any."""
    import shutil
    import tarfile
    import tempfile

    folder = Path(folder)
    archive = folder / RAW_ARCHIVE
    if not archive.is_file():
        return False
    missing = [d for d in RAW_DIRS if not (folder / d).exists()]
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.split("/")[0] in missing]
        if not members:
            return False
        for m in members:  # tarfile's "data" filter where it exists (3.11.4+), else ours
            if Path(m.name).is_absolute() or ".." in Path(m.name).parts or not (
                    m.isfile() or m.isdir()):
                raise ValueError(f"{archive}: refusing the archive member {m.name!r}")
        aside = Path(tempfile.mkdtemp(dir=folder, prefix=".unpacking-"))
        try:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(aside, members=members, filter="data")
            else:  # pragma: no cover (Python < 3.11.4)
                tar.extractall(aside, members=members)
            for d in missing:
                if (aside / d).exists():
                    (aside / d).rename(folder / d)
        finally:
            shutil.rmtree(aside, ignore_errors=True)
    return True
