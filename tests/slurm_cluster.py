"""A throwaway one-node SLURM cluster on localhost, for tests (wraps scripts/slurm_cluster.sh).

    reason = available()          # None, or what is missing
    env = start(Path(tmp))        # {"SLURM_CONF": ...}: set it for sbatch & co.
    ...
    stop(Path(tmp))

Needs root and Debian's ``slurm-wlm`` and ``munge``. Keep ``dir`` short (``tempfile.mkdtemp()``
under /tmp): unix socket paths in it are limited to 107 bytes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "slurm_cluster.sh"
REQUIRED = ("slurmctld", "slurmd", "munged", "sbatch")


def available() -> str | None:
    """None when a local cluster can be started here, else why not."""
    missing = [name for name in REQUIRED if shutil.which(name) is None]
    if missing:
        return f"missing {', '.join(missing)} on PATH (apt-get install -y slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd)"
    return None


def _run(command: str, dir: Path, timeout: float) -> str:
    proc = subprocess.run(
        ["bash", str(SCRIPT), command, str(dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"slurm_cluster.sh {command} {dir} failed ({proc.returncode}):\n{proc.stderr}"
        )
    return proc.stdout


def start(dir: Path, timeout: float = 90.0) -> dict[str, str]:
    """Start (or keep) the cluster in ``dir``; return the environment its clients need.
    It keeps no accounting (no slurmdbd): ``sacct`` answers that accounting is disabled,
    as on a cluster without it, and the SLURM engine reads job states from squeue."""
    out = _run("start", dir, timeout)
    last = out.strip().splitlines()[-1] if out.strip() else ""
    prefix = "export SLURM_CONF="
    if not last.startswith(prefix):
        raise RuntimeError(f"slurm_cluster.sh start printed no SLURM_CONF: {out!r}")
    return {"SLURM_CONF": last[len(prefix) :]}


def stop(dir: Path, timeout: float = 90.0) -> None:
    """Cancel the cluster's jobs and stop the daemons that ``start`` ran in ``dir``."""
    _run("stop", dir, timeout)
