"""PLAID index: centroids, residual codec, inverted lists and the four-stage search."""

from colengine.index.plaid.codec import ProductCodec, ResidualCodec, ScalarCodec
from colengine.index.plaid.index import PlaidIndex
from colengine.index.plaid.search import KNOB_NAMES, KnobOverrides, Knobs
from colengine.index.plaid.tune import TuneResult

__all__ = ["PlaidIndex", "ResidualCodec", "ProductCodec", "ScalarCodec", "Knobs", "KnobOverrides", "KNOB_NAMES",
           "TuneResult"]
