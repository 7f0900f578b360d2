"""Two-part token stores (:mod:`colengine.appended`): a loaded, memory-mapped PLAID index takes
documents without copying its stored arrays, and answers, saves and compacts exactly as an
index that held everything in one array."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import clustered_docs, clustered_queries, einsum_topk
from hypothesis import given, settings
from hypothesis import strategies as st

from colengine.appended import AppendedRows, AppendedTensor, take_rows
from colengine.index.plaid import PlaidIndex

ALL = dict(n_probe=10**9, centroid_score_threshold=None, n_candidates=10**9, n_exact=10**9)


def _read_only(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


@settings(max_examples=40, deadline=None)
@given(n_base=st.integers(0, 30), chunks=st.lists(st.integers(0, 700), min_size=1, max_size=4),
       width=st.sampled_from([0, 1, 3]), seed=st.integers(0, 2**16))
def test_rows_read_like_one_array(n_base, chunks, width, seed):
    """Against a plain concatenated array: shape, gathered rows (either part, any order),
    slices, masks, the whole store and its tensors; an append never changes an earlier store,
    also when the buffer grows."""
    rng = np.random.default_rng(seed)
    shape = (lambda n: (n,)) if width == 0 else (lambda n: (n, width))
    base = _read_only(rng.integers(-100, 100, shape(n_base)).astype(np.int16))
    ref = base.copy()
    stores: list[tuple[AppendedRows, np.ndarray]] = []
    a = None
    for m in chunks:
        new = rng.integers(-100, 100, shape(m)).astype(np.int16)
        a = AppendedRows.of(base, new) if a is None else a.append(new)
        ref = np.concatenate([ref, new])
        stores.append((a, ref))
    for a, ref in stores:   # earlier stores still read what they held
        n = len(ref)
        assert a.shape == ref.shape and len(a) == n and a.dtype == ref.dtype
        assert a.nbytes == ref.nbytes
        np.testing.assert_array_equal(np.asarray(a), ref)
        idx = rng.integers(0, n, 50) if n else np.zeros(0, dtype=np.int64)
        np.testing.assert_array_equal(a.take(idx), ref[idx])
        lo, hi = sorted(rng.integers(0, n + 1, 2))
        np.testing.assert_array_equal(a[lo:hi], ref[lo:hi])
        mask = rng.random(n) < 0.5
        np.testing.assert_array_equal(take_rows(a, mask), ref[mask])
        t = a.tensor()
        assert isinstance(t, AppendedTensor) and tuple(t.shape) == ref.shape
        got = t.index_select(0, torch.from_numpy(idx))
        np.testing.assert_array_equal(got.numpy(), ref[idx])


def test_rows_refuse_what_they_cannot_do():
    base = _read_only(np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="do not match"):
        AppendedRows(base, np.zeros((4, 3), dtype=np.float32), 1)
    a = AppendedRows.of(base, np.ones((2, 2), dtype=np.float32))
    with pytest.raises(TypeError, match="start:stop"):
        a[::2]
    with pytest.raises(ValueError, match="dim 0"):
        a.tensor().index_select(1, torch.tensor([0]))


@pytest.fixture(scope="module")
def corpus():
    return clustered_docs(220, 32, 24, 0, 3, 40)


def _ids(a, b, p="d"):
    return [f"{p}{i}" for i in range(a, b)]


def _same_hits(a, b, q, k=12, **knobs):
    """Indexes ``a`` and ``b`` return the same ids, and scores within 1e-5, for queries ``q``."""
    for x, y in zip(a.search(q, k=k, **knobs), b.search(q, k=k, **knobs)):
        assert [h.doc_id for h in x] == [h.doc_id for h in y]
        np.testing.assert_allclose([h.score for h in x], [h.score for h in y], atol=1e-5)


@pytest.mark.parametrize("refine", [None, "int8", "float16"])
def test_adds_to_a_loaded_index_keep_its_files_mapped(tmp_path, corpus, refine):
    """Documents added to a loaded index go to a buffer of their own: the stored arrays stay
    the memory-mapped files (nothing copied), and search (nothing pruned and the default
    knobs), save + load, delete and compaction give what the same index held in memory gives;
    the unpruned results equal an independent einsum MaxSim over the decompressed vectors."""
    base, extra = corpus[:160], corpus[160:]
    kw = dict(nbits=2, seed=0, refine=refine)
    PlaidIndex.build(base, _ids(0, 160), path=tmp_path / "i", **kw)
    mem = PlaidIndex.build(base, _ids(0, 160), **kw)
    ld = PlaidIndex.load(tmp_path / "i")
    names = ["codes", "residuals"] + (["refine"] if refine else []) + \
        (["refine_scale"] if refine == "int8" else [])
    mapped = {n: getattr(ld, n) for n in names}
    assert all(isinstance(a, np.memmap) for a in mapped.values())
    for a, b in ((0, 25), (25, 30), (30, 60)):
        ld.add(extra[a:b], _ids(a, b, "x"))
        mem.add(extra[a:b], _ids(a, b, "x"))
    for n in names:
        store = getattr(ld, n)
        assert isinstance(store, AppendedRows), n
        # the mapped file itself, not a copy
        assert store.base.ctypes.data == mapped[n].ctypes.data
        assert store.base.shape == mapped[n].shape
        np.testing.assert_array_equal(np.asarray(store), np.asarray(getattr(mem, n)))
    q = clustered_queries(corpus, 5, 8, 3)

    def same(a, b, **knobs):
        _same_hits(a, b, q, **knobs)

    same(ld, mem, **ALL)
    same(ld, mem)
    same(ld, mem, n_probe=2, n_candidates=64, n_exact=32)
    dec = ld.decompressed()
    ids = list(ld.ids)
    pos, vals = einsum_topk(q, dec, 12)
    for got, p, v in zip(ld.search(q, k=12, **ALL), pos, vals.tolist()):
        assert [h.doc_id for h in got] == [ids[i] for i in p]
        np.testing.assert_allclose([h.score for h in got], v, atol=1e-3)
    assert ld.stats()["disk_bytes"] > 0
    ld.delete(["d3", "x7", "x40"])
    mem.delete(["d3", "x7", "x40"])
    same(ld, mem, **ALL)
    ld.save(tmp_path / "i")                # compacts: both parts read, rows dropped
    again = PlaidIndex.load(tmp_path / "i")
    assert again.n_rows == mem.n_rows - 3 and len(again) == len(mem)
    same(again, mem, **ALL)
    more = clustered_docs(5, 32, 24, 9, 3, 40)
    again.add(more, _ids(0, 5, "y"))       # a store of the new generation takes rows again
    mem.add(more, _ids(0, 5, "y"))
    same(again, mem, **ALL)
    again.save(tmp_path / "i")             # no tombstones: written part after part
    same(PlaidIndex.load(tmp_path / "i"), mem, **ALL)


@pytest.mark.parametrize("refine", [None, "int8"])
def test_read_ahead_of_a_two_part_store_advises_the_mapped_rows_only(tmp_path, corpus, refine,
                                                                     monkeypatch):
    """Stage 4's read-ahead advises the survivors' rows in the mapped base (each once); the
    appended rows, in memory, are not advised."""
    import colengine.memory as memory
    from colengine.index.plaid import search as ps

    PlaidIndex.build(corpus[:160], _ids(0, 160), path=tmp_path / "i", nbits=2, seed=0,
                     refine=refine)
    ld = PlaidIndex.load(tmp_path / "i")
    ld.add(corpus[160:170], _ids(0, 10, "x"))
    stt = ld._search_state()
    calls = []
    real = memory.will_need
    monkeypatch.setattr(memory, "will_need", lambda a, rb, s, e: calls.append(
        (a, np.asarray(s).tolist(), np.asarray(e).tolist())) or real(a, rb, s, e))
    pos = torch.tensor([[5, 163, -1, 5], [2, 161, -1, -1]])   # 161, 163: appended rows
    assert ps.prefetch_stored(stt, pos) > 0
    stores = [stt.refine, stt.refine_scale] if refine else [stt.codes, stt.residuals]
    stores = [t for t in stores if t is not None]
    assert [a for a, _, _ in calls] == [t.base.data_ptr() for t in stores]
    off = ld.doc_offsets
    for _, s, e in calls:
        assert sorted(zip(s, e)) == [(int(off[r]), int(off[r + 1])) for r in (2, 5)]


def _manifest(path):
    import json

    return json.loads((path / "manifest.json").read_text())


def _inode(path):
    import os

    st = os.stat(path)
    return st.st_ino, st.st_dev


@pytest.mark.parametrize("refine", [None, "int8"])
def test_saves_after_adds_link_the_saved_files_and_write_the_added_rows(tmp_path, corpus,
                                                                         refine):
    """A save of a loaded index that only took documents links each token store's file of
    the generation it replaces (the same file: nothing written again) and writes the rows
    added since to a file of their own (manifest format 2, a ``tail`` entry); loaded again
    (checksums verified) it answers as the index held in memory, takes more documents, and
    its next save links the same base again. A save after deletes compacts and writes each
    store whole (format 1)."""
    from colengine.storage import TAIL_SUFFIX

    root = tmp_path / "i"
    kw = dict(nbits=2, seed=0, refine=refine)
    PlaidIndex.build(corpus[:160], _ids(0, 160), path=root, **kw)
    mem = PlaidIndex.build(corpus[:160], _ids(0, 160), **kw)
    names = ["codes", "residuals"] + (["refine", "refine_scale"] if refine else [])
    first = {n: _inode(root / _manifest(root)["arrays"][n]["file"]) for n in names}
    q = clustered_queries(corpus, 5, 8, 3)

    def same(a, b):
        _same_hits(a, b, q, **ALL)

    ld = PlaidIndex.load(root)
    for a, b in ((160, 180), (180, 200)):
        ld.add(corpus[a:b], _ids(a, b))
        mem.add(corpus[a:b], _ids(a, b))
        ld.save(root)
        m = _manifest(root)
        assert m["format_version"] == 2
        added = int(mem.doc_offsets[-1] - mem.doc_offsets[160])   # tokens since the build
        for n in names:
            e = m["arrays"][n]
            assert _inode(root / e["file"]) == first[n], n       # linked, not written
            assert e["tail"]["rows"] == added and e["tail"]["file"].endswith(n + TAIL_SUFFIX)
            assert e["shape"][0] == len(np.asarray(getattr(mem, n)))
        ld = PlaidIndex.load(root, verify=True)
        for n in names:
            store = getattr(ld, n)
            assert isinstance(store, AppendedRows)
            np.testing.assert_array_equal(np.asarray(store), np.asarray(getattr(mem, n)))
        same(ld, mem)
    ld.delete(["d5", "d170"])
    mem.delete(["d5", "d170"])
    ld.save(root)                          # compacted: every store written whole
    m = _manifest(root)
    assert m["format_version"] == 1
    for n in names:
        assert "tail" not in m["arrays"][n] and _inode(root / m["arrays"][n]["file"]) != first[n]
    again = PlaidIndex.load(root, verify=True)
    assert not isinstance(again.residuals, AppendedRows)
    same(again, mem)
    in_memory = PlaidIndex.load(root, mmap=False)   # arrays of its own: saved whole
    in_memory.add(corpus[200:205], _ids(200, 205))
    in_memory.save(root)
    assert _manifest(root)["format_version"] == 1


def test_a_damaged_tail_is_refused(tmp_path, corpus):
    """The appended rows' file is checked like any other: its size, its checksum (with
    verify), its place (only ``g<gen>/<name>.appended.npy``), its row count, and the format
    version that allows it."""
    import json

    from colengine.errors import IndexFormatError

    root = tmp_path / "i"
    PlaidIndex.build(corpus[:160], _ids(0, 160), path=root, nbits=2, seed=0)
    ld = PlaidIndex.load(root)
    ld.add(corpus[160:170], _ids(160, 170))
    ld.save(root)
    good = (root / "manifest.json").read_text()
    m = json.loads(good)
    tail = root / m["arrays"]["residuals"]["tail"]["file"]
    data = bytearray(tail.read_bytes())
    data[-1] ^= 0xFF
    tail.write_bytes(bytes(data))
    PlaidIndex.load(root, verify=False)            # same size: only the checksum tells
    with pytest.raises(IndexFormatError, match="checksum"):
        PlaidIndex.load(root, verify=True)
    tail.write_bytes(bytes(data[:-1]))
    with pytest.raises(IndexFormatError, match="bytes"):
        PlaidIndex.load(root, verify=False)
    data[-1] ^= 0xFF
    tail.write_bytes(bytes(data))
    PlaidIndex.load(root, verify=True)

    def forged(change):
        m = json.loads(good)
        change(m)
        (root / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(IndexFormatError):
            PlaidIndex.load(root, verify=False)

    gen = m["generation"]
    forged(lambda m: m["arrays"]["residuals"]["tail"].update(
        file=f"g{gen - 1:06d}/residuals.appended.npy"))
    forged(lambda m: m["arrays"]["residuals"]["tail"].update(file="../outside.npy"))
    forged(lambda m: m["arrays"]["residuals"]["tail"].update(rows=10**9))
    forged(lambda m: m["arrays"]["residuals"]["tail"].update(rows=3))
    forged(lambda m: m.update(format_version=1))
    forged(lambda m: m.update(format_version=3))


def test_a_save_of_unchanged_stores_links_them(tmp_path, corpus):
    """Deletes kept as tombstones (``save(compact=False)``, as the server's checkpoints save)
    change no token store: the save links every store's file instead of writing it again,
    and the index loaded back (checksums verified) answers as the one in memory."""
    root = tmp_path / "i"
    PlaidIndex.build(corpus[:160], _ids(0, 160), path=root, nbits=2, seed=0, refine="int8")
    mem = PlaidIndex.build(corpus[:160], _ids(0, 160), nbits=2, seed=0, refine="int8")
    names = ["codes", "residuals", "refine", "refine_scale"]
    first = {n: _inode(root / _manifest(root)["arrays"][n]["file"]) for n in names}
    ld = PlaidIndex.load(root)
    ld.delete(["d4", "d77"])
    mem.delete(["d4", "d77"])
    ld.save(root, compact=False)
    m = _manifest(root)
    assert m["generation"] == 2 and m["format_version"] == 1
    for n in names:
        e = m["arrays"][n]
        assert e["file"].startswith("g000002/") and "tail" not in e
        assert _inode(root / e["file"]) == first[n], n
    again = PlaidIndex.load(root, verify=True)
    q = clustered_queries(corpus, 4, 8, 5)
    _same_hits(again, mem, q, k=10, **ALL)
    assert "d4" not in set(again.ids) and len(again) == 158


def test_saves_write_whole_where_nothing_can_be_linked(tmp_path, corpus, monkeypatch):
    """Where the file system refuses hard links, and when saving to another folder, a loaded
    index with added rows is written whole (format 1, one file per store) and reads back as
    the index held in memory."""
    import os

    root = tmp_path / "i"
    PlaidIndex.build(corpus[:160], _ids(0, 160), path=root, nbits=2, seed=0, refine="int8")
    mem = PlaidIndex.build(corpus[:160], _ids(0, 160), nbits=2, seed=0, refine="int8")
    mem.add(corpus[160:175], _ids(160, 175))
    q = clustered_queries(corpus, 4, 8, 5)

    def check(path):
        m = _manifest(path)
        assert m["format_version"] == 1
        assert not any("tail" in e for e in m["arrays"].values())
        _same_hits(PlaidIndex.load(path, verify=True), mem, q, k=10, **ALL)

    ld = PlaidIndex.load(root)
    ld.add(corpus[160:175], _ids(160, 175))
    ld.save(tmp_path / "elsewhere")
    check(tmp_path / "elsewhere")

    def refuse(*a, **k):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    first = _inode(root / _manifest(root)["arrays"]["refine"]["file"])
    ld.save(root)
    check(root)
    assert _inode(root / _manifest(root)["arrays"]["refine"]["file"]) != first
