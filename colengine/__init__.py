"""colengine: late-interaction (ColBERT-style) retrieval.

Public names::

    from colengine import Retriever, Hit, Encoder, ExhaustiveIndex, PlaidIndex
    from colengine import Client        # a colengine server, same interface (extra: serve)

They are imported lazily, so ``import colengine.storage`` (or the CLI's ``--help``) does not
pay for torch, transformers and PyLate.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "DEFAULT_MODEL": "colengine.encoder",
    "Encoder": "colengine.encoder",
    "JsonlCorpus": "colengine.corpus",
    "DuplicateIdError": "colengine.errors",
    "FilterError": "colengine.errors",
    "IndexFormatError": "colengine.errors",
    "UnknownIdError": "colengine.errors",
    "ExhaustiveIndex": "colengine.index.exhaustive",
    "PlaidIndex": "colengine.index.plaid",
    "Retriever": "colengine.retriever",
    "Hit": "colengine.types",
    "Client": "colengine.server.client",
    "DenseEncoder": "colengine.dense",
    "DenseIndex": "colengine.dense",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'colengine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from colengine.corpus import JsonlCorpus
    from colengine.dense import DenseEncoder, DenseIndex
    from colengine.encoder import DEFAULT_MODEL, Encoder
    from colengine.errors import DuplicateIdError, FilterError, IndexFormatError, UnknownIdError
    from colengine.index.exhaustive import ExhaustiveIndex
    from colengine.index.plaid import PlaidIndex
    from colengine.retriever import Retriever
    from colengine.server.client import Client
    from colengine.types import Hit
