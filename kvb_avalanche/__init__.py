"""Discrete Key-Value Bottleneck (Träuble et al., ICML 2023) for Avalanche."""

import warnings

import kvb_avalanche_tv_compat as _tv_compat

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

__version__ = "0.1.0"

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
