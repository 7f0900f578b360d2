"""PLAID index: centroids, residual codec, inverted lists and the four-stage search."""

from colengine.index.plaid.codec import ResidualCodec
from colengine.index.plaid.index import PlaidIndex
from colengine.index.plaid.search import Knobs, default_knobs, resolve_knobs

__all__ = ["PlaidIndex", "ResidualCodec", "Knobs", "default_knobs", "resolve_knobs"]
