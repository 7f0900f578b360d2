"""``colengine.server.commit``: a batch of writes checked in order (against a plain set model
that applies the writes one at a time), and the leader/follower queue under threads."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from colengine.errors import DuplicateIdError, UnknownIdError
from colengine.server.commit import GroupCommit, Write, check_writes

IDS = [f"d{i}" for i in range(8)]
writes = st.lists(st.tuples(st.sampled_from(["add", "delete"]),
                            st.lists(st.sampled_from(IDS), min_size=1, max_size=3, unique=True)),
                  max_size=12)


def _group(i: str) -> int:
    return int(i[1:]) % 3          # three "shards"


@given(start=st.sets(st.sampled_from(IDS)), batch=writes)
@settings(max_examples=200, deadline=None)
def test_a_batch_is_checked_as_if_applied_one_write_at_a_time(start, batch):
    live = set(start)              # the model: a set, each write applied or refused in turn
    want = []
    for op, ids in batch:
        if op == "add":
            ok = not (live & set(ids))
            err = None if ok else DuplicateIdError
        else:
            left = {g: sum(1 for i in live if _group(i) == g) for g in range(3)}
            gone = {g: sum(1 for i in ids if _group(i) == g) for g in range(3)}
            if not set(ids) <= live:
                ok, err = False, UnknownIdError
            else:
                ok = all(gone[g] < left[g] for g in range(3) if gone[g])
                err = None if ok else ValueError
        if ok:
            live = live | set(ids) if op == "add" else live - set(ids)
        want.append(err)
    ws = [Write({"op": op}, ids=list(ids)) for op, ids in batch]
    counts = {g: sum(1 for i in start if _group(i) == g) for g in range(3)}
    good = check_writes(ws, start.__contains__, counts, group=_group,
                        emptied=lambda g: f"shard {g} would be empty")
    assert [type(w.error) if w.error else None for w in ws] == want
    assert good == [w for w in ws if w.error is None]
    assert counts == {g: sum(1 for i in live if _group(i) == g) for g in range(3)}


def test_waiting_writes_are_committed_together_in_queue_order():
    """The first write's commit is held until nine more are queued: they are committed as one
    second batch, in the order they were queued; a write the batch refuses fails alone."""
    batches: list[list[str]] = []
    release = threading.Event()

    def commit_batch(batch: list[Write]) -> None:
        batches.append([w.ids[0] for w in batch])
        if len(batches) == 1:
            release.wait(30)
        for w in batch:
            if w.ids[0] == "bad":
                w.error = ValueError("refused")

    commit = GroupCommit(commit_batch)
    errors: dict[str, BaseException] = {}

    def send(name: str) -> None:
        try:
            commit(Write({"op": "add"}, ids=[name]))
        except ValueError as e:
            errors[name] = e

    first = threading.Thread(target=send, args=("w0",))
    first.start()
    while not batches:
        first.join(0.01)
    names = ["w1", "w2", "bad", "w4", "w5", "w6", "w7", "w8", "w9"]
    rest = []
    for n, name in enumerate(names, 1):
        rest.append(threading.Thread(target=send, args=(name,)))
        rest[-1].start()
        while len(commit.queue) < n:
            rest[-1].join(0.01)
    release.set()
    for th in [first, *rest]:
        th.join(30)
    assert batches == [["w0"], names]
    assert list(errors) == ["bad"] and not commit.leading and not commit.queue
