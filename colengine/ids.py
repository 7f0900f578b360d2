"""External string ids <-> internal int positions, stored without pickles."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from colengine.errors import DuplicateIdError, UnknownIdError

__all__ = ["AutoIdCounter", "IdMap", "RowIds", "default_ids", "auto_ids", "as_id_list", "pack_strings", "unpack_strings",
           "check_offsets"]


def check_offsets(offsets: np.ndarray, total: int, what: str) -> np.ndarray:
    """``offsets`` as int64 after checking the CSR rules a loaded index relies on: 1-D,
    ``o[0] == 0``, never decreasing, ``o[-1] == total``. One O(N) pass; a tampered array
    fails here with a ValueError naming ``what`` instead of giving wrong results later.

    >>> check_offsets(np.array([0, 2, 2, 5]), 5, "doc offsets").tolist()
    [0, 2, 2, 5]
    """
    o = np.asarray(offsets)
    if o.ndim != 1 or o.shape[0] < 1 or o.dtype.kind not in "iu":
        raise ValueError(f"{what} must be a 1-D integer array with at least one entry")
    if int(o[0]) != 0 or int(o[-1]) != int(total):
        raise ValueError(f"{what} must start at 0 and end at {total}, got {int(o[0])} .. {int(o[-1])}")
    if o.shape[0] > 1 and bool((np.diff(o) < 0).any()):
        raise ValueError(f"{what} decrease at position {int(np.flatnonzero(np.diff(o) < 0)[0]) + 1}")
    return o.astype(np.int64, copy=False)


def default_ids(start: int, n: int) -> list[str]:
    """``["start", ..., "start+n-1"]``: the ids given to documents added without ids."""
    return [str(i) for i in range(start, start + n)]


def auto_ids(counter: int, n: int, taken) -> tuple[list[str], int]:
    """``n`` automatic ids from the persistent ``counter`` on, skipping ids in ``taken`` (given
    explicitly); returns them and the counter's next value. The counter only grows, so an
    automatic id is never handed out twice, even after its document was deleted.

    >>> auto_ids(3, 2, {"4"})
    (['3', '5'], 6)
    """
    out: list[str] = []
    c = int(counter)
    while len(out) < n:
        s = str(c)
        c += 1
        if s not in taken:
            out.append(s)
    return out, c


class AutoIdCounter:
    """An index's persistent counter of automatic ids, as a class attribute (a descriptor):
    kept in the instance's ``meta["next_auto_id"]`` so that it is saved with the index, and
    only ever raised (setting a lower value keeps the current one). Before anything set it,
    it reads ``start(index)`` (the rows the index holds).

    >>> class Ix:
    ...     next_auto_id = AutoIdCounter(lambda ix: len(ix.ids))
    ...     def __init__(self): self.meta, self.ids = {}, ["a", "b"]
    >>> ix = Ix(); ix.next_auto_id
    2
    >>> ix.next_auto_id = 7; ix.next_auto_id = 5; ix.next_auto_id, ix.meta
    (7, {'next_auto_id': 7})
    """

    def __init__(self, start) -> None:
        self._start = start

    def __get__(self, index, owner=None):
        if index is None:
            return self
        return int(index.meta.get("next_auto_id", self._start(index)))

    def __set__(self, index, value: int) -> None:
        index.meta["next_auto_id"] = max(int(value), self.__get__(index))


def as_id_list(ids: object, what: str = "ids") -> list:
    """``ids`` as a list; a bare string (which would iterate as characters) is an error.

    >>> as_id_list(("a", "b"))
    ['a', 'b']
    """
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"{what} must be a list of ids, not a single string ({ids!r}): "
                        f"pass [{ids!r}]")
    return list(ids)  # type: ignore[call-overload]


def pack_strings(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as utf-8 bytes ``uint8 [total]`` plus int64 offsets ``[n + 1]`` (no pickles).

    >>> data, off = pack_strings(["ab", "ç"]); off.tolist()
    [0, 2, 4]
    """
    enc = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(enc) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in enc], out=offsets[1:])
    return np.frombuffer(b"".join(enc), dtype=np.uint8).copy(), offsets


def unpack_strings(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    """Inverse of :func:`pack_strings` (offsets checked; invalid UTF-8 is a ValueError)."""
    raw = bytes(np.asarray(data))
    off = check_offsets(offsets, len(raw), "string offsets").tolist()
    return [raw[a:b].decode("utf-8") for a, b in zip(off[:-1], off[1:])]


class IdMap:
    """An ordered list of unique string ids with O(1) lookup of their positions.

    >>> m = IdMap(["a", "b"])
    >>> m.positions(["b", "a"]).tolist()
    [1, 0]
    >>> m.extend(["c"]); len(m)
    3
    """

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._ids: list[str] = []
        self._pos: dict[str, int] = {}
        self.extend(ids)

    @staticmethod
    def check_new(ids: Sequence[object], existing: "IdMap | None" = None) -> list[str]:
        """Validate a batch of new ids: strings that encode to UTF-8 (so they can be saved),
        non-empty, unique, not already present."""
        out: list[str] = []
        seen: set[str] = set()
        for i in as_id_list(ids, "document ids"):
            if not isinstance(i, str):
                raise TypeError(f"document ids must be str, got {type(i).__name__} ({i!r})")
            if not i:
                raise ValueError("document ids must be non-empty strings")
            try:
                i.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"document id {i!r} cannot be encoded as UTF-8 (a lone "
                                 "surrogate?) and so could never be saved") from None
            if i in seen:
                raise DuplicateIdError(f"duplicate document id {i!r}")
            if existing is not None and i in existing:
                raise DuplicateIdError(f"document id {i!r} is already in the index")
            seen.add(i)
            out.append(i)
        return out

    @classmethod
    def of_checked(cls, ids: list[str]) -> "IdMap":
        """A map of ``ids`` taken from another map (so already checked: strings, unique),
        without checking them again: a million ids in a tenth of the time."""
        m = cls()
        m._ids = ids
        m._pos = {s: j for j, s in enumerate(ids)}
        return m

    def extend(self, ids: Iterable[str]) -> None:
        new = self.check_new(list(ids), self)
        base = len(self._ids)
        self._ids.extend(new)
        self._pos.update((s, base + j) for j, s in enumerate(new))

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._pos

    def __getitem__(self, pos: int) -> str:
        return self._ids[pos]

    def __iter__(self):
        return iter(self._ids)

    @property
    def ids(self) -> list[str]:
        return self._ids

    def positions(self, ids: Sequence[str]) -> np.ndarray:
        """int64 positions of ``ids``; :class:`UnknownIdError` names the first unknown id."""
        ids = as_id_list(ids)
        try:
            return np.fromiter((self._pos[i] for i in ids), dtype=np.int64, count=len(ids))
        except KeyError as e:
            raise UnknownIdError(f"unknown document id {e.args[0]!r}") from None

    def keep(self, mask: np.ndarray) -> "IdMap":
        """A new map with the ids where ``mask`` is true, in order."""
        ids = self._ids
        return IdMap.of_checked([ids[j] for j in np.flatnonzero(mask).tolist()])

    # -- persistence: utf-8 bytes + offsets, no pickles --------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        data, offsets = pack_strings(self._ids)
        return {"ids_utf8": data, "ids_offsets": offsets}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "IdMap":
        return cls(unpack_strings(arrays["ids_utf8"], arrays["ids_offsets"]))


class RowIds:
    """Row position -> external id for every stored row (tombstoned rows included), and each
    live id's row. A tombstoned row keeps its id, which may be live again in a later row (a
    deleted id that was added back). ``in``, :meth:`rows` and ``n_live`` see only live ids.

    >>> r = RowIds(["a", "b"]); r.tombstone(r.rows(["a"])); r.extend(["a"])
    >>> r.positions(["a", "b"]).tolist(), r[0], len(r), r.n_live, "a" in r
    ([2, 1], 'a', 3, 2, True)
    """

    def __init__(self, ids: Iterable[str] = (), deleted: np.ndarray | None = None) -> None:
        self._ids: list[str] = list(ids)
        n = len(self._ids)
        self.deleted = np.zeros(n, dtype=bool) if deleted is None else np.array(deleted, dtype=bool)
        if self.deleted.shape != (n,):
            raise ValueError(f"tombstone mask of shape {self.deleted.shape} for {n} rows")
        self._pos: dict[str, int] = {}
        for j, (s, dead) in enumerate(zip(self._ids, self.deleted.tolist())):
            if dead:
                continue
            if s in self._pos:
                raise DuplicateIdError(f"document id {s!r} is live in two rows")
            self._pos[s] = j
        self._live: IdMap | None = None

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, row: int) -> str:
        return self._ids[row]

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._pos

    @property
    def n_live(self) -> int:
        return len(self._pos)

    @property
    def n_deleted(self) -> int:
        return len(self._ids) - len(self._pos)

    def positions(self, ids: Sequence[str]) -> np.ndarray:
        """int64 rows of live ``ids`` (:meth:`IdMap.positions`' contract: a bare string is
        refused, :class:`UnknownIdError` names the first unknown id)."""
        ids = as_id_list(ids)
        try:
            return np.fromiter((self._pos[i] for i in ids), dtype=np.int64, count=len(ids))
        except KeyError as e:
            raise UnknownIdError(f"unknown document id {e.args[0]!r}") from None

    rows = positions   # the index's word for them: stored rows

    def extend(self, ids: Sequence[str]) -> None:
        new = IdMap.check_new(list(ids), self)
        base = len(self._ids)
        self._ids.extend(new)
        self._pos.update((s, base + j) for j, s in enumerate(new))
        self.deleted = np.concatenate([self.deleted, np.zeros(len(new), dtype=bool)])
        self._live = None

    def tombstone(self, rows: np.ndarray) -> None:
        for r in np.asarray(rows).tolist():
            del self._pos[self._ids[r]]
        self.deleted[rows] = True
        self._live = None

    def live(self) -> IdMap:
        """The live ids in row order (position i = the i-th live row); cached."""
        if self._live is None:
            ids = self._ids
            self._live = IdMap.of_checked([ids[j] for j in self.live_rows().tolist()])
        return self._live

    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.deleted).astype(np.int64)

    def compacted(self) -> "RowIds":
        return RowIds(self.live().ids)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {**IdMap.to_arrays(self), "deleted": self.deleted}  # type: ignore[arg-type]

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "RowIds":
        data = bytes(np.asarray(arrays["ids_utf8"]))
        off = np.asarray(arrays["ids_offsets"]).tolist()
        deleted = np.asarray(arrays["deleted"]) if "deleted" in arrays else None
        return cls([data[a:b].decode("utf-8") for a, b in zip(off[:-1], off[1:])], deleted)
