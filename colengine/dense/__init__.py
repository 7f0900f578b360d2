"""The dense (single-vector) first stage: :class:`DenseEncoder` (sentence-transformers, with
Matryoshka truncation) and :class:`DenseIndex` (faiss; float32, int8 or binary codes).

``Retriever.build(..., dense=...)`` keeps one next to the late-interaction index, for the
``dense``, ``dense+rerank`` and ``hybrid`` pipelines (:class:`DenseStage`).
"""

from colengine.dense.encoder import PRECISIONS, DenseEncoder
from colengine.dense.index import EXACT_ROWS, HNSW_MIN_DOCS, DenseIndex
from colengine.dense.models import DEFAULT_DENSE_MODEL
from colengine.dense.stage import DenseStage

__all__ = [
           "DEFAULT_DENSE_MODEL",
           "EXACT_ROWS",
           "HNSW_MIN_DOCS",
           "PRECISIONS",
           "DenseEncoder",
           "DenseIndex",
           "DenseStage",
]
