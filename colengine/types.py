"""Small value types shared across the package."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Hit"]


@dataclass(frozen=True, order=False)
class Hit:
    """One search result: an external document id and its MaxSim score.

    >>> Hit("doc-1", 12.5)
    Hit(doc_id='doc-1', score=12.5)
    """

    doc_id: str
    score: float
