"""Index implementations behind one protocol (:class:`colengine.index.base.Index`)."""

from colengine.index.base import Index
from colengine.index.exhaustive import ExhaustiveIndex

__all__ = ["Index", "ExhaustiveIndex", "INDEX_KINDS"]

#: kind name -> class; every class has ``build(doc_embeddings, ids, **kwargs)`` and ``from_bundle``.
INDEX_KINDS: dict[str, type] = {"exhaustive": ExhaustiveIndex}

try:  # the PLAID index registers itself when its package is present
    from colengine.index.plaid import PlaidIndex  # noqa: F401

    INDEX_KINDS["plaid"] = PlaidIndex
    __all__.append("PlaidIndex")
except ImportError as _e:  # pragma: no cover - only while the PLAID package is being written
    if "PlaidIndex" not in str(_e):
        raise
