"""Reciprocal rank fusion against hand-computed values."""

from __future__ import annotations

import pytest

from colengine.fusion import reciprocal_rank_fusion
from colengine.types import Hit


def H(*ids):
    return [Hit(d, 100.0 - i) for i, d in enumerate(ids)]


def test_hand_checked_example():
    # run A: a b c ; run B: c a d   (c = 60)
    # a: 1/61 + 1/62 ; c: 1/63 + 1/61 ; b: 1/62 ; d: 1/63
    out = reciprocal_rank_fusion([H("a", "b", "c"), H("c", "a", "d")])
    assert [h.doc_id for h in out] == ["a", "c", "b", "d"]
    expect = {"a": 1 / 61 + 1 / 62, "c": 1 / 63 + 1 / 61, "b": 1 / 62, "d": 1 / 63}
    for h in out:
        assert h.score == pytest.approx(expect[h.doc_id], abs=1e-12)


def test_scores_are_ignored_only_ranks_count():
    a = [Hit("x", 1e6), Hit("y", -5.0)]
    b = [Hit("x", 0.001), Hit("y", 0.0)]
    assert [h.doc_id for h in reciprocal_rank_fusion([a, b])] == ["x", "y"]


def test_ties_k_c_and_duplicates():
    # x and y tie (1/(c+1) each); x reached rank 1 first (run 0), so it comes first
    out = reciprocal_rank_fusion([H("x"), H("y")], c=0)
    assert [(h.doc_id, h.score) for h in out] == [("x", 1.0), ("y", 1.0)]
    out = reciprocal_rank_fusion([H("a", "b", "c"), H("c", "a", "d")], k=2)
    assert [h.doc_id for h in out] == ["a", "c"]
    # a duplicate inside one run counts once, at its best rank
    out = reciprocal_rank_fusion([H("a", "a", "b")], c=1)
    assert out[0] == Hit("a", 0.5) and out[1] == Hit("b", 0.25)
    assert reciprocal_rank_fusion([]) == [] and reciprocal_rank_fusion([[], []]) == []
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([H("a")], k=0)
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([H("a")], c=-1)
