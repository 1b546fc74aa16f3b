"""The private parts of Avalanche this package relies on, in one place.

``pyproject.toml`` pins ``avalanche-lib==0.6.*``; the names below are Avalanche 0.6's and
have no public equivalent there. An Avalanche that renamed one fails here, at import or at
first use, with a message naming what is missing and the supported version, instead of
deep inside a run. A test checks each against the installed Avalanche.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import version
from typing import Any

SUPPORTED = "0.6"


def _missing(what: str) -> str:
    return (f"kvb_avalanche needs {what} from avalanche-lib {SUPPORTED}.*, which the installed "
            f"avalanche-lib {version('avalanche-lib')} lacks: pip install 'avalanche-lib=="
            f"{SUPPORTED}.*'")


try:  # a classification dataset over tensors that keeps task labels (no public builder)
    from avalanche.benchmarks.utils import (
        _make_taskaware_tensor_classification_dataset as tensor_classification_dataset,
    )
except ImportError as e:  # pragma: no cover (another Avalanche)
    raise ImportError(_missing("avalanche.benchmarks.utils."
                               "_make_taskaware_tensor_classification_dataset")) from e


def criterion_of(strategy: Any) -> Any:
    """The loss module a SupervisedTemplate was given (kept as ``_criterion``; its public
    ``criterion()`` computes the loss instead)."""
    try:
        return strategy._criterion
    except AttributeError:
        raise AttributeError(_missing("SupervisedTemplate._criterion (the loss module)")) from None


def as_experiences(experiences: Any) -> list:
    """One experience or an iterable of them, as a list (what ``train`` accepts)."""
    return list(experiences) if isinstance(experiences, Iterable) else [experiences]


__all__ = ["as_experiences", "criterion_of", "tensor_classification_dataset"]
