#!/usr/bin/env bash
# Create .venv and install kvb-avalanche with its benchmark and test dependencies.
# torch is pinned to 2.13.0 (the CPU wheel here) and everything else is installed against
# constraints.txt, so no dependency can pull a different (CUDA) torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[encoders,ray,slurm,dev]"
# Where this torchvision wheel's extension cannot load next to the CPU torch (PyPI's CUDA
# build), make Avalanche importable in every .venv process: see kvb_avalanche/torchvision_compat.py.
.venv/bin/python -W ignore::RuntimeWarning -m kvb_avalanche doctor --fix-torchvision
.venv/bin/python -W ignore -c "import avalanche, torchvision; print('installed: avalanche', avalanche.__version__, '/ torchvision', torchvision.__version__)"
