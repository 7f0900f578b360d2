"""Index implementations behind one protocol (:class:`colengine.index.base.Index`)."""

from colengine.index.base import Index
from colengine.index.exhaustive import ExhaustiveIndex
from colengine.index.plaid import PlaidIndex

__all__ = ["Index", "ExhaustiveIndex", "PlaidIndex", "INDEX_KINDS"]

#: kind name -> class; every class has ``build(doc_embeddings, ids, **kwargs)`` and ``from_bundle``.
INDEX_KINDS: dict[str, type] = {"exhaustive": ExhaustiveIndex, "plaid": PlaidIndex}
