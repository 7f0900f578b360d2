"""IndexService without HTTP: group commit of concurrent writes, incremental applies.

References: a plain set of the ids each request was acknowledged for, and a fresh
``Retriever.load`` of the folder (which replays the write-ahead log from disk).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import hold_first_append

from colengine import Retriever
from colengine.appended import parts
from colengine.errors import DuplicateIdError, UnknownIdError
from colengine.server.service import IndexService
from colengine.testing import sample_corpus


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_encoder) -> Path:
    corpus = sample_corpus()
    path = tmp_path_factory.mktemp("svc") / "idx"
    Retriever.build(corpus, [d["_id"] for d in corpus], model=tiny_encoder, path=path,
                    index="plaid", metadata=[{"n": i} for i in range(len(corpus))],
                    show_progress=False)
    return path


@pytest.fixture()
def service(built, tmp_path, tiny_encoder):
    path = Path(shutil.copytree(built, tmp_path / "idx"))
    s = IndexService(path, model=tiny_encoder, device="cpu", checkpoint_docs=10**9,
                     checkpoint_seconds=10**9, trust_remote_code=True)
    s.open()
    assert s.ready, s.error
    yield s
    s.close(checkpoint=False)


def test_concurrent_adds_share_fsyncs_and_all_survive_a_fresh_load(service, tiny_encoder):
    n_threads, per_thread = 8, 3
    appends: list[int] = []
    hold_first_append(service, n_threads, appends)
    acked: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(n_threads)

    def writer(t: int) -> None:
        start.wait()
        for j in range(per_thread):
            doc_id = f"t{t}-{j}"
            try:
                service.add([{"id": doc_id, "text": f"note {t} {j} about volcanoes and ice",
                              "metadata": {"thread": t, "j": j}}])
            except BaseException as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(e)
                continue
            with lock:
                acked.append(doc_id)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert sorted(acked) == sorted(f"t{t}-{j}" for t in range(n_threads) for j in range(per_thread))
    n_requests = n_threads * per_thread
    assert sum(appends) == n_requests == service.stats["records_logged"]
    assert len(appends) == service.stats["log_appends"] < n_requests
    assert max(appends) > 1
    # every acknowledged document is in the running index, and in a fresh load from disk
    assert all(i in service.retriever.index.ids for i in acked)
    fresh = Retriever.load(service.path, model=tiny_encoder)
    assert set(acked) <= set(fresh.index.ids)
    assert len(fresh) == len(service.retriever)
    assert fresh.get(["t3-1"]) == [{"id": "t3-1", "text": "note 3 1 about volcanoes and ice",
                                   "metadata": {"thread": 3, "j": 1}}]
    # and they are searchable, with the same results as the service's in-memory index
    got = fresh.search("note 5 2 about volcanoes", k=5)
    want = service.retriever.search("note 5 2 about volcanoes", k=5)
    assert [h.doc_id for h in got] == [h.doc_id for h in want]
    assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-4)


def test_an_add_of_an_indexed_id_is_refused_before_it_is_encoded(service, monkeypatch):
    encoded: list[list[str]] = []
    monkeypatch.setattr(service._writes, "encode", encoded.append)
    indexed = sorted(service.retriever.index.ids)[0]
    with pytest.raises(DuplicateIdError, match=re.escape(repr(indexed))):
        service.add([{"id": "new-one", "text": "fresh"}, {"id": indexed, "text": "again"}])
    assert encoded == [] and "new-one" not in service.retriever.index.ids
    assert service.stats["records_logged"] == 0


def test_errors_stay_per_request_inside_one_group_commit(service, tiny_encoder):
    """Eight requests in one batch: the ones that conflict with an earlier request of the
    same batch (or with the index) fail alone, with their own error; order is kept."""
    appends: list[int] = []
    hold_first_append(service, 8, appends)
    base = sorted(service.retriever.index.ids)
    requests = [
        ("add", "a1"),          # the first: held in its append while the rest queue
        ("add", "a2"),
        ("add", "a2"),          # duplicate of the request before it -> 409
        ("delete", "a2"),       # deletes what the batch just added: fine
        ("add", "a2"),          # ... and adds it back: fine
        ("delete", "nope"),     # unknown -> 404
        ("add", "a1"),          # added by the first, not live when this one came -> 409
        ("delete", base[1]),
    ]
    results: dict[int, object] = {}
    ready = [threading.Event() for _ in requests]

    def run(i: int, op: str, doc_id: str) -> None:
        if i:
            ready[i - 1].wait()
        try:
            if op == "add":
                results[i] = service.add([{"id": doc_id, "text": f"text of {doc_id} {i}"}])
            else:
                results[i] = service.delete([doc_id])
        except BaseException as e:  # noqa: BLE001 - checked below
            results[i] = e

    threads = []
    for i, (op, doc_id) in enumerate(requests):
        th = threading.Thread(target=run, args=(i, op, doc_id))
        th.start()
        threads.append(th)
        # the next request starts once this one is queued (the queue keeps arrival order)
        for _ in range(600):
            with service._commit.cond:
                if i == 0 and service._commit.leading or i and len(service._commit.queue) >= i:
                    break
            threading.Event().wait(0.05)
        ready[i].set()
    for th in threads:
        th.join()
    assert appends == [1, 4]    # a1 alone, then the 4 good ones of the 7 queued behind it
    assert results[0] == 1 and results[1] == 1 and results[3] == 1 and results[4] == 1
    assert results[7] == 1
    assert isinstance(results[2], DuplicateIdError)
    assert isinstance(results[5], UnknownIdError)
    assert isinstance(results[6], DuplicateIdError)
    want = (set(base) - {base[1]}) | {"a1", "a2"}
    assert set(service.retriever.index.ids) == want
    fresh = Retriever.load(service.path, model=tiny_encoder)
    assert set(fresh.index.ids) == want
    assert fresh.get(["a2"])[0]["text"] == "text of a2 4"   # the add after the delete


def test_checkpoint_keeps_writing_and_remaps_with_the_writes_made_meanwhile(service,
                                                                            tiny_encoder):
    service.add([{"id": "c1", "text": "first checkpointed note about glaciers"}])
    gen = service._gen
    assert service.checkpoint(remap=False)
    # writes go on at once, on the new generation's log, with the retriever in memory
    assert service._gen > gen and service._offset == 0
    assert not list(service.path.glob(f"wal-{gen:06d}.jsonl"))
    service._since_save = []          # what checkpoint() does before it remaps ...
    service.add([{"id": "c2", "text": "a note written while the checkpoint remaps"}])
    service.delete(["c1"])
    before = service.retriever
    service._remap()                  # ... the saved generation, plus those two writes
    service._since_save = None
    assert service.retriever is not before and service.stats["remaps"] == 1
    ids = set(service.retriever.index.ids)
    assert "c2" in ids and "c1" not in ids and ids == set(before.index.ids)
    got = service.retriever.search("note written while remapping", k=3)
    want = before.search("note written while remapping", k=3)
    assert [h.doc_id for h in got] == [h.doc_id for h in want]
    assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-5)
    fresh = Retriever.load(service.path, model=tiny_encoder)   # generation + its log
    assert set(fresh.index.ids) == ids
    assert service.checkpoint()       # the whole cycle, remap included
    assert service.stats["remaps"] == 2
    # mapped (a save after adds keeps the saved file and writes the added rows beside it)
    assert not any(p.flags.writeable for p in parts(service.retriever.index.residuals))
    assert set(Retriever.load(service.path, model=tiny_encoder, replay_log=False).index.ids) == ids


def test_a_remapped_generation_keeps_the_assigner_adds_built(service, monkeypatch, tiny_encoder):
    """Past EXACT_ASSIGN_TOKENS added tokens an index keeps a centroid index for its adds;
    the generation a checkpoint maps in has the same centroids and takes it over instead of
    building it again (a 1M-document index: seconds)."""
    from colengine.index.plaid import build as plaid_build

    monkeypatch.setattr(plaid_build, "EXACT_ASSIGN_TOKENS", 1)

    def kept():
        return getattr(service.retriever.index, "inner", service.retriever.index)._add_asg[2]

    service.add([{"id": "g1", "text": "a note about glaciers and their ice"}])
    first = kept()
    assert first is not None
    before = service.retriever
    assert service.checkpoint()
    assert service.retriever is not before and service.stats["remaps"] == 1
    assert kept() is first
    service.add([{"id": "g2", "text": "a note about fjords carved by glaciers"}])
    assert kept() is first
    got = service.search(["fjords carved by glaciers"], k=len(service.retriever))[0]
    want = Retriever.load(service.path, model=tiny_encoder).search("fjords carved by glaciers",
                                                                   k=len(service.retriever))
    assert "g2" in {h.doc_id for h in got}
    assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-5)


def test_search_with_queries_encoded_before_the_lock_equals_a_plain_search(service):
    r = service.retriever
    queries = ["what powers the cell", "memory safety without garbage collection"]
    flt = {"n": {"$lt": 20}}
    for pipeline, kw in (("late", {}), ("late", {"filter": flt})):
        want = r.search_batch(queries, 5, pipeline=pipeline, **kw)
        got = service.search(queries, 5, pipeline=pipeline, **kw)
        pre = r.search_batch(queries, 5, pipeline=pipeline,
                             query_embeddings=r.encoder.encode_queries(queries), **kw)
        for g, p, w in zip(got, pre, want):
            assert [h.doc_id for h in g] == [h.doc_id for h in w] == [h.doc_id for h in p]
            assert [h.score for h in g] == pytest.approx([h.score for h in w], abs=1e-6)
    with pytest.raises(ValueError, match="query_embeddings must be"):
        r.search_batch(queries, 5, query_embeddings=r.encoder.encode_queries(queries[:1]))


def test_a_search_racing_a_checkpoint_does_not_reload_the_saved_generation(service):
    """A search's refresh() that sees the new manifest while the checkpoint is saving skips:
    the generation just saved is the one in memory, loading it again would be waste."""
    service.add([{"id": "race", "text": "a note saved by the checkpoint"}])
    r = service.retriever
    original = r.save
    racers: list[threading.Thread] = []

    def save_then_race(*args, **kwargs):
        out = original(*args, **kwargs)       # the new manifest is on disk now
        t = threading.Thread(target=service.refresh, kwargs={"block": False})
        t.start()
        t.join(timeout=5)                     # a reload would wait for the save to end
        racers.append(t)
        return out

    r.save = save_then_race
    reloads = service.stats["reloads"]
    assert service.checkpoint(remap=False)
    racers[0].join()
    assert service.stats["reloads"] == reloads
    assert service.retriever is r and service._gen == r.generation
    service.refresh()                         # nothing new: still the same retriever
    assert service.retriever is r and "race" in r.index.ids


def _second_service(service, tiny_encoder) -> IndexService:
    """Another worker on the same index folder (as ``--workers 2`` runs, in one process):
    no background thread, so the test drives its refreshes and remaps."""
    other = IndexService(service.path, model=tiny_encoder, device="cpu", checkpoint_docs=10**9,
                         checkpoint_seconds=10**9, trust_remote_code=True)
    with other._writing():
        other._reload()
    return other


def _ids(s: IndexService) -> set[str]:
    return set(s.retriever.index.ids)


@pytest.mark.parametrize("behind", [False, True])
def test_a_worker_adopts_a_checkpoint_of_the_log_it_applied_without_reloading(service,
                                                                             tiny_encoder,
                                                                             behind):
    """Worker B applied (or, ``behind``, catches up from the old log with) exactly the log
    bytes that A's checkpoint folds in: B takes the new generation at once (no reload), sees
    later writes, then maps the saved files with the writes made meanwhile; its documents and
    hits equal A's and a fresh load's throughout."""
    a, b = service, _second_service(service, tiny_encoder)
    a.add([{"id": "w1", "text": "a note about tides and the moon"}])
    if not behind:
        b.refresh()
        assert "w1" in _ids(b)
    a.add([{"id": "w2", "text": "a note about glaciers", "metadata": {"n": 7}}])
    if behind:
        a.delete(["w1"])
    old_gen = a._gen
    with a._writing():   # what a's checkpoint saves, without deleting the old log yet
        a.refresh()
        a.retriever.save(a.path, log_folded=(a._gen, a._offset))
    b.refresh()
    assert b.stats["adoptions"] == 1 and b.stats["reloads"] == 1   # the open() one only
    assert b._gen == a.retriever.generation > old_gen and b._offset == 0
    assert b.retriever.generation == b._gen and _ids(b) == _ids(a)
    fresh = Retriever.load(a.path, model=tiny_encoder)
    assert _ids(b) == set(fresh.index.ids)
    # writes on the new generation's log reach b; its remap keeps them
    a._gen, a._offset = a.retriever.generation, 0
    a.add([{"id": "w3", "text": "a note written after the checkpoint"}])
    b.refresh()
    assert "w3" in _ids(b)
    before = b.retriever
    b._remap(lock=False)
    b._since_save = None
    assert b.retriever is not before and b.stats["remaps"] == 1
    assert b.retriever.generation == b._gen   # loaded from the saved files, w3 applied on top
    assert _ids(b) == _ids(a) == set(Retriever.load(a.path, model=tiny_encoder).index.ids)
    got = b.search(["a note about glaciers"], k=3)[0]
    want = a.search(["a note about glaciers"], k=3)[0]
    assert [h.doc_id for h in got] == [h.doc_id for h in want]
    assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-5)
    assert b.get(["w2"])[0]["metadata"] == {"n": 7}


def test_a_worker_behind_a_pruned_log_or_a_plain_save_reloads(service, tiny_encoder):
    """A generation that is not a checkpoint of what the worker holds is loaded in full:
    a save without the folded-log record, and a checkpoint whose old log is gone while the
    worker had not read all of it."""
    a, b = service, _second_service(service, tiny_encoder)
    a.add([{"id": "p1", "text": "a note about deserts"}])
    b.refresh()
    with a._writing():
        a.refresh()
        a.retriever.save(a.path)           # not a checkpoint: no log_folded
    b.refresh()
    assert b.stats["adoptions"] == 0 and b.stats["reloads"] == 2 and "p1" in _ids(b)
    a._gen, a._offset = a.retriever.generation, 0
    a.add([{"id": "p2", "text": "a note about rivers"}])
    assert a.checkpoint(remap=False)     # folds p2 and deletes the old log b never read
    b.refresh()
    assert b.stats["adoptions"] == 0 and b.stats["reloads"] == 3
    assert _ids(b) == _ids(a) and "p2" in _ids(b)


def test_another_worker_applies_an_add_from_its_logged_vectors(service, tiny_encoder,
                                                               monkeypatch):
    """The add record carries the writer's vectors: worker B applies it without encoding
    (its encoding is made to fail), and holds what A holds, bit for bit in the scores."""
    a, b = service, _second_service(service, tiny_encoder)
    a.add([{"id": "v1", "text": "a long note about tides, the moon and the sea " * 20,
            "metadata": {"n": 3}}])

    def refuse(*args, **kw):
        raise AssertionError("documents encoded again")

    monkeypatch.setattr(b.retriever, "encode_documents", refuse)
    b.refresh()
    assert "v1" in _ids(b) and b.stats["records_decoded"] == 1
    for q in ("tides and the moon", "the sea"):
        got, want = b.search([q], k=4)[0], a.search([q], k=4)[0]
        assert [h.doc_id for h in got] == [h.doc_id for h in want]
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-6)
    assert b.get(["v1"])[0]["metadata"] == {"n": 3}


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="a thread's own priority (nice) can only be set on Linux")
@pytest.mark.parametrize("write_nice", [None, 0])
def test_writes_are_encoded_and_checkpoints_saved_at_a_lower_priority_than_searches(
        built, tmp_path, tiny_encoder, write_nice):
    """With a thread for the write encoder (the model given as an object), the documents of
    an add are encoded in another thread at nice ``write_nice`` (default BACKGROUND_NICE), and the checkpoint thread saves at that nice too, while the
    threads that search and call add keep theirs: under load the scheduler gives the searches
    the cores first. ``write_nice=0`` leaves every thread at the process's priority; a value
    outside 0-19 is refused before anything starts."""
    from colengine.server.service import BACKGROUND_NICE

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    for bad in (-1, 20, 2.5, True, "10"):
        with pytest.raises(ValueError, match="write_nice"):
            IndexService(built, model=tiny_encoder, device="cpu", write_nice=bad)
    path = Path(shutil.copytree(built, tmp_path / "idx"))
    options = {} if write_nice is None else {"write_nice": write_nice}
    s = IndexService(path, model=tiny_encoder, device="cpu", checkpoint_docs=1,
                     checkpoint_seconds=10**9, trust_remote_code=True, **options)
    seen: dict[str, list] = {"encode": [], "checkpoint": []}
    encode, checkpoint = s._encode_texts, s.checkpoint

    def encode_seen(texts):
        seen["encode"].append((threading.get_native_id(), nice()))
        return encode(texts)

    def checkpoint_seen(*args, **kwargs):
        seen["checkpoint"].append(nice())
        return checkpoint(*args, **kwargs)

    s._encode_texts, s.checkpoint = encode_seen, checkpoint_seen
    s.open()
    assert s._writes.kind == "thread"   # the model is an object: no child can load it
    try:
        mine = nice()
        low = max(mine, BACKGROUND_NICE if write_nice is None else write_nice)
        s.add([{"id": "p1", "text": "a note encoded in the background"}])
        s.add([{"id": "p2", "text": "another note encoded in the background"}])
        deadline = time.monotonic() + 20
        while not seen["checkpoint"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [n for _, n in seen["encode"]] == [low, low]
        assert threading.get_native_id() not in {t for t, _ in seen["encode"]}
        assert seen["checkpoint"] and set(seen["checkpoint"]) == {low}
        assert nice() == mine                       # the caller's thread kept its priority
        assert [d["id"] for d in s.get(["p1", "p2"])] == ["p1", "p2"]
        assert len(s.search(["a note encoded in the background"], k=3)[0]) == 3
    finally:
        s.close(checkpoint=False)


def test_search_slots_admit_at_most_n_and_in_arrival_order():
    from colengine.server.service import SearchSlots

    slots = SearchSlots(2)
    inside, most, order = [0], [0], []
    lock = threading.Lock()
    release = {i: threading.Event() for i in range(5)}

    def user(i: int) -> None:
        with slots:
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                order.append(i)
            assert release[i].wait(10)
            with lock:
                inside[0] -= 1

    threads = []
    for i in range(5):            # 0 and 1 get the slots; 2, 3, 4 queue in this order
        t = threading.Thread(target=user, args=(i,))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 10
        while len(order) + len(slots._waiters) < i + 1:
            assert time.monotonic() < deadline
            time.sleep(0.002)
    assert sorted(order) == [0, 1] and len(slots._waiters) == 3
    for i in (1, 0, 2, 3, 4):     # each release lets the oldest waiter in
        release[i].set()
        time.sleep(0.05)
    for t in threads:
        t.join(10)
    assert order[2:] == [2, 3, 4] and most[0] == 2 and inside[0] == 0
    assert slots.running == 0 and slots._free == 2


def test_search_slots_without_a_limit():
    from colengine.server.service import SearchSlots

    slots = SearchSlots(0)
    together = threading.Barrier(4, timeout=10)   # would break if fewer than 4 got in

    def user() -> None:
        with slots:
            together.wait()

    threads = [threading.Thread(target=user) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not together.broken


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2", None])
def test_search_slots_are_checked(bad):
    from colengine.server.service import SearchSlots

    with pytest.raises(ValueError, match="search_slots must be an int >= 0"):
        SearchSlots(bad)


def test_the_service_runs_searches_in_its_slots(built, tmp_path, tiny_encoder, monkeypatch):
    """With one slot, four concurrent searches run one at a time and each gets the results of
    the retriever's own search; by default the slots are the process's cores."""
    from colengine.server.service import default_search_slots

    path = Path(shutil.copytree(built, tmp_path / "idx"))
    assert IndexService(path, model=tiny_encoder, device="cpu").slots.n == default_search_slots()
    s = IndexService(path, model=tiny_encoder, device="cpu", search_slots=1)
    s.open()
    try:
        r = s.retriever
        queries = ["what powers the cell", "tides", "volcanoes and ice", "protein folding"]
        want = {q: r.search_batch([q], 5) for q in queries}
        inside, most = [0], [0]
        lock = threading.Lock()
        plain = r.search_batch

        def counted(*a, **k):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.05)
            try:
                return plain(*a, **k)
            finally:
                with lock:
                    inside[0] -= 1

        monkeypatch.setattr(r, "search_batch", counted)
        got: dict[str, object] = {}
        threads = [threading.Thread(target=lambda q=q: got.__setitem__(q, s.search([q], 5)))
                   for q in queries]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert most[0] == 1
        for q in queries:
            assert [[h.doc_id for h in row] for row in got[q]] == \
                [[h.doc_id for h in row] for row in want[q]]
    finally:
        s.close(checkpoint=False)
