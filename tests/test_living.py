"""Living PLAID indexes: add / delete (tombstones) without rebuilds, compaction, drift and
retrain, and the streaming build. Fast (CPU, small corpora)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from colengine.embeddings import PackedEmbeddings
from colengine.errors import DuplicateIdError, UnknownIdError
from colengine.index.exhaustive import ExhaustiveIndex
from colengine.index.plaid import PlaidIndex
from colengine.index.plaid.ivf import build_lists
from conftest import assert_hits_close, clustered_docs, clustered_queries, einsum_topk

# every centroid probed, no pruning, every candidate scored exactly
ALL = dict(n_probe=10**9, centroid_score_threshold=None, n_candidates=10**9, n_exact=10**9)


def _clustered(n_docs=240, dim=32, n_clusters=30, seed=0, lo=3, hi=50):
    return clustered_docs(n_docs, dim, n_clusters, seed, lo, hi)


def _queries(docs, n=6, lq=10, seed=1):
    return clustered_queries(docs, n, lq, seed)


@pytest.fixture(scope="module")
def corpus():
    return _clustered()


def _ids(a, b):
    return [f"d{i}" for i in range(a, b)]


def _fresh(corpus, n=160):
    return PlaidIndex.build(corpus[:n], _ids(0, n), nbits=2, seed=0)


def _einsum_topk_ids(q, packed, ids, k):
    pos, vals = einsum_topk(q, packed, k)
    return [([ids[i] for i in r], v) for r, v in zip(pos, vals.tolist())]


def _assert_matches_exhaustive(idx, q, k=15):
    """PLAID with nothing pruned == exact MaxSim over the same decompressed live vectors: the
    float32 reference gives the same ids and scores; ``ExhaustiveIndex`` (which stores float16)
    the same scores to float16 rounding and the same ids but for near-ties."""
    dec = idx.decompressed()
    ids = list(idx.ids)
    got = idx.search(q, k=k, **ALL)
    for g, (rid, rs) in zip(got, _einsum_topk_ids(q, dec, ids, k)):
        assert [h.doc_id for h in g] == rid
        np.testing.assert_allclose([h.score for h in g], rs, atol=1e-3)
    ex = ExhaustiveIndex.build(dec, ids)
    for g, r in zip(got, ex.search(q, k=k)):
        np.testing.assert_allclose([h.score for h in g], [h.score for h in r], atol=1e-2)
        for a, b in zip(g, r):
            assert a.doc_id == b.doc_id or abs(a.score - b.score) < 1e-2
    return got


def _all_scores(idx, q):
    """{doc id: score} of every live document for each query (nothing pruned)."""
    return [{h.doc_id: h.score for h in row} for row in idx.search(q, k=len(idx), **ALL)]


def _snapshot(idx):
    return (idx.n_rows, len(idx), list(idx.ids), np.array(idx.codes), np.array(idx.residuals),
            np.array(idx.doc_offsets), np.array(idx.deleted), dict(idx.meta["drift"]))


def _assert_same_snapshot(a, b):
    assert a[:3] == b[:3]
    for x, y in zip(a[3:7], b[3:7]):
        np.testing.assert_array_equal(x, y)
    assert a[7] == b[7]


# -- add / delete semantics ------------------------------------------------------------------
def test_add_delete_match_exhaustive_and_never_return_tombstones(corpus):
    idx = _fresh(corpus)
    idx.auto_compact_share = 1.0    # this test is about tombstones: keep them
    q = _queries(corpus)
    _assert_matches_exhaustive(idx, q)
    idx.add(corpus[160:], _ids(160, len(corpus)))
    assert len(idx) == len(corpus) and idx.n_rows == len(corpus)
    _assert_matches_exhaustive(idx, q)
    gone = _ids(0, len(corpus))[::3]
    idx.delete(gone)
    assert len(idx) == len(corpus) - len(gone) and idx.n_rows == len(corpus)   # tombstoned
    assert idx.stats()["deleted_documents"] == len(gone)
    got = _assert_matches_exhaustive(idx, q, k=len(idx))       # every live document ranked
    for row in got:
        assert not {h.doc_id for h in row} & set(gone)
        assert len(row) == len(idx)
    # a deleted document's own tokens as the query: it is not found, by any knob setting
    own = torch.from_numpy(corpus[0][:8])
    for kn in ({}, ALL, {"n_probe": 1, "centroid_score_threshold": 0.9}):
        assert "d0" not in {h.doc_id for h in idx.search(own, k=20, **kn)[0]}
    with pytest.raises(UnknownIdError):
        idx.embeddings_of(["d0"])


def test_delete_compacts_by_itself_past_the_tombstone_share(corpus):
    idx = _fresh(corpus)                      # 160 rows, auto_compact_share 0.25
    q = _queries(corpus)
    ref = idx.search(q, k=10, **ALL)
    idx.delete(_ids(0, 40))                   # 40 tombstones: exactly 25%, kept
    assert idx.n_rows == 160 and idx.stats()["deleted_documents"] == 40
    idx.delete(["d40"])                       # one more: compacted
    assert idx.n_rows == len(idx) == 119 and idx.stats()["deleted_documents"] == 0
    gone = set(_ids(0, 41))
    got = idx.search(q, k=10, **ALL)
    # untouched documents keep their scores; the deleted ones are gone
    for r_ref, r in zip(ref, got):
        assert not {h.doc_id for h in r} & gone
        want = {h.doc_id: h.score for h in r_ref if h.doc_id not in gone}
        for h in r:
            if h.doc_id in want:
                assert h.score == pytest.approx(want[h.doc_id], abs=1e-5)
    _assert_matches_exhaustive(idx, q)


def test_deleted_ids_can_be_added_back_with_new_content(corpus):
    idx = _fresh(corpus)
    idx.delete(["d3", "d7"])
    # d3 comes back with d200's vectors, d7 with its own
    idx.add([corpus[200], corpus[7]], ["d3", "d7"])
    assert len(idx) == 160 and idx.n_rows == 162
    emb = idx.embeddings_of(["d3"])[0]
    assert emb.shape == corpus[200].shape
    hits = idx.search(torch.from_numpy(corpus[200][:6]), k=1, **ALL)[0]
    assert hits[0].doc_id == "d3"
    _assert_matches_exhaustive(idx, _queries(corpus))
    with pytest.raises(DuplicateIdError):      # live again: a second add is a duplicate
        idx.add([corpus[1]], ["d3"])


def test_untouched_documents_keep_ids_and_scores_through_cycles(corpus):
    idx = _fresh(corpus, n=200)
    q = _queries(corpus, n=4)
    before = _all_scores(idx, q)
    rng = np.random.default_rng(5)
    touched: set[str] = set()
    for cycle in range(6):
        live = list(idx.ids)
        out = [live[i] for i in rng.choice(len(live), 20, replace=False)]
        touched.update(out)
        idx.delete(out)
        if cycle % 2:       # same vectors back under the same ids
            idx.add([corpus[int(s[1:])] for s in out], out)
        if cycle == 3:
            idx.compact()
    after = _all_scores(idx, q)
    untouched = set(_ids(0, 200)) - touched
    assert untouched
    for b, a in zip(before, after):
        for doc in untouched:
            assert a[doc] == pytest.approx(b[doc], abs=1e-6)
    # documents deleted and added back with the same vectors score the same too
    for b, a in zip(before, after):
        for doc in set(a) & touched:
            assert a[doc] == pytest.approx(b[doc], abs=1e-5)


def _same_lists(a, b) -> None:
    """Both hold the same postings (however their buffers lay the lists out)."""
    for x, y, name in zip((*a.ivf_csr(), a.doc_code_offsets, a.doc_codes),
                          (*b.ivf_csr(), b.doc_code_offsets, b.doc_codes),
                          ("ivf offsets", "ivf docs", "doc_code_offsets", "doc_codes")):
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_incremental_lists_equal_lists_rebuilt_from_codes(corpus):
    idx = _fresh(corpus)
    idx._get_lists()
    idx.add(corpus[160:200], _ids(160, 200))
    idx.delete(["d1", "d170", "d50"])
    idx.add(corpus[200:], _ids(200, len(corpus)))
    idx.delete(["d201"])
    inc = idx._lists
    ref = build_lists(np.asarray(idx.codes), idx.doc_offsets, idx.n_centroids,
                      deleted=np.asarray(idx.deleted))
    _same_lists(inc, ref)


def test_lists_built_a_few_documents_at_a_time_equal_one_block(corpus, monkeypatch):
    """The (document, centroid) pairs are deduplicated a block of documents at a time: with
    blocks of a few tokens (a document longer than a block is a block of its own) the lists,
    built anew and extended by an add, equal those made from one block."""
    import colengine.csr as csr
    import colengine.index.plaid.ivf as ivf

    idx = _fresh(corpus)
    codes, off = np.asarray(idx.codes), idx.doc_offsets
    one = build_lists(codes, off, idx.n_centroids)
    monkeypatch.setattr(csr, "BLOCK_ITEMS", 5)
    small = build_lists(codes, off, idx.n_centroids)
    cut = 37   # lists of the first 37 documents, extended by the rest
    ext = ivf.extend_lists(build_lists(codes[:off[cut]], off[:cut + 1], idx.n_centroids),
                           codes[off[cut]:], off[cut:] - off[cut], idx.n_centroids)
    _same_lists(small, one)
    _same_lists(ext, one)


def test_small_adds_carry_the_search_state_and_equal_a_fresh_index(corpus):
    """Single-document adds between searches (a server's stream of writes): the search state
    is carried over, not rebuilt, and every search equals one on an index made afresh from
    the same arrays; arrays a reader took before an add never change under it."""
    idx = _fresh(corpus)
    q = _queries(corpus, n=3)
    idx.search(q, k=5)                               # lists and search state built
    held = (np.asarray(idx.codes), np.asarray(idx.residuals), idx.doc_offsets)
    held_copy = [a.copy() for a in held]
    for i in range(160, 175):
        idx.add([corpus[i]], [f"d{i}"])
        assert idx._state is not None and idx._lists is not None   # carried, not dropped
        if i % 5 == 0:
            idx.delete([f"d{i - 100}"])
        ref = PlaidIndex.from_bundle(idx.to_bundle(), device="cpu")   # lists and state anew
        for kn in ({}, ALL):
            got, want = idx.search(q, k=10, **kn), ref.search(q, k=10, **kn)
            for g, w in zip(got, want):
                assert [h.doc_id for h in g] == [h.doc_id for h in w]
                assert [h.score for h in g] == pytest.approx([h.score for h in w], abs=1e-6)
    for a, b in zip(held, held_copy):
        np.testing.assert_array_equal(a, b)
    _assert_matches_exhaustive(idx, q)
    ref_lists = build_lists(np.asarray(idx.codes), idx.doc_offsets, idx.n_centroids,
                            deleted=np.asarray(idx.deleted))
    _same_lists(idx._lists, ref_lists)


def test_prepare_add_is_invisible_until_commit_and_refused_when_stale(corpus):
    idx = _fresh(corpus)
    q = torch.from_numpy(corpus[180][:8])
    before = idx.search(q, k=5, **ALL)
    p = idx.prepare_add([corpus[180]], ["new"])
    assert "new" not in idx.ids and len(idx) == 160
    assert [h.doc_id for h in idx.search(q, k=5, **ALL)[0]] == [h.doc_id for h in before[0]]
    assert idx.commit_add(p) == ["new"]
    assert idx.search(q, k=1, **ALL)[0][0].doc_id == "new"
    stale = idx.prepare_add([corpus[181]], ["late"])
    idx.delete(["d0"])                               # the index changed in between
    with pytest.raises(RuntimeError, match="changed between prepare_add and commit_add"):
        idx.commit_add(stale)
    assert "late" not in idx.ids


# -- errors: nothing changes ---------------------------------------------------------------
def test_bad_ids_raise_and_change_nothing(corpus):
    idx = _fresh(corpus)
    idx.delete(["d5"])
    snap = _snapshot(idx)
    with pytest.raises(DuplicateIdError):
        idx.add([corpus[200], corpus[201]], ["n1", "n1"])        # twice in the batch
    with pytest.raises(DuplicateIdError):
        idx.add([corpus[200], corpus[201]], ["n1", "d6"])        # already live
    with pytest.raises(UnknownIdError):
        idx.delete(["d6", "nope"])
    with pytest.raises(UnknownIdError):
        idx.delete(["d6", "d5"])                                 # already deleted
    with pytest.raises(DuplicateIdError):
        idx.delete(["d6", "d6"])
    with pytest.raises(ValueError):
        idx.add([corpus[200]], ["a", "b"])
    with pytest.raises(ValueError):
        idx.delete(list(idx.ids))                                 # would leave nothing
    _assert_same_snapshot(snap, _snapshot(idx))
    assert isinstance(UnknownIdError("x"), KeyError) and issubclass(DuplicateIdError, ValueError)


# -- persistence -------------------------------------------------------------------------
def test_tombstones_survive_save_and_load(corpus, tmp_path):
    idx = _fresh(corpus)
    idx.add(corpus[160:], _ids(160, len(corpus)))
    idx.delete(_ids(0, 40))
    idx.add([corpus[0]], ["d0"])
    q = _queries(corpus)
    want = idx.search(q, k=10, **ALL)
    want_default = idx.search(q, k=10)
    idx.save(tmp_path / "tomb", compact=False)
    back = PlaidIndex.load(tmp_path / "tomb")
    assert back.n_rows == idx.n_rows and len(back) == len(idx)
    np.testing.assert_array_equal(back.deleted, idx.deleted)
    assert list(back.ids) == list(idx.ids)
    assert back.search(q, k=10, **ALL) == want
    assert back.search(q, k=10) == want_default
    with pytest.raises(UnknownIdError):
        back.delete(["d1"])
    # the bundle a Retriever embeds round-trips the tombstones too
    rb = PlaidIndex.from_bundle(idx.to_bundle())
    assert rb.search(q, k=10, **ALL) == want
    # save() compacts by default; live ids, order and results are unchanged
    idx.save(tmp_path / "compact")
    assert idx.n_rows == len(idx) and not idx.deleted.any()
    comp = PlaidIndex.load(tmp_path / "compact")
    assert comp.stats()["deleted_documents"] == 0 and comp.n_rows == len(idx)
    assert list(comp.ids) == list(back.ids)
    got = comp.search(q, k=10, **ALL)
    for g, w in zip(got, want):
        assert [h.doc_id for h in g] == [h.doc_id for h in w]
        np.testing.assert_allclose([h.score for h in g], [h.score for h in w], atol=1e-6)


def test_compact_keeps_live_documents(corpus):
    idx = _fresh(corpus)
    idx.delete(_ids(10, 30))
    q = _queries(corpus)
    before = _all_scores(idx, q)
    assert idx.compact() == 20 and idx.compact() == 0
    assert _all_scores(idx, q) == before
    _assert_matches_exhaustive(idx, q)


# -- drift / retrain -----------------------------------------------------------------------
def test_drift_stats_warning_and_retrain(corpus):
    idx = _fresh(corpus, n=100)
    d0 = idx.stats()["drift"]
    assert d0["added_token_share"] == 0 and d0["tokens_added_since_training"] == 0
    assert d0["mean_residual_norm_trained"] > 0 and not d0["high"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idx.add(corpus[100:140], _ids(100, 140))       # ~ 30% of the tokens: no warning
    d1 = idx.drift()
    n_added = sum(c.shape[0] for c in corpus[100:140])
    assert d1["tokens_added_since_training"] == n_added
    assert 0.2 < d1["added_token_share"] < 0.5 and not d1["high"]
    assert d1["mean_residual_norm_added"] > 0 and 0.5 < d1["residual_norm_ratio"] < 1.5
    with pytest.warns(UserWarning, match="retrain"):
        idx.add(corpus[140:], _ids(140, len(corpus)))   # now > 50%
    assert idx.drift()["high"]
    with warnings.catch_warnings():                     # warned once, not on every add
        warnings.simplefilter("error")
        idx.delete(["d150"])
        idx.add([corpus[150]], ["d150"])
    # shifted additions raise the residual norm ratio
    rng = np.random.default_rng(3)
    far = [np.roll(d, 7, axis=1) + 0.3 * rng.standard_normal(d.shape).astype(np.float32)
           for d in corpus[:20]]
    far = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in far]
    idx.add(far, [f"far{i}" for i in range(20)])
    assert idx.drift()["residual_norm_ratio"] > d1["residual_norm_ratio"]
    idx.delete(["d0", "d1"])
    live = list(idx.ids)
    idx.retrain()
    dr = idx.drift()
    assert dr["added_token_share"] == 0 and dr["tokens_added_since_training"] == 0 and not dr["high"]
    assert list(idx.ids) == live and idx.n_rows == len(idx)
    assert idx.meta["retrained"] == 1
    _assert_matches_exhaustive(idx, _queries(corpus))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idx.add([corpus[0]], ["d0"])


# -- streaming build -----------------------------------------------------------------------
def _chunks(corpus, ids, size):
    return [(ids[a:a + size], PackedEmbeddings.from_list(corpus[a:a + size]))
            for a in range(0, len(corpus), size)]


@pytest.mark.parametrize("nbits,n_centroids", [(2, None), (4, 16)])
def test_streaming_build_equals_one_shot_build(corpus, nbits, n_centroids):
    ids = _ids(0, len(corpus))
    one = PlaidIndex.build(corpus, ids, nbits=nbits, n_centroids=n_centroids, seed=3)
    for size in (37, 1000):
        st = PlaidIndex.build_from_iterator(_chunks(corpus, ids, size), nbits=nbits,
                                            n_centroids=n_centroids, seed=3, show_progress=False)
        np.testing.assert_array_equal(st.centroids, one.centroids)
        for name, arr in one.codec.to_arrays().items():
            np.testing.assert_array_equal(st.codec.to_arrays()[name], arr)
        np.testing.assert_array_equal(st.codes, one.codes)
        np.testing.assert_array_equal(st.residuals, one.residuals)
        np.testing.assert_array_equal(st.doc_offsets, one.doc_offsets)
        assert list(st.ids) == ids
        q = _queries(corpus)
        for kn in ({}, ALL):
            assert st.search(q, k=10, **kn) == one.search(q, k=10, **kn)
        assert st.drift()["mean_residual_norm_trained"] == pytest.approx(
            one.drift()["mean_residual_norm_trained"], rel=1e-6)


def test_streaming_build_small_sample_callable_and_path(corpus, tmp_path):
    ids = _ids(0, len(corpus))
    chunks = _chunks(corpus, ids, 50)
    st = PlaidIndex.build_from_iterator(lambda: iter(chunks), sample_tokens=2000, seed=0,
                                        path=tmp_path / "s", show_progress=False)
    assert st.meta["build"]["streamed"]["sample_tokens"] == 2000
    back = PlaidIndex.load(tmp_path / "s")
    assert list(back.ids) == ids and back.n_tokens == sum(d.shape[0] for d in corpus)
    _assert_matches_exhaustive(back, _queries(corpus))
    # near-duplicate queries still find their documents with the default knobs
    q = torch.from_numpy(np.stack([corpus[i][:3] for i in range(8)]))
    assert [r[0].doc_id for r in back.search(q, k=3)] == ids[:8]


class _Interrupt(Exception):
    pass


def test_streaming_build_resumes_after_an_interruption(corpus, tmp_path, monkeypatch):
    import colengine.index.plaid.checkpoint as ck
    from colengine.index.plaid.streaming import default_resume_dir

    monkeypatch.setattr(ck, "_COMMIT_EVERY_S", 0.0)   # record progress after every chunk
    ids = _ids(0, len(corpus))
    one = PlaidIndex.build(corpus, ids, n_centroids=16, seed=1)
    chunks = _chunks(corpus, ids, 40)
    passes = {"n": 0}

    def interrupted():          # pass 1 whole, then pass 2 dies after 3 chunks
        passes["n"] += 1
        for i, c in enumerate(chunks):
            if passes["n"] == 2 and i == 3:
                raise _Interrupt
            yield c

    path = tmp_path / "idx"
    with pytest.raises(_Interrupt):
        PlaidIndex.build_from_iterator(interrupted, n_centroids=16, seed=1, path=path,
                                       show_progress=False)
    work = default_resume_dir(path)
    assert work.is_dir() and not (path / "manifest.json").exists()
    # other settings must not reuse the folder
    with pytest.raises(ValueError, match="other settings"):
        PlaidIndex.build_from_iterator(chunks, n_centroids=16, seed=2, path=path,
                                       show_progress=False)
    # resume with another chunking: pass 1 and the 120 documents already done are skipped
    compressed = []
    from colengine.index.plaid import build as plaid_build

    orig = plaid_build.encode_tokens

    def counting(tokens, *a, **kw):
        compressed.append(len(tokens))
        return orig(tokens, *a, **kw)

    monkeypatch.setattr(plaid_build, "encode_tokens", counting)
    st = PlaidIndex.build_from_iterator(_chunks(corpus, ids, 60), n_centroids=16, seed=1,
                                        path=path, show_progress=False)
    done = sum(d.shape[0] for d in corpus[:120])
    assert sum(compressed) == one.n_tokens - done
    assert not work.exists()
    for name in ("centroids", "codes", "residuals", "doc_offsets"):
        np.testing.assert_array_equal(getattr(st, name), getattr(one, name))
    assert list(PlaidIndex.load(path).ids) == ids
    q = _queries(corpus)
    assert st.search(q, k=10, **ALL) == one.search(q, k=10, **ALL)


@pytest.mark.parametrize("sample_tokens", [700, 100_000])
def test_pass_one_resumes_inside_the_sampling_pass(corpus, tmp_path, monkeypatch, sample_tokens):
    """Pass 1 killed after reading 5 chunks (its progress saved after each chunk): the next run
    skips those chunks and gives exactly the index of an uninterrupted streaming build (same
    token sample, so same centroids); a run whose chunks are cut differently starts pass 1
    over, with a warning, and still gives the same index."""
    import colengine.index.plaid.streaming as sm
    from colengine.index.plaid.streaming import default_resume_dir

    monkeypatch.setattr(sm, "SAMPLE_SAVE_EVERY_S", 0.0)
    ids = _ids(0, len(corpus))
    chunks = _chunks(corpus, ids, 20)
    kw = dict(n_centroids=16, seed=1, sample_tokens=sample_tokens, show_progress=False)
    one = PlaidIndex.build_from_iterator(chunks, **kw)
    read = []

    def dies_in_pass_one():
        for i, c in enumerate(chunks):
            if i == 5:
                raise _Interrupt
            read.append(i)
            yield c

    for cut, expect_warning in ((20, False), (30, True)):
        path = tmp_path / f"idx{cut}"
        read.clear()
        with pytest.raises(_Interrupt):
            PlaidIndex.build_from_iterator(dies_in_pass_one, path=path, **kw)
        assert (default_resume_dir(path) / "sampling").is_dir()
        seen = {"ids": 0}

        def counting():
            for c in _chunks(corpus, ids, cut):
                seen["ids"] += len(c[0])
                yield c

        decoded = []
        orig = sm.as_packed
        monkeypatch.setattr(sm, "as_packed", lambda e, **a: decoded.append(1) or orig(e, **a))
        if expect_warning:
            with pytest.warns(UserWarning, match="pass 1 starts over"):
                st = PlaidIndex.build_from_iterator(counting, path=path, **kw)
        else:
            st = PlaidIndex.build_from_iterator(counting, path=path, **kw)
            # pass 1 decoded only the 5 chunks not read before; pass 2 decoded every chunk
            assert len(decoded) == (len(chunks) - 5) + len(chunks)
        monkeypatch.setattr(sm, "as_packed", orig)
        assert not default_resume_dir(path).exists()
        for name in ("centroids", "codes", "residuals", "doc_offsets"):
            np.testing.assert_array_equal(np.asarray(getattr(st, name)),
                                          np.asarray(getattr(one, name)), err_msg=name)
        assert list(st.ids) == ids


def test_streaming_build_errors(corpus):
    ids = _ids(0, len(corpus))
    chunks = _chunks(corpus, ids, 60)
    with pytest.raises(TypeError, match="re-iterable"):
        PlaidIndex.build_from_iterator(iter(chunks), show_progress=False)
    with pytest.raises(ValueError):
        PlaidIndex.build_from_iterator([], show_progress=False)
    dup = [(["a", "b"], PackedEmbeddings.from_list(corpus[:2])),
           (["b"], PackedEmbeddings.from_list(corpus[2:3]))]
    with pytest.raises(DuplicateIdError):
        PlaidIndex.build_from_iterator(dup, show_progress=False)
    calls = {"n": 0}

    def changing():
        calls["n"] += 1
        return iter(chunks if calls["n"] == 1 else chunks[:-1])

    with pytest.raises(ValueError, match="changed"):
        PlaidIndex.build_from_iterator(changing, show_progress=False)
    with pytest.raises(ValueError):
        PlaidIndex.build_from_iterator(chunks, nbits=3, show_progress=False)


# -- through the Retriever (its add/delete call the index's) ---------------------------------
def test_retriever_add_delete_save_load_with_plaid(tiny_encoder, tmp_path):
    from colengine import Retriever
    from colengine.testing import sample_corpus

    corpus = sample_corpus()
    ids = [d["_id"] for d in corpus]
    # one vector set per document (no passages): this test is about the PLAID index itself
    r = Retriever.build(corpus, ids, model=tiny_encoder, index="plaid", show_progress=False,
                        long_documents="truncate")
    assert isinstance(r.index, PlaidIndex)
    query = corpus[0].get("title", "") + " " + corpus[0]["text"]
    r.delete(ids[:2])
    assert len(r) == len(ids) - 2
    assert not {h.doc_id for h in r.search(query, k=len(ids))} & set(ids[:2])
    with pytest.raises(UnknownIdError):
        r.delete([ids[1]])
    assert r.add([corpus[0]], ids=[ids[0]]) == [ids[0]]       # a deleted id comes back
    with pytest.raises(DuplicateIdError):
        r.add(["something else"], ids=[ids[0]])
    want = r.search(query, k=5)
    assert want[0].doc_id == ids[0]
    r.save(tmp_path / "r")                                    # tombstone of ids[1] stored
    back = Retriever.load(tmp_path / "r", trust_remote_code=True)
    assert back.search(query, k=5) == want and len(back) == len(r)
    assert ids[1] not in back.index.ids and back.index.stats()["deleted_documents"] == 2  # ids[1], old ids[0]


def test_retriever_streaming_build_equals_one_shot_and_cleans_up(tiny_encoder, tmp_path):
    from colengine import Retriever
    from colengine.index.plaid.streaming import default_resume_dir
    from colengine.testing import sample_corpus

    corpus = sample_corpus()
    ids = [d["_id"] for d in corpus]
    one = Retriever.build(corpus, ids, model=tiny_encoder, index="plaid", seed=4,
                          show_progress=False, long_documents="truncate")
    st = Retriever.build(corpus, ids, model=tiny_encoder, index="plaid", seed=4, stream=True,
                         chunk_size=7, path=tmp_path / "r", show_progress=False,
                         long_documents="truncate")
    assert st.index.meta["build"]["streamed"]["chunks"] == -(-len(corpus) // 7)
    np.testing.assert_array_equal(st.index.codes, one.index.codes)
    np.testing.assert_array_equal(st.index.residuals, one.index.residuals)
    assert not default_resume_dir(tmp_path / "r").exists()     # work folder and spool removed
    query = corpus[3]["text"]
    # the streamed centroids may differ from the one-shot ones in the last float bits (another
    # summation order), so scores are compared with a tolerance, ids exactly
    assert_hits_close(Retriever.load(tmp_path / "r", trust_remote_code=True).search(query, k=5), one.search(query, k=5))
    with pytest.raises(ValueError, match="plaid"):
        Retriever.build(corpus, ids, model=tiny_encoder, index="exhaustive", stream=True,
                        show_progress=False)


def test_resume_with_another_chunk_size_counts_each_token_once(corpus, tmp_path, monkeypatch):
    """Issue 11 item 13: resuming inside a chunk re-added that chunk's residual norms to the
    drift statistics (train_residual_norm was off)."""
    import colengine.index.plaid.checkpoint as ck

    monkeypatch.setattr(ck, "_COMMIT_EVERY_S", 0.0)
    ids = _ids(0, len(corpus))
    one = PlaidIndex.build_from_iterator(_chunks(corpus, ids, 40), n_centroids=16, seed=1,
                                         show_progress=False)
    passes = {"n": 0}

    def interrupted():
        passes["n"] += 1
        for i, c in enumerate(_chunks(corpus, ids, 40)):
            if passes["n"] == 2 and i == 3:
                raise _Interrupt
            yield c

    path = tmp_path / "idx"
    with pytest.raises(_Interrupt):
        PlaidIndex.build_from_iterator(interrupted, n_centroids=16, seed=1, path=path,
                                       show_progress=False)
    st = PlaidIndex.build_from_iterator(_chunks(corpus, ids, 50), n_centroids=16, seed=1,
                                        path=path, show_progress=False)   # 120 is inside 100-150
    a, b = st.meta["drift"]["train_residual_norm"], one.meta["drift"]["train_residual_norm"]
    assert a == pytest.approx(b, rel=1e-6)
    np.testing.assert_array_equal(st.codes, one.codes)


def test_resume_dir_that_holds_the_users_files_keeps_them(corpus, tmp_path):
    """Issue 11 item 4: ``resume_dir=EXISTING`` removed the whole folder when the build ended."""
    mine = tmp_path / "my-folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    ids = _ids(0, len(corpus))
    PlaidIndex.build_from_iterator(_chunks(corpus, ids, 60), n_centroids=16, seed=1,
                                   resume_dir=mine, show_progress=False)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    fresh = tmp_path / "work"           # a folder the build creates is removed whole
    PlaidIndex.build_from_iterator(_chunks(corpus, ids, 60), n_centroids=16, seed=1,
                                   resume_dir=fresh, show_progress=False)
    assert not fresh.exists()


def test_finite_input_that_overflows_float16_is_named_as_such():
    from colengine.embeddings import as_packed

    x = np.full((3, 8), 1e5, dtype=np.float32)
    with pytest.raises(ValueError, match="overflow float16"):
        as_packed([x], dtype=np.float16)
    with pytest.raises(ValueError, match="NaN or Inf"):
        as_packed([np.full((3, 8), np.nan, dtype=np.float32)], dtype=np.float16)


@pytest.mark.parametrize("few", [True, False], ids=["binary-searched", "one-pass"])
def test_deletes_drop_exactly_the_documents_postings_either_way(corpus, monkeypatch, few):
    """Deletes of a few documents find their postings by binary search, larger ones by a
    pass over every posting: both leave the lists that building them anew gives."""
    import colengine.index.plaid.ivf as ivf

    monkeypatch.setattr(ivf, "FEW_PAIRS", 10**9 if few else 0)
    idx = _fresh(corpus)
    idx._get_lists()
    idx.delete(["d3"])
    idx.delete(["d0", "d77", "d150"])
    idx.add(corpus[160:170], _ids(160, 170))
    idx.delete(["d165", "d4"])
    ref = build_lists(np.asarray(idx.codes), idx.doc_offsets, idx.n_centroids,
                      deleted=np.asarray(idx.deleted))
    _same_lists(idx._lists, ref)
    # a document whose postings are gone already is skipped, not dropped twice
    again = ivf.drop_docs(idx._lists, np.asarray(idx.deleted))
    _same_lists(again, ref)


def test_new_search_states_keep_the_centroid_tensor_until_retrain(corpus):
    """An add or a delete makes a new search state but not new centroids: the state's
    centroid tensor is carried over (converting and checking 131,072 centroids again made the
    first search after a one-document delete at 1M documents 56 ms slower); retrain()
    makes new ones, and the results follow them."""
    idx = _fresh(corpus)
    q = _queries(corpus)
    idx.search(q, k=5)
    first = idx._search_state().centroids
    idx.delete(["d3"])
    assert idx._search_state().centroids is first
    idx.add(corpus[160:170], _ids(160, 170))
    assert idx._search_state().centroids is first
    idx.retrain(seed=1)
    again = idx._search_state().centroids
    assert again is not first
    torch.testing.assert_close(again.float(), torch.from_numpy(
        np.asarray(idx.centroids, dtype=np.float32)), rtol=0, atol=0)
    _assert_matches_exhaustive(idx, q)


def test_adds_keep_one_centroid_index_from_a_token_count_until_retrain(corpus, monkeypatch,
                                                                       tmp_path):
    """Small adds assign their tokens by the exact arg-max over the centroids; once the
    tokens added reach EXACT_ASSIGN_TOKENS a centroid index is built and kept for every later
    add (building it per add cost more than it saved), until retrain() changes the
    centroids. A newly loaded generation with the same centroids can take it over. Either
    way each added token gets its nearest centroid (this corpus is small: the index is an
    exact faiss scan) and searches equal exact MaxSim over the decompressed vectors."""
    from colengine.index.plaid import build as plaid_build

    monkeypatch.setattr(plaid_build, "EXACT_ASSIGN_TOKENS", 120)
    idx = _fresh(corpus)
    start = int(idx.doc_offsets[-1])
    idx.add(corpus[160:161], _ids(160, 161))
    n0 = corpus[160].shape[0]
    assert idx._add_asg[1:] == (n0, None)             # below the count: exact, none kept
    i = 161
    while idx._add_asg[2] is None:
        idx.add(corpus[i:i + 1], _ids(i, i + 1))
        i += 1
    kept = idx._add_asg[2]
    assert kept.index is not None and idx._add_asg[1] >= 120
    idx.add(corpus[i:i + 3], _ids(i, i + 3))
    assert idx._add_asg[2] is kept                     # built once, then reused
    toks = np.concatenate(corpus[160:i + 3]).astype(np.float32)
    sims = toks @ idx._centroids32().T
    got = np.asarray(idx.codes[start:], dtype=np.int64)
    assert got.shape[0] == toks.shape[0]
    np.testing.assert_allclose(sims[np.arange(len(got)), got], sims.max(1), atol=1e-5)
    q = _queries(corpus)
    _assert_matches_exhaustive(idx, q)

    idx.save(tmp_path / "idx")
    loaded = PlaidIndex.load(tmp_path / "idx")
    assert loaded.take_add_assigner(idx) and loaded._add_asg[2] is kept
    loaded.retrain(seed=1)
    assert not loaded.take_add_assigner(idx)          # other centroids: not taken
    loaded.add(corpus[200:201], _ids(200, 201))
    assert loaded._add_asg[2] is not kept
    _assert_matches_exhaustive(loaded, q)
