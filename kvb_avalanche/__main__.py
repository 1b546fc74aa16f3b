"""``python -m kvb_avalanche``: the ``kvb-avalanche`` command."""

from kvb_avalanche.cli import entry_point

entry_point()
