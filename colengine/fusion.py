"""Reciprocal rank fusion (Cormack, Clarke and Buettcher, SIGIR 2009)."""

from __future__ import annotations

from collections.abc import Sequence

from colengine.types import Hit

__all__ = ["reciprocal_rank_fusion"]


def reciprocal_rank_fusion(runs: Sequence[Sequence[Hit]], *, k: int | None = None, c: int = 60
                           ) -> list[Hit]:
    """Fuse ranked lists: ``score(d) = sum over runs of 1 / (c + rank_run(d))``, ranks from 1.

    Only ranks matter, never the runs' own scores. A document missing from a run gets nothing
    from it; a document listed twice in one run counts once, at its best rank. Ties are broken
    by the best rank the document reached in any run, then by first appearance (earlier run,
    then higher rank), so the result is deterministic. ``k`` keeps the top ``k`` (``None``: all).

    >>> a = [Hit("x", 9.0), Hit("y", 8.0)]
    >>> b = [Hit("y", 0.9), Hit("z", 0.5)]
    >>> [(h.doc_id, round(h.score, 5)) for h in reciprocal_rank_fusion([a, b])]
    [('y', 0.03252), ('x', 0.01639), ('z', 0.01613)]
    """
    if isinstance(c, bool) or not isinstance(c, (int, float)) or c < 0:
        raise ValueError(f"c must be a non-negative number, got {c!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k <= 0):
        raise ValueError(f"k must be a positive int or None, got {k!r}")
    score: dict[str, float] = {}
    best: dict[str, int] = {}
    first: dict[str, int] = {}
    n_seen = 0
    for run in runs:
        seen: set[str] = set()
        for rank, hit in enumerate(run, 1):
            d = hit.doc_id
            if d in seen:
                continue
            seen.add(d)
            score[d] = score.get(d, 0.0) + 1.0 / (c + rank)
            if d not in first:
                first[d] = n_seen
                n_seen += 1
                best[d] = rank
            else:
                best[d] = min(best[d], rank)
    order = sorted(score, key=lambda d: (-score[d], best[d], first[d]))
    if k is not None:
        order = order[:k]
    return [Hit(d, score[d]) for d in order]
