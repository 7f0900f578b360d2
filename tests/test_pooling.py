"""Token pooling at build: the pooled vectors against a reference, the length rule, the
first token, pool_factor=1 as identity, pooled indexes (PLAID, exhaustive, streaming, add,
persistence, stats), and bad values refused at the door."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import clustered_docs, clustered_queries, einsum_topk
from scipy.cluster.hierarchy import fcluster, linkage

from colengine.embeddings import PackedEmbeddings
from colengine.errors import IndexFormatError
from colengine.index.exhaustive import ExhaustiveIndex
from colengine.index.plaid import PlaidIndex
from colengine.pooling import pool_packed, pool_tokens, pooled_length

ALL = dict(n_probe=10**9, centroid_score_threshold=None, n_candidates=10**9, n_exact=10**9)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _random_doc(L: int, d: int = 16, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return _unit(np.random.default_rng(seed).standard_normal((L, d))).astype(dtype)


@pytest.fixture(scope="module")
def corpus():
    return clustered_docs(240, 32, 30, 0, 3, 50)


# -- the pure function -------------------------------------------------------------------
def _reference_pool(doc: np.ndarray, f: int, normalize: bool) -> np.ndarray:
    """Ward tree of the non-first tokens, cut at ceil((L - 1) / f) clusters; cluster means
    (float64), ordered by each cluster's first token; the first token in front."""
    rest = doc[1:].astype(np.float64)
    labels = fcluster(linkage(rest, "ward"), t=math.ceil(rest.shape[0] / f), criterion="maxclust")
    groups = sorted({int(lab) for lab in labels}, key=lambda lab: int(np.argmax(labels == lab)))
    means = np.stack([rest[labels == lab].mean(axis=0) for lab in groups])
    if normalize:
        means = _unit(means)
    return np.concatenate([doc[:1].astype(np.float64), means])


@pytest.mark.parametrize("f", [2, 3, 5])
@pytest.mark.parametrize("L", [3, 8, 31, 120])
def test_pooled_tokens_equal_the_scipy_reference(L, f):
    doc = _random_doc(L, seed=L * 10 + f)
    got = pool_tokens(doc, f)
    want = _reference_pool(doc, f, normalize=True)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_well_separated_groups_become_their_means():
    # the non-first tokens form 4 tight groups of 3: with f=3 each group is one cluster
    rng = np.random.default_rng(5)
    centres = 10 * np.eye(4, 8)
    member = np.repeat(np.arange(4), 3)
    rng.shuffle(member)
    rest = centres[member] + 0.01 * rng.standard_normal((12, 8))
    doc = np.concatenate([rng.standard_normal((1, 8)), rest]).astype(np.float64)
    got = pool_tokens(doc, 3)        # not unit-norm: plain means
    order = [int(member[np.flatnonzero(member == g)[0]]) for g in
             sorted(range(4), key=lambda g: np.flatnonzero(member == g)[0])]
    want = np.stack([rest[member == g].mean(axis=0) for g in order])
    np.testing.assert_allclose(got[1:], want, atol=1e-12)
    assert np.array_equal(got[0], doc[0])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_first_token_is_kept_exactly(dtype):
    doc = _random_doc(40, seed=3, dtype=dtype)
    doc[0] = doc[1]                # even when it equals a token that gets pooled
    for f in (2, 3, 8):
        out = pool_tokens(doc, f)
        assert out.dtype == dtype
        assert out[0].tobytes() == doc[0].tobytes()


def test_token_count_rule():
    """The rule: f == 1 or L <= 2 keeps all L tokens; otherwise 1 (the first token) +
    max(1, ceil((L - 1) / f)) (fcluster's maxclust on the other L - 1 tokens)."""
    for f in range(1, 9):
        for L in range(41):
            want = L if (f == 1 or L <= 2) else 1 + max(1, math.ceil((L - 1) / f))
            assert pooled_length(L, f) == want
            doc = _random_doc(L, seed=L + 100 * f) if L else np.zeros((0, 16), np.float32)
            assert pool_tokens(doc, f).shape == (want, 16), (L, f)


def test_tied_tokens_never_give_more_than_the_rule():
    # 12 tokens to pool, only 2 distinct: all merge heights but one tie at 0, so fcluster
    # cannot cut 6 clusters and gives the 2 groups (fewer than the rule, never more)
    doc = np.repeat(_random_doc(3, seed=9), [1, 6, 6], axis=0)
    out = pool_tokens(doc, 2)
    assert out.shape[0] == 3 < pooled_length(13, 2)
    np.testing.assert_allclose(out[1:], doc[[1, 7]], atol=1e-6)


def test_non_unit_input_is_not_renormalised():
    doc = 3.0 * _random_doc(20, seed=4)
    out = pool_tokens(doc, 2)
    np.testing.assert_allclose(out, _reference_pool(doc, 2, normalize=False), atol=1e-5)
    assert np.linalg.norm(out[1:], axis=1).min() < 3.0 - 1e-3   # a mean of distinct vectors


def test_pool_factor_1_is_the_identity():
    doc = _random_doc(17)
    assert pool_tokens(doc, 1) is doc
    p = PackedEmbeddings.from_list([doc, doc[:3]])
    assert pool_packed(p, 1) is p


def test_packed_variant_pools_each_document(corpus):
    p = PackedEmbeddings.from_list(corpus[:20], dtype=np.float32)
    q = pool_packed(p, 2)
    assert q.lengths.tolist() == [pooled_length(n, 2) for n in p.lengths.tolist()]
    for i in range(20):
        np.testing.assert_array_equal(q[i], pool_tokens(corpus[i], 2))


# -- indexes -----------------------------------------------------------------------------
def _bundle_without_timings(idx: PlaidIndex):
    b = idx.to_bundle()
    meta = json.loads(json.dumps(b.meta))
    meta["build"].pop("build_seconds")
    return meta, {k: np.asarray(v) for k, v in b.arrays.items()}


def test_pool_factor_1_leaves_the_plaid_index_byte_identical(corpus):
    m0, a0 = _bundle_without_timings(PlaidIndex.build(corpus, nbits=2, seed=0))
    m1, a1 = _bundle_without_timings(PlaidIndex.build(corpus, nbits=2, seed=0, pool_factor=1))
    assert m0 == m1 and "pool_factor" not in m1
    assert a0.keys() == a1.keys() and "original_lengths" not in a1
    for k in a0:
        assert a0[k].dtype == a1[k].dtype and a0[k].tobytes() == a1[k].tobytes(), k


def test_pooled_plaid_search_equals_exhaustive_over_the_pooled_vectors(corpus):
    idx = PlaidIndex.build(corpus, nbits=4, seed=0, pool_factor=2)
    pooled = pool_packed(PackedEmbeddings.from_list(corpus, dtype=np.float16), 2)
    dec = idx.decompressed()
    assert np.array_equal(dec.offsets, pooled.offsets)
    cos = np.sum(dec.tokens * pooled.tokens.astype(np.float32), axis=1)
    assert cos.mean() > 0.97   # the stored vectors are the pooled ones, compressed
    q = clustered_queries(corpus, 6, 12, 1)
    got = idx.search(q, k=10, **ALL)
    ref_ids, ref_scores = einsum_topk(q, dec, 10)
    for b, hits in enumerate(got):
        assert [h.doc_id for h in hits] == [str(i) for i in ref_ids[b]]
        np.testing.assert_allclose([h.score for h in hits], ref_scores[b].numpy(), atol=1e-3)
    # the exhaustive index pools the same way: its vectors are the pooled ones
    ex = ExhaustiveIndex.build(corpus, pool_factor=2)
    assert np.array_equal(ex.docs.offsets, pooled.offsets)
    assert ex.docs.tokens.tobytes() == pooled.tokens.tobytes()
    e_ids, e_scores = einsum_topk(q, pooled, 10)
    for b, hits in enumerate(ex.search(q, k=10)):
        assert [h.doc_id for h in hits] == [str(i) for i in e_ids[b]]
        np.testing.assert_allclose([h.score for h in hits], e_scores[b].numpy(), atol=1e-3)


def test_streaming_build_pools_like_build(corpus):
    ids = [f"d{i}" for i in range(len(corpus))]
    chunks = [(ids[a:a + 70], corpus[a:a + 70]) for a in range(0, len(corpus), 70)]
    s = PlaidIndex.build_from_iterator(chunks, nbits=2, seed=0, pool_factor=3,
                                       sample_tokens=10**7, show_progress=False)
    b = PlaidIndex.build(corpus, ids, nbits=2, seed=0, pool_factor=3)
    for k in ("centroids", "codes", "residuals", "doc_offsets", "original_lengths"):
        assert np.array_equal(getattr(s, k), getattr(b, k)), k
    assert s.pool_factor == b.pool_factor == 3


def test_add_delete_save_load_retrain_keep_pooling(corpus, tmp_path):
    idx = PlaidIndex.build(corpus[:200], nbits=2, seed=0, pool_factor=2)
    lens = [c.shape[0] for c in corpus]
    idx.add(corpus[200:], [str(i) for i in range(200, 240)])
    assert np.diff(idx.doc_offsets).tolist() == [pooled_length(n, 2) for n in lens]
    assert idx.original_lengths.tolist() == lens
    added = idx.embeddings_of(["230"])[0].astype(np.float32)
    want = pool_tokens(corpus[230], 2)
    assert added.shape == want.shape and np.sum(added * want, axis=1).mean() > 0.9

    idx.delete([str(i) for i in range(0, 240, 3)])
    idx.save(tmp_path / "p")
    back = PlaidIndex.load(tmp_path / "p")
    keep = [n for i, n in enumerate(lens) if i % 3]
    assert back.pool_factor == 2 and back.original_lengths.tolist() == keep
    st = back.stats()
    assert st["pool_factor"] == 2 and st["original_tokens"] == sum(keep)
    assert st["bytes_per_original_token"] == pytest.approx(st["disk_bytes"] / sum(keep))
    assert st["bytes_per_token"] > st["bytes_per_original_token"]
    q = clustered_queries(corpus, 4, 12, 2)
    assert back.search(q, k=5) == idx.search(q, k=5)

    back.retrain()
    assert back.pool_factor == 2 and back.original_lengths.tolist() == keep
    assert np.diff(back.doc_offsets).tolist() == [pooled_length(n, 2) for n in keep]


def test_unpooled_stats_count_every_token_once(corpus):
    st = PlaidIndex.build(corpus, nbits=2, seed=0).stats()
    assert st["pool_factor"] == 1 and st["original_tokens"] == st["tokens"]
    assert st["bytes_per_original_token"] == st["bytes_per_token"]


def test_exhaustive_pooled_add_delete_and_round_trip(corpus, tmp_path):
    ex = ExhaustiveIndex.build(corpus[:100], pool_factor=3)
    ex.add(corpus[100:110], [str(i) for i in range(100, 110)])
    assert ex.docs.lengths.tolist() == [pooled_length(c.shape[0], 3) for c in corpus[:110]]
    ex.delete(["0", "5"])
    ex.save(tmp_path / "e")
    back = ExhaustiveIndex.load(tmp_path / "e")
    want = [c.shape[0] for i, c in enumerate(corpus[:110]) if i not in (0, 5)]
    assert back.pool_factor == 3 and back.original_lengths.tolist() == want
    assert back.stats()["original_tokens"] == sum(want)


def test_a_pool_factor_without_original_lengths_is_a_format_error(corpus, tmp_path):
    idx = PlaidIndex.build(corpus[:50], nbits=2, seed=0)
    b = idx.to_bundle()
    b.meta["pool_factor"] = 2
    with pytest.raises(IndexFormatError, match="original_lengths"):
        PlaidIndex.from_bundle(b)
    b.meta["pool_factor"] = 11
    with pytest.raises(IndexFormatError, match="pool_factor"):
        PlaidIndex.from_bundle(b)


# -- the door ----------------------------------------------------------------------------
BAD = [0, 9, -1, 2.0, True, "2", None]


@pytest.mark.parametrize("bad", BAD)
def test_bad_pool_factors_are_refused(bad, corpus):
    with pytest.raises(ValueError, match="pool_factor must be an int in 1..8"):
        pool_tokens(corpus[0], bad)
    with pytest.raises(ValueError, match="pool_factor"):
        PlaidIndex.build(corpus[:20], pool_factor=bad)
    with pytest.raises(ValueError, match="pool_factor"):
        PlaidIndex.build_from_iterator([(["a"], corpus[:1])], pool_factor=bad,
                                       show_progress=False)
    with pytest.raises(ValueError, match="pool_factor"):
        ExhaustiveIndex.build(corpus[:20], pool_factor=bad)


def test_retriever_refuses_a_bad_pool_factor_before_loading_a_model(tmp_path):
    from colengine import Retriever

    with pytest.raises(ValueError, match="pool_factor"):
        Retriever.build(["a text"], model=str(tmp_path / "no-such-model"), pool_factor=0,
                        show_progress=False)


def test_cli_index_pool_factor(tiny_model_path, tmp_path, capsys):
    from colengine.cli import main
    from colengine.testing import sample_corpus

    d = tmp_path / "beir"
    d.mkdir()
    with open(d / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in sample_corpus()[:12])
    with pytest.raises(SystemExit):
        main(["index", str(d), "--out", str(tmp_path / "bad"), "--pool-factor", "9"])
    out = tmp_path / "idx"
    assert main(["index", str(d), "--out", str(out), "--model", str(tiny_model_path),
                 "--index", "plaid", "--device", "cpu", "--pool-factor", "2", "-q"]) == 0
    capsys.readouterr()
    from colengine import Retriever

    st = Retriever.load(out, device="cpu").info()["index"]
    assert st["pool_factor"] == 2 and st["original_tokens"] > st["tokens"]
    assert main(["search", str(out), "bees and flowers", "-k", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3
