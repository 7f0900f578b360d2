"""Small value types shared across the package."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Hit", "Passage"]


@dataclass(frozen=True)
class Passage:
    """Which window of a document matched (``long_documents="chunk"`` / ``"late"``): its
    number and its span ``[start, end)`` in the document's text tokens (no special tokens).

    >>> Passage(1, 224, 477)
    Passage(index=1, start=224, end=477)
    """

    index: int
    start: int
    end: int


@dataclass(frozen=True, order=False)
class Hit:
    """One search result: an external document id and its MaxSim score; with
    ``search(..., return_text=True / return_metadata=True)`` also the document's stored text
    and metadata (they do not take part in ``==``). ``passage``: for an index of passages
    (``Retriever.build(..., long_documents="chunk" | "late")``), the window that gave the
    score (not shown by ``repr``, not part of ``==``).

    >>> Hit("doc-1", 12.5)
    Hit(doc_id='doc-1', score=12.5)
    >>> Hit("doc-1", 12.5, text="hello", metadata={"lang": "en"})
    Hit(doc_id='doc-1', score=12.5, text='hello', metadata={'lang': 'en'})
    """

    doc_id: str
    score: float
    text: str | None = field(default=None, compare=False)
    metadata: dict[str, Any] | None = field(default=None, compare=False)
    passage: Passage | None = field(default=None, compare=False, repr=False)

    def __repr__(self) -> str:
        extra = "".join(f", {n}={getattr(self, n)!r}" for n in ("text", "metadata")
                        if getattr(self, n) is not None)
        return f"Hit(doc_id={self.doc_id!r}, score={self.score!r}{extra})"
