"""Inverted lists (centroid -> documents) and per-document centroid lists, both as CSR.

Both come from the same deduplicated set of (document, centroid) pairs: sorted by document
they give each document's distinct centroids (used by the exact centroid interaction of
stage 3), sorted by centroid they give the inverted lists (candidate generation and the
pruned centroid interaction of stage 2). They are derived from the tokens' codes, so they are
not stored on disk (two int32 numbers for each of ~0.9 pairs a token: ~7 bytes a token) and
are rebuilt in about a quarter of a second per million tokens (23 s for 100M) when an index
is built or loaded.

Adds and deletes never copy every posting. The inverted lists live in a buffer where, after
the first change, each list has spare slots behind it (:func:`room_for`) and the buffer has a
free tail: an add writes its postings into their lists' spare slots, a list without room
(or one a delete shortens) is copied to the tail, and only when the tail is full are the
lists laid out anew. A slot is written once, past the end of every list that a reader may
hold, so a search never sees its lists change. The per-document lists only grow at their
end, into buffers a sixteenth larger than needed (amortised).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from colengine.csr import distinct_pairs, index_dtype

__all__ = ["Lists", "build_lists", "doc_of_token", "extend_lists", "drop_docs"]


def doc_of_token(doc_offsets: np.ndarray) -> np.ndarray:
    """int64 ``[T]``: the document of every token."""
    lens = np.diff(doc_offsets)
    return np.repeat(np.arange(lens.size, dtype=np.int64), lens)


def _csr_offsets(keys: np.ndarray, n: int) -> np.ndarray:
    off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=n), out=off[1:])
    return off


def room_for(n: np.ndarray) -> np.ndarray:
    """Slots given to a list of ``n`` postings when it is laid out anew: an eighth more and
    four, so that adds append to it in place for a while."""
    return n + (n >> 3) + 4


class _Room:
    """The spare room of an inverted-list buffer ``arr``, shared by every :class:`Lists` made
    from it: list ``c``'s latest region ends at ``cap[c]``, its slots are handed out up to
    ``end[c]``, and slots from ``tail`` on belong to no list. Slots once handed out are never
    handed out again (a list that outgrows its region moves to the tail), so the postings a
    :class:`Lists` (or a search state made from it) reads never change under it."""

    def __init__(self, arr: np.ndarray, end: np.ndarray, cap: np.ndarray, tail: int) -> None:
        self.arr, self.end, self.cap, self.tail = arr, end, cap, tail


class _Grown:
    """A buffer whose first ``used`` items are handed out as views (see :func:`_appended`)."""

    def __init__(self, arr: np.ndarray, used: int) -> None:
        self.arr, self.used = arr, used


def _appended(view: np.ndarray, grown: "_Grown | None", tail: np.ndarray
              ) -> tuple[np.ndarray, _Grown]:
    """``view`` followed by ``tail`` as a view of a buffer: written past ``view``'s end in
    place when ``view`` is the buffer's latest prefix and it has room, else into a new buffer
    a sixteenth larger (amortised). ``view`` itself never changes."""
    n, m = view.shape[0], tail.shape[0]
    dt = np.promote_types(view.dtype, tail.dtype)
    if (grown is None or grown.used != n or grown.arr.dtype != dt or grown.arr.shape[0] < n + m
            or (n and view.ctypes.data != grown.arr.ctypes.data)):
        arr = np.empty(n + m + n // 16 + 4096, dtype=dt)
        arr[:n] = view
        grown = _Grown(arr, n)
    grown.arr[n:n + m] = tail
    grown.used = n + m
    return grown.arr[:n + m], grown


@dataclass
class Lists:
    """The inverted lists: centroid ``c``'s documents, sorted, are ``ivf_docs[ivf_starts[c] :
    ivf_starts[c] + ivf_lens[c]]`` (``ivf_starts``, ``ivf_lens``: int64 ``[K]``). ``ivf_docs``
    is a buffer: as built, the lists follow each other with nothing between them; after an add
    each list has spare slots behind it, so an add appends its few postings in place (a list
    that runs out of room moves to the buffer's free tail) instead of copying every posting.
    ``doc_code_offsets [N + 1]``, ``doc_codes [P]``: distinct centroids of each document
    (sorted; views of growable buffers). Offsets are int64; ``ivf_docs`` and ``doc_codes``
    int32 while the numbers fit (:func:`~colengine.csr.index_dtype`).

    >>> L = build_lists(np.array([2, 0, 2, 1]), np.array([0, 2, 4]), 3)
    >>> offsets, docs = L.ivf_csr()
    >>> offsets.tolist(), docs.tolist()
    ([0, 1, 2, 4], [0, 1, 0, 1])
    >>> L2 = extend_lists(L, np.array([2]), np.array([0, 1]), 3)
    >>> L2.ivf_csr()[1].tolist(), L.ivf_csr()[1].tolist()   # L is unchanged
    ([0, 1, 0, 1, 2], [0, 1, 0, 1])
    """

    ivf_starts: np.ndarray
    ivf_lens: np.ndarray
    ivf_docs: np.ndarray
    doc_code_offsets: np.ndarray
    doc_codes: np.ndarray
    room: _Room | None = field(default=None, repr=False, compare=False)
    grown: tuple[_Grown | None, _Grown | None] = field(default=(None, None), repr=False,
                                                       compare=False)

    @property
    def n_pairs(self) -> int:
        return int(self.ivf_lens.sum())

    @property
    def n_lists(self) -> int:
        return int(self.ivf_lens.shape[0])

    def ivf_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """The inverted lists as plain CSR ``(offsets [K + 1], docs [P])``, one list after
        the other (no copy when they are laid out so already)."""
        offsets = np.zeros(self.n_lists + 1, dtype=np.int64)
        np.cumsum(self.ivf_lens, out=offsets[1:])
        if np.array_equal(self.ivf_starts, offsets[:-1]):
            return offsets, self.ivf_docs[:offsets[-1]]
        docs = np.empty(int(offsets[-1]), dtype=self.ivf_docs.dtype)
        _copy_lists(self.ivf_docs, self.ivf_starts, self.ivf_lens, docs, offsets[:-1])
        return offsets, docs


def _copy_lists(src: np.ndarray, starts: np.ndarray, lens: np.ndarray, dst: np.ndarray,
                to: np.ndarray) -> None:
    """Copy each list ``src[starts[c]:starts[c] + lens[c]]`` to ``dst[to[c]:]``."""
    for s, n, t in zip(starts.tolist(), lens.tolist(), to.tolist()):
        if n:
            dst[t:t + n] = src[s:s + n]


def _compact(offsets: np.ndarray, docs: np.ndarray, dco: np.ndarray,
             doc_codes: np.ndarray) -> Lists:
    """:class:`Lists` of plain CSR inverted lists (laid out one after the other, no room)."""
    return Lists(offsets[:-1].copy(), np.diff(offsets), docs, dco, doc_codes)


def build_lists(codes: np.ndarray, doc_offsets: np.ndarray, n_centroids: int,
                deleted: np.ndarray | None = None) -> Lists:
    """Both CSR structures from token codes ``[T]`` and document offsets ``[N + 1]`` (vectorised).

    Documents flagged in ``deleted`` (bool ``[N]``, tombstones) are left out of the inverted
    lists (their own centroid lists are kept: they are never candidates, so never read)."""
    n_docs = doc_offsets.shape[0] - 1
    k = int(n_centroids)
    docs, cents = distinct_pairs(codes, doc_offsets, k, dtype=index_dtype(max(n_docs, k)))
    doc_code_offsets = _csr_offsets(docs, n_docs)
    order = np.argsort(cents, kind="stable")              # by code; docs stay sorted inside
    ivf_docs = docs[order]
    del docs, order
    lists = _compact(_csr_offsets(cents, k), ivf_docs, doc_code_offsets, cents)
    if deleted is not None and np.any(deleted):
        lists = drop_docs(lists, deleted)
    return lists


def extend_lists(lists: Lists, codes: np.ndarray, doc_offsets: np.ndarray,
                 n_centroids: int) -> Lists:
    """``lists`` plus documents appended after its last one (their codes ``[T']`` and offsets
    ``[M + 1]``); ``lists`` itself is not changed. The new documents' pairs go to the end of
    each inverted list (their rows are larger than every old one, so lists stay sorted):
    written into the list's spare slots when it has them, the list moved to the buffer's free
    tail when it has not, and the lists laid out anew with room (one pass over every posting)
    when the tail is full or the add touches more than :data:`_FEW_EDITS` lists."""
    k = int(n_centroids)
    first = lists.doc_code_offsets.shape[0] - 1
    n_new = doc_offsets.shape[0] - 1
    dt = np.promote_types(lists.ivf_docs.dtype, index_dtype(max(first + n_new, k)))
    docs, cents = distinct_pairs(codes, doc_offsets, k, first_row=first, dtype=dt)
    g_off, g_codes = lists.grown
    dco, g_off = _appended(lists.doc_code_offsets, g_off,
                           lists.doc_code_offsets[-1] + _csr_offsets(docs - first, n_new)[1:])
    doc_codes, g_codes = _appended(lists.doc_codes, g_codes, cents)
    if cents.shape[0] == 0:   # documents without tokens: no posting to place
        return Lists(lists.ivf_starts, lists.ivf_lens, lists.ivf_docs, dco, doc_codes,
                     lists.room, (g_off, g_codes))
    order = np.argsort(cents, kind="stable")   # new pairs by centroid, then document
    cents, docs = cents[order], docs[order]
    placed = _append_in_room(lists, cents, docs) if lists.ivf_docs.dtype == dt else None
    if placed is None:
        placed = _lay_out(lists, cents, docs, dt)
    starts, lens, room = placed
    return Lists(starts, lens, room.arr, dco, doc_codes, room, (g_off, g_codes))


def _append_in_room(lists: Lists, cents: np.ndarray, docs: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, _Room] | None:
    """New postings (``docs`` by centroid ``cents``, sorted) appended to ``lists`` in its
    buffer's room, or None (nothing written) when they do not fit or touch too many lists."""
    room = lists.room
    if room is None or room.arr is not lists.ivf_docs:
        return None
    uc, at, cnt = np.unique(cents, return_index=True, return_counts=True)
    if uc.shape[0] > _FEW_EDITS:
        return None
    ends = lists.ivf_starts[uc] + lists.ivf_lens[uc]
    fits = (ends == room.end[uc]) & (ends + cnt <= room.cap[uc])
    sizes = room_for(lists.ivf_lens[uc] + cnt)
    if room.tail + int(sizes[~fits].sum()) > room.arr.shape[0]:
        return None
    arr, starts, lens = room.arr, lists.ivf_starts.copy(), lists.ivf_lens.copy()
    for c, a, m, e, ok, size in zip(uc.tolist(), at.tolist(), cnt.tolist(), ends.tolist(),
                                    fits.tolist(), sizes.tolist()):
        n = int(lens[c])
        if not ok:   # moved to the tail with room to grow (its old slots are left as they are)
            t = room.tail
            arr[t:t + n] = arr[e - n:e]
            room.cap[c], room.tail, starts[c], e = t + size, t + size, t, t + n
        arr[e:e + m] = docs[a:a + m]
        room.end[c] = e + m
        lens[c] = n + m
    return starts, lens, room


def _lay_out(lists: Lists, cents: np.ndarray, docs: np.ndarray, dt: np.dtype
             ) -> tuple[np.ndarray, np.ndarray, _Room]:
    """The inverted lists of ``lists`` followed by new postings (``docs`` by centroid
    ``cents``, sorted), copied into a new buffer where each list has room to grow
    (:func:`room_for`) and a sixteenth more is left free at the end."""
    k = lists.n_lists
    add = np.bincount(cents, minlength=k).astype(np.int64)
    lens = lists.ivf_lens + add
    caps = room_for(lens)
    starts = np.zeros(k, dtype=np.int64)
    np.cumsum(caps[:-1], out=starts[1:])
    total = int(starts[-1] + caps[-1]) if k else 0
    arr = np.empty(total + max(total // 16, _MIN_TAIL), dtype=dt)
    _copy_lists(lists.ivf_docs, lists.ivf_starts, lists.ivf_lens, arr, starts)
    if cents.shape[0]:   # each new posting after its list's old ones, in order
        rank = np.arange(cents.shape[0]) - np.searchsorted(cents, cents, side="left")
        arr[starts[cents] + lists.ivf_lens[cents] + rank] = docs
    return starts, lens, _Room(arr, starts + lens, starts + caps, total)


#: a delete of up to this many (document, centroid) pairs finds them in their lists one
#: binary search each (:func:`drop_docs`); more are found by one pass over every posting
FEW_PAIRS = 4096


def drop_docs(lists: Lists, deleted: np.ndarray) -> Lists:
    """``lists`` with the documents flagged in ``deleted`` (bool ``[N]``) removed from the
    inverted lists (the per-document centroid lists are kept as they are).

    A few documents (a server's deletes) are looked up where they are: each of their
    centroids' lists is sorted by document, so a binary search finds each posting, and only
    those lists are copied, without them, to the buffer's free tail (a million documents:
    the lists a document touches instead of ~0.1 s for a copy of every posting, ~1.3 s for
    a pass that builds a centroid number for every posting)."""
    deleted = np.asarray(deleted, dtype=bool)
    dead = np.flatnonzero(deleted)
    dco = lists.doc_code_offsets
    n_pairs = int((dco[dead + 1] - dco[dead]).sum()) if dead.size else 0
    if n_pairs == 0:
        return lists
    if n_pairs <= FEW_PAIRS:
        return _drop_few(lists, dead, deleted)
    return _drop_all(lists, deleted)


def _drop_all(lists: Lists, deleted: np.ndarray) -> Lists:
    """:func:`drop_docs` by one pass over every posting: plain CSR lists without them."""
    offsets, docs = lists.ivf_csr()
    keep = ~deleted[docs]
    if keep.all():
        return lists
    k = lists.n_lists
    cents = np.repeat(np.arange(k, dtype=np.int64), np.diff(offsets))[keep]
    out = _compact(_csr_offsets(cents, k), docs[keep], lists.doc_code_offsets, lists.doc_codes)
    out.grown = lists.grown
    return out


def _drop_few(lists: Lists, dead: np.ndarray, deleted: np.ndarray) -> Lists:
    """:func:`drop_docs` for the documents ``dead`` (rows, few) by binary searches."""
    starts, lens, docs = lists.ivf_starts, lists.ivf_lens, lists.ivf_docs
    gone: dict[int, list[int]] = {}
    for d in dead.tolist():
        for c in lists.doc_codes[lists.doc_code_offsets[d]:lists.doc_code_offsets[d + 1]].tolist():
            a = int(starts[c])
            b = a + int(lens[c])
            j = a + int(np.searchsorted(docs[a:b], d))
            if j < b and int(docs[j]) == d:   # (a document dropped before is not there)
                gone.setdefault(c, []).append(j - a)
    if not gone:
        return lists
    room = lists.room
    need = int(room_for(lens[list(gone)]).sum())
    if room is None or room.arr is not docs or room.tail + need > room.arr.shape[0]:
        if room is not None and room.arr is docs:   # the room's tail is full: plain CSR
            return _drop_all(lists, deleted)
        placed = _lay_out(lists, np.zeros(0, dtype=np.int64), docs[:0], docs.dtype)
        starts, lens, room = placed
        if room.tail + need > room.arr.shape[0]:
            return _drop_all(lists, deleted)
    starts, lens, arr = starts.copy(), lens.copy(), room.arr
    for c, where in gone.items():   # each list copied without them to the tail
        a, n = int(starts[c]), int(lens[c])
        kept = np.delete(arr[a:a + n], where)
        t, size = room.tail, int(room_for(np.int64(n)))
        arr[t:t + kept.shape[0]] = kept
        room.end[c], room.cap[c], room.tail = t + kept.shape[0], t + size, t + size
        starts[c], lens[c] = t, kept.shape[0]
    return Lists(starts, lens, arr, lists.doc_code_offsets, lists.doc_codes, room, lists.grown)


#: an add whose postings go to more lists than this lays the lists out anew (one pass)
_FEW_EDITS = 4096
#: the least free room left at the end of a buffer laid out anew, in postings
_MIN_TAIL = 4096
