"""The ``device`` option: ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``,
``cuda:N`` or ``mps``."""

from __future__ import annotations

import re

import torch

DEVICE_FORM = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(name: str) -> None:
    """Raise ValueError unless ``name`` has one of the accepted forms (availability aside)."""
    if not isinstance(name, str) or not DEVICE_FORM.match(name):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` asks for on this machine; ValueError if it has none."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine "
                             f"(torch {torch.__version__}); use device 'auto' or 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available on this machine")
    return device
