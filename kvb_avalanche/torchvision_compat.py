"""Make a CUDA-built torchvision wheel importable next to a CPU-only torch.

PyPI's torchvision 0.28 wheel is built against CUDA: its compiled extension ``_C.so``
links ``libtorch_cuda.so``, which the ``+cpu`` torch build lacks. The extension then fails
to load without a word and ``import torchvision`` (so ``import avalanche``) dies with
``RuntimeError: operator torchvision::nms does not exist``.

:func:`install_hook` (run by ``import kvb_avalanche``) waits until torchvision is first
imported, then tries to load ``_C.so`` itself. Only if that fails does it declare the two
operator schemas torchvision attaches fake kernels to (``nms``, ``qnms``) and give ``nms`` a
small CPU kernel. Where the extension loads (a CUDA machine, a CPU torchvision build) it
does nothing.

Nothing of this runs unless asked for. A process that imports torchvision before
``kvb_avalanche`` still fails on such a machine; ``kvb-avalanche doctor --fix-torchvision``
writes :data:`PTH_NAME` into the environment's site-packages, which arms the same hook at
every interpreter start of that environment (``scripts/install.sh`` does this inside the
dev ``.venv``). Deleting that file undoes it. This module imports nothing heavy: the
``.pth`` loads it by path, without importing the package.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "kvb_avalanche_torchvision_compat.pth"

_library = None  # the torch.library.Library must stay alive or its ops are dropped
_checked = False
_at_start = False  # armed by the .pth when this interpreter started


def _nms(boxes, scores, iou_threshold: float):
    """Greedy non-maximum suppression on CPU, boxes as (N, 4) x1, y1, x2, y2."""
    import torch

    order = scores.argsort(descending=True)
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1) * (y2 - y1)
    removed = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in order.tolist():
        if removed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        removed |= inter / (area[i] + area - inter) > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


@functools.cache  # the answer cannot change within a process; loading is not free
def extension_error() -> str | None:
    """Why torchvision's compiled extension cannot load here; None if it loads (or if
    torchvision is not installed)."""
    spec = importlib.machinery.PathFinder.find_spec("torchvision")  # not through our hook
    if spec is None or not spec.submodule_search_locations:
        return None
    import torch

    extension = os.path.join(next(iter(spec.submodule_search_locations)), "_C.so")
    try:
        torch.ops.load_library(extension)
        return None
    except (OSError, ImportError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"


def register_missing_ops() -> bool:
    """Declare torchvision's ops if its extension cannot load. True if it had to."""
    global _library, _checked
    if _checked:
        return _library is not None
    _checked = True
    import torch

    if extension_error() is None:
        return False
    _library = torch.library.Library("torchvision", "DEF")
    _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library.impl("nms", _nms, "CPU")
    return True


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs :func:`register_missing_ops` right before torchvision's first import."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        if not register_missing_ops():
            return None
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_then_allow_nms(module):
            exec_module(module)
            import torchvision.ops.boxes

            torchvision.ops.boxes._assert_has_ops = lambda: None  # our nms kernel serves

        spec.loader.exec_module = exec_then_allow_nms
        return spec


def install_hook(at_start: bool = False) -> None:
    """Arm the hook unless torchvision is already imported (``at_start``: from the .pth)."""
    global _at_start
    _at_start = _at_start or at_start
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())


def applied() -> bool:
    """Whether this process declared torchvision's ops itself."""
    return _library is not None


def pth_line() -> str:
    """The ``.pth`` line: load this file by path (the package is not imported) and arm the
    hook; a no-op once the file is gone."""
    here = str(Path(__file__).resolve())
    return (f"import importlib.util as _u, os as _o, sys as _s; _n = {__name__!r}; "
            f"_p = {here!r}; _m = None if _n in _s.modules or not _o.path.exists(_p) else "
            "_u.module_from_spec(_u.spec_from_file_location(_n, _p)); _m and ("
            "_s.modules.setdefault(_n, _m), _m.__spec__.loader.exec_module(_m), "
            "_m.install_hook(True))\n")


def site_packages() -> Path:
    """This environment's site-packages (where ``pip install`` puts packages)."""
    return Path(sysconfig.get_paths()["purelib"])


def write_pth(site: Path | None = None) -> Path:
    """Write :data:`PTH_NAME` into ``site`` (default: :func:`site_packages`)."""
    path = Path(site or site_packages()) / PTH_NAME
    path.write_text(pth_line())
    return path


def armed_at_start() -> bool:
    """Whether :data:`PTH_NAME` armed the hook when this interpreter started."""
    return _at_start


def installed(name: str) -> str:
    """A distribution's installed version, or 'not installed'."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def advice() -> str:
    """What is wrong and the one command that fixes it for the whole environment."""
    return (f"torchvision {installed('torchvision')}'s compiled extension cannot load next to "
            f"torch {installed('torch')} ({extension_error()}); kvb_avalanche declared "
            "torchvision's two operators for this process, so import kvb_avalanche before "
            "avalanche or torchvision. `kvb-avalanche doctor --fix-torchvision` does the same "
            "for every interpreter of this environment: it writes "
            f"{site_packages() / PTH_NAME} (one line that loads {Path(__file__).name} by path "
            "when Python starts; delete the file to undo). A torchvision built for this torch "
            "needs neither.")
