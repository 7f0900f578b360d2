"""Input checks for lists of texts, shared by the encoder and BM25."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["check_texts"]


def check_texts(texts: Sequence[str] | str, what: str, *, allow_blank: bool = False) -> list[str]:
    """``texts`` as a list, or a clear error: a single string, a non-string item, or (unless
    ``allow_blank``) an empty or whitespace-only item is named by its position.

    >>> check_texts(["a", "b"], "documents")
    ['a', 'b']
    """
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a list of strings, not a single string")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] must be str, got {type(t).__name__}")
        if not allow_blank and not t.strip():
            raise ValueError(f"{what}[{i}] is empty")
    return out
