"""Discrete Key-Value Bottleneck (Träuble et al., ICML 2023) for Avalanche."""

import warnings
from importlib.metadata import PackageNotFoundError, version

from kvb_avalanche import torchvision_compat as _tv_compat

torchvision_compat = _tv_compat  # an attribute even when the start-up hook loaded it first
_tv_compat.install_hook()  # before anything imports torchvision (Avalanche does)

with warnings.catch_warnings():
    # Avalanche imports qpsolvers for GEM at import time, which warns on every start when no
    # QP solver is installed; nothing here uses GEM, so the warning is only noise.
    warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)
    from kvb_avalanche.bottleneck import KeyValueBottleneck, Lookup
    from kvb_avalanche.codes import CodesLoader
    from kvb_avalanche.decoders import LinearDecoder, MLPDecoder, VotingDecoder
    from kvb_avalanche.keys import KeyFitConfig, fit_keys
    from kvb_avalanche.model import KVBModel
    from kvb_avalanche.plugin import FrozenCodesPlugin, KVBPlugin
    from kvb_avalanche.sparse import SparseSGD
    from kvb_avalanche.strategy import KVBStrategy

try:
    __version__ = version("kvb-avalanche")  # one source: pyproject.toml's [project] version
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

if _tv_compat.applied() and not _tv_compat.armed_at_start():
    warnings.warn(_tv_compat.advice(), RuntimeWarning, stacklevel=2)

__all__ = [
    "CodesLoader",
    "FrozenCodesPlugin",
    "KVBModel",
    "KVBPlugin",
    "KVBStrategy",
    "KeyFitConfig",
    "KeyValueBottleneck",
    "LinearDecoder",
    "Lookup",
    "MLPDecoder",
    "SparseSGD",
    "VotingDecoder",
    "fit_keys",
]
