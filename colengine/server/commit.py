"""Group commit: many write requests, one log append + fsync.

Shared by the single-index service (:mod:`colengine.server.service`) and the sharded one
(:mod:`colengine.distributed.service`). A request thread queues a :class:`Write` and waits;
the first thread to find no commit in progress leads: it takes the whole queue and hands it to
the service's ``commit_batch``, which checks the writes in order (:func:`check_writes`: a bad
one fails alone), logs the good ones with one append + fsync, and applies them. Requests that
arrive during a commit wait for the next one, so under load many writes share one fsync.

>>> seen = []
>>> commit = GroupCommit(lambda batch: seen.append([w.ids for w in batch]))
>>> commit(Write({"op": "add"}, ids=["a"]))
>>> seen
[[['a']]]
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colengine.errors import DuplicateIdError, UnknownIdError

_EMPTY = "deleting every document would leave an empty index"

__all__ = ["GroupCommit", "Write", "added", "append_batch", "check_writes", "concat_encoded",
           "runs"]


@dataclass
class Write:
    """One add or delete request waiting for its group commit."""

    record: dict[str, Any]
    encoded: Any = None              # the added documents' embeddings
    done: bool = False
    error: BaseException | None = None
    ids: list[str] = field(default_factory=list)
    auto: bool = False               # ids to be given at commit (the next automatic ones)


class GroupCommit:
    """Leader/follower queue in front of ``commit_batch(writes)``; ``commit(w)`` returns once
    ``w`` is committed, or raises its own error. ``commit_batch`` sets ``error`` on the writes
    it refuses; an exception it raises fails every write of the batch not failed already.
    Order is the queue's order."""

    def __init__(self, commit_batch: Callable[[list[Write]], None]) -> None:
        self.commit_batch = commit_batch
        self.cond = threading.Condition()
        self.queue: list[Write] = []
        self.leading = False

    def __call__(self, w: Write) -> None:
        with self.cond:
            self.queue.append(w)
            while self.leading and not w.done:
                self.cond.wait()
            if w.done:
                if w.error is not None:
                    raise w.error
                return
            self.leading = True
            batch, self.queue = self.queue, []
        try:
            self.commit_batch(batch)
        except BaseException as e:  # noqa: BLE001 - the lock, the disk: the whole batch fails
            for x in batch:
                if not x.done and x.error is None:
                    x.error = e
        finally:
            with self.cond:
                for x in batch:
                    x.done = True
                self.leading = False
                self.cond.notify_all()
        if w.error is not None:
            raise w.error


def check_writes(batch: list[Write], live: Callable[[str], bool], counts: dict[Hashable, int],
                 group: Callable[[str], Hashable] = lambda _id: None,
                 emptied: Callable[[Hashable], str] = lambda _g: _EMPTY) -> list[Write]:
    """The writes of ``batch`` that apply, in order, each on top of the ones before it; the
    others get their error: an add of a live id (:class:`DuplicateIdError`), a delete of an id
    that is not live (:class:`UnknownIdError`), or one that would leave a group empty.
    ``live(id)``: live before the batch; ``counts``: live documents per group (one group, or
    one per shard with ``group(id)`` its shard and ``emptied(shard)`` the message of the
    error), updated in place.

    >>> batch = [Write({"op": "add"}, ids=["a"]), Write({"op": "add"}, ids=["a"]),
    ...          Write({"op": "delete"}, ids=["b"]), Write({"op": "delete"}, ids=["x"])]
    >>> good = check_writes(batch, lambda i: i == "b", {None: 1})
    >>> [w is good[0] for w in batch], [type(w.error).__name__ for w in batch]
    ([True, False, False, False], ['NoneType', 'DuplicateIdError', 'NoneType', 'UnknownIdError'])
    >>> batch[2] in good
    True
    """
    changed: dict[str, bool] = {}   # id -> live after the writes accepted so far
    good: list[Write] = []

    def is_live(i: str) -> bool:
        v = changed.get(i)
        return live(i) if v is None else v

    for x in batch:
        if x.record["op"] == "add":
            dup = next((i for i in x.ids if is_live(i)), None)
            if dup is not None:
                x.error = DuplicateIdError(f"document id {dup!r} is already in the index")
                continue
            changed.update((i, True) for i in x.ids)
            for i in x.ids:
                g = group(i)
                counts[g] = counts.get(g, 0) + 1
        else:
            unknown = next((i for i in x.ids if not is_live(i)), None)
            if unknown is not None:
                x.error = UnknownIdError(f"unknown document id {unknown!r}")
                continue
            gone: dict[Hashable, int] = {}
            for i in x.ids:
                gone[group(i)] = gone.get(group(i), 0) + 1
            empty = [g for g, n in gone.items() if n >= counts.get(g, 0)]
            if empty:
                x.error = ValueError(emptied(empty[0]))
                continue
            changed.update((i, False) for i in x.ids)
            for g, n in gone.items():
                counts[g] -= n
        good.append(x)
    return good


def runs(writes: list[Write]) -> Iterator[tuple[str, list[Write]]]:
    """``writes`` cut into runs of one operation, in order: ``(op, run)``; a run of adds (or
    of deletes) is applied as one change.

    >>> [(op, len(r)) for op, r in runs([Write({"op": "add"}), Write({"op": "add"}),
    ...                                  Write({"op": "delete"}), Write({"op": "add"})])]
    [('add', 2), ('delete', 1), ('add', 1)]
    """
    i = 0
    while i < len(writes):
        op, j = writes[i].record["op"], i
        while j < len(writes) and writes[j].record["op"] == op:
            j += 1
        yield op, writes[i:j]
        i = j


def added(run: list[Write]) -> tuple[list[Any], list[str], list[Any], Any]:
    """A run of adds as one add: (documents as ``Retriever.add`` takes them, ids, metadata,
    their embeddings concatenated (None if any is missing))."""
    from colengine import wal

    docs = [d for x in run for d in x.record["documents"]]
    return (wal.added_documents({"documents": docs}), [d["id"] for d in docs],
            [d.get("metadata") for d in docs], concat_encoded([x.encoded for x in run]))


def append_batch(path: Path, writes: list[Write], offset: int, stats: dict[str, int],
                 hook: Callable[[list[bytes]], None] | None = None) -> int:
    """Log ``writes`` at ``offset`` of the log ``path`` with one append + fsync
    (:func:`colengine.wal.append_records`; ``hook(lines)`` just before); counts it in
    ``stats`` and returns the log's new end."""
    from colengine import wal

    lines = [wal.encode_record(x.record) for x in writes]
    if hook is not None:
        hook(lines)
    offset = wal.append_records(path, lines, offset)
    stats["log_appends"] += 1
    stats["records_logged"] += len(lines)
    return offset


def concat_encoded(parts: list[Any]) -> Any:
    """One :class:`~colengine.embeddings.PackedEmbeddings` of several (None if any is)."""
    if any(p is None for p in parts):
        return None
    if len(parts) == 1:
        return parts[0]
    from colengine.longdocs import EncodedPassages

    if isinstance(parts[0], EncodedPassages):   # an index of passages
        return EncodedPassages.concat(parts)
    import numpy as np

    from colengine.embeddings import PackedEmbeddings

    tokens = np.concatenate([np.asarray(p.tokens) for p in parts])
    lens = np.concatenate([np.diff(np.asarray(p.offsets)) for p in parts])
    offsets = np.zeros(lens.shape[0] + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return PackedEmbeddings(tokens, offsets)
