"""colengine: late-interaction (ColBERT-style) retrieval.

Public names::

    from colengine import Retriever, Hit, Encoder, ExhaustiveIndex, PlaidIndex
"""

from colengine.encoder import DEFAULT_MODEL, Encoder
from colengine.errors import DuplicateIdError, IndexFormatError, UnknownIdError
from colengine.index import INDEX_KINDS, ExhaustiveIndex
from colengine.retriever import Retriever
from colengine.types import Hit

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "DuplicateIdError",
    "Encoder",
    "ExhaustiveIndex",
    "Hit",
    "IndexFormatError",
    "Retriever",
    "UnknownIdError",
    "__version__",
]

if "plaid" in INDEX_KINDS:
    PlaidIndex = INDEX_KINDS["plaid"]
    __all__.append("PlaidIndex")
