"""Make a CUDA-built torchvision wheel importable next to a CPU-only torch.

PyPI's torchvision 0.28 wheel is built against CUDA: its compiled extension ``_C.so``
links ``libtorch_cuda.so``, which the ``+cpu`` torch build lacks. The extension then fails
to load without a word and ``import torchvision`` (so ``import avalanche``) dies with
``RuntimeError: operator torchvision::nms does not exist``.

:func:`install_hook` (run from ``kvb_avalanche_tv_compat.pth`` at interpreter start, and
again by ``import kvb_avalanche``) waits until torchvision is first imported, then tries
to load ``_C.so`` itself. Only if that fails does it declare the two operator schemas
torchvision attaches fake kernels to (``nms``, ``qnms``) and give ``nms`` a small CPU
kernel. Where the extension loads (a CUDA machine, a CPU torchvision build) it does
nothing. This module imports nothing heavy at start-up: it runs on every interpreter.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_library = None  # the torch.library.Library must stay alive or its ops are dropped
_checked = False


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


def register_missing_ops() -> bool:
    """Declare torchvision's ops if its extension cannot load. True if it had to."""
    global _library, _checked
    if _checked:
        return _library is not None
    _checked = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch

    extension = os.path.join(next(iter(spec.submodule_search_locations)), "_C.so")
    try:
        torch.ops.load_library(extension)
        return False
    except (OSError, ImportError, RuntimeError):
        pass
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


def install_hook() -> None:
    """Arm the hook unless torchvision is already imported."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
