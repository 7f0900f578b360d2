"""The inverted lists kept up to date by adds and deletes (``colengine.index.plaid.ivf``)
against lists built afresh from every code, as a plain model would: after any sequence of
adds and deletes the lists hold the same postings, and lists taken before a change still
hold what they held (a search may be reading them)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colengine.index.plaid import ivf


def _content(L: ivf.Lists) -> tuple[list[int], list[int], list[int], list[int]]:
    offsets, docs = L.ivf_csr()
    return (offsets.tolist(), docs.tolist(), L.doc_code_offsets.tolist(), L.doc_codes.tolist())


def _model(codes: list[np.ndarray], dead: set[int], k: int) -> tuple:
    """What the lists must hold: every document's distinct codes, by brute force."""
    per_doc = [sorted(set(c.tolist())) for c in codes]
    lists = [[d for d, cs in enumerate(per_doc) if c in cs and d not in dead] for c in range(k)]
    offsets = np.cumsum([0] + [len(x) for x in lists]).tolist()
    dco = np.cumsum([0] + [len(x) for x in per_doc]).tolist()
    return offsets, [d for x in lists for d in x], dco, [c for x in per_doc for c in x]


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 12), seed=st.integers(0, 2**16),
       ops=st.lists(st.tuples(st.sampled_from(["add", "delete"]), st.integers(1, 6)),
                    min_size=1, max_size=14),
       few_edits=st.sampled_from([0, 2, 4096]), few_pairs=st.sampled_from([0, 3, 4096]),
       room_scale=st.sampled_from([0, 1]))
def test_lists_after_adds_and_deletes_equal_lists_built_afresh(
        k, seed, ops, few_edits, few_pairs, room_scale):
    """Adds go in place, to the tail, or lay the lists out anew (the limits and the room
    each list gets varied so that every path is taken); deletes take few or all postings."""
    mp = pytest.MonkeyPatch()
    mp.setattr(ivf, "_FEW_EDITS", few_edits)
    mp.setattr(ivf, "FEW_PAIRS", few_pairs)
    if room_scale == 0:   # no spare slots at all: every add moves its lists or lays out anew
        mp.setattr(ivf, "room_for", lambda n: n + 0)
        mp.setattr(ivf, "_MIN_TAIL", 3)
    try:
        rng = np.random.default_rng(seed)
        codes = [rng.integers(0, k, rng.integers(1, 6)) for _ in range(rng.integers(1, 5))]
        off = np.cumsum([0] + [len(c) for c in codes])
        L = ivf.build_lists(np.concatenate(codes), off, k)
        dead: set[int] = set()
        held = []   # every earlier version, with what it held then and its documents
        for op, n in ops:
            held.append((L, _content(L), list(codes), set(dead)))
            if op == "add":
                new = [rng.integers(0, k, rng.integers(0, 6)) for _ in range(n)]  # 0: empty
                noff = np.cumsum([0] + [len(c) for c in new])
                L = ivf.extend_lists(L, np.concatenate(new), noff, k)
                codes += new
            else:
                live = [d for d in range(len(codes)) if d not in dead]
                if len(live) <= 1:
                    continue
                drop = rng.choice(live, size=min(n, len(live) - 1), replace=False)
                dead |= {int(d) for d in drop}
                mask = np.zeros(len(codes), dtype=bool)
                mask[sorted(dead)] = True
                L = ivf.drop_docs(L, mask)
            assert _content(L) == _model(codes, dead, k)
        # a stale preparation: an add to an earlier version (not the latest) holds that
        # version's postings and its own, and takes no slot another version holds
        final = _content(L)
        branches = []
        for old, _, codes_then, dead_then in held[::2]:
            doc = rng.integers(0, k, rng.integers(1, 6))
            branch = ivf.extend_lists(old, doc, np.array([0, len(doc)]), k)
            branches.append((branch, _model(codes_then + [doc], dead_then, k)))
        assert _content(L) == final
        for branch, want in branches:
            assert _content(branch) == want
        for old, content, _, _ in held:
            assert _content(old) == content
        # the lists the index rebuilds at load are the same
        mask = np.zeros(len(codes), dtype=bool)
        mask[sorted(dead)] = True
        again = ivf.build_lists(np.concatenate(codes), np.cumsum([0] + [len(c) for c in codes]),
                                k, deleted=mask)
        assert _content(again) == _content(L)
    finally:
        mp.undo()


def test_small_adds_write_in_place_and_leave_earlier_lists_unchanged():
    rng = np.random.default_rng(0)
    k = 64
    codes = rng.integers(0, k, 5000)
    off = np.arange(0, 5001, 50)
    L = ivf.build_lists(codes, off, k)
    first = ivf.extend_lists(L, rng.integers(0, k, 20), np.array([0, 20]), k)
    assert first.ivf_docs is not L.ivf_docs          # laid out with room, once
    buf = first.ivf_docs
    cur = first
    for _ in range(30):   # one-document adds: same buffer, postings written in its room
        cur = ivf.extend_lists(cur, rng.integers(0, k, 20), np.array([0, 20]), k)
        assert cur.ivf_docs is buf
    assert cur.doc_codes.base is first.doc_codes.base   # the documents' lists grow in place
    assert _content(cur)[0][-1] == cur.n_pairs == len(_content(cur)[1])
    before = _content(first)
    gone = np.zeros(len(cur.doc_code_offsets) - 1, dtype=bool)
    gone[[3, 101]] = True
    after = ivf.drop_docs(cur, gone)
    assert after.ivf_docs is buf and _content(first) == before
    assert not ({3, 101} & set(_content(after)[1]))
