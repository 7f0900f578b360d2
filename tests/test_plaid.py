"""PLAID index: exactness when nothing is pruned, codec bounds, tiny corpora, persistence."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_hits_close, clustered_docs, clustered_queries, einsum_topk
from hypothesis import given, settings
from hypothesis import strategies as hst

from colengine.errors import DuplicateIdError, IndexFormatError, UnknownIdError
from colengine.index.exhaustive import ExhaustiveIndex
from colengine.index.plaid import Knobs, PlaidIndex, ProductCodec, ScalarCodec
from colengine.index.plaid.centroids import default_n_centroids

ALL = dict(n_probe=10**9, centroid_score_threshold=None, n_candidates=10**9, n_exact=10**9)


def _clustered(n_docs=300, dim=32, n_clusters=40, seed=0, lo=3, hi=60):
    return clustered_docs(n_docs, dim, n_clusters, seed, lo, hi)


def _queries(docs, n=6, lq=12, seed=1):
    return clustered_queries(docs, n, lq, seed)


@pytest.fixture(scope="module")
def corpus():
    return _clustered()


@pytest.fixture(scope="module")
def index(corpus):
    return PlaidIndex.build(corpus, [f"d{i}" for i in range(len(corpus))], nbits=2, seed=0)


# -- exactness ---------------------------------------------------------------------------
@pytest.mark.parametrize("nbits", [1, 2, 4])
def test_exact_agreement_when_nothing_is_pruned(corpus, nbits):
    idx = PlaidIndex.build(corpus, nbits=nbits, seed=0)
    dec = idx.decompressed()
    q = _queries(corpus)
    got = idx.search(q, k=10, **ALL)
    ref_ids, ref_scores = einsum_topk(q, dec, 10)
    for b, hits in enumerate(got):
        assert [h.doc_id for h in hits] == [str(i) for i in ref_ids[b]]
        np.testing.assert_allclose([h.score for h in hits], ref_scores[b].numpy(), atol=1e-3)
    # and the exhaustive index over the same (decompressed) vectors agrees: the same scores
    # rank by rank, the same ids except where two scores tie within float16 storage's error
    ex = ExhaustiveIndex.build(dec)
    for e_hits, p_hits in zip(ex.search(q, k=10), got):
        e_s = np.array([h.score for h in e_hits])
        np.testing.assert_allclose(e_s, [h.score for h in p_hits], atol=1e-3)
        for r, (eh, ph) in enumerate(zip(e_hits, p_hits)):
            if eh.doc_id != ph.doc_id:
                assert np.min(np.abs(np.delete(e_s, r) - e_s[r])) < 2e-3, (r, eh, ph)


def test_default_knobs_find_near_duplicates(index, corpus):
    q = torch.from_numpy(np.stack([corpus[i][:3] for i in range(8)]))
    hits = index.search(q, k=5)
    assert [r[0].doc_id for r in hits] == [f"d{i}" for i in range(8)]


def test_compression_keeps_ranking_close_to_uncompressed(corpus):
    q = _queries(corpus, n=10)
    ref_ids, _ = einsum_topk(q, ExhaustiveIndex.build(corpus).docs, 10)
    idx = PlaidIndex.build(corpus, nbits=4, seed=0)
    got = idx.search(q, k=10, **ALL)
    overlap = np.mean([len({h.doc_id for h in g} & {str(i) for i in r}) / 10
                       for g, r in zip(got, ref_ids)])
    assert overlap >= 0.9


def test_single_query_2d_and_batch_agree(index, corpus):
    q = _queries(corpus, n=4)
    batch = index.search(q, k=7)
    for b in range(4):
        assert index.search(q[b], k=7)[0] == batch[b]


def test_query_lengths_mask_padding(index, corpus):
    q = _queries(corpus, n=2, lq=12)
    padded = torch.cat([q, 100 * torch.ones(2, 5, q.shape[2])], dim=1)
    a = index.search(q, k=5, **ALL)
    b = index.search(padded, k=5, query_lengths=torch.tensor([12, 12]), **ALL)
    assert [[h.doc_id for h in r] for r in a] == [[h.doc_id for h in r] for r in b]
    for ra, rb in zip(a, b):
        np.testing.assert_allclose([h.score for h in ra], [h.score for h in rb], atol=1e-4)


# -- codec -------------------------------------------------------------------------------
@pytest.mark.parametrize("nbits", [1, 2, 4])
@pytest.mark.parametrize("dim", [128, 20])
def test_codec_round_trip_within_bucket_width(nbits, dim):
    rng = np.random.default_rng(nbits)
    r = (rng.standard_normal((5000, dim)) * rng.uniform(0.01, 0.2, dim)).astype(np.float32)
    codec = ScalarCodec.fit(r, nbits)
    packed = codec.compress(torch.from_numpy(r))
    assert packed.dtype == torch.uint8 and packed.shape == (5000, -(-dim * nbits // 8))
    dec = codec.decompress(packed).numpy()
    # bucket edges: cutoffs, closed by the data's min/max per dimension
    edges = np.concatenate([r.min(0)[:, None], codec.cutoffs, r.max(0)[:, None]], axis=1)
    b = codec.buckets(torch.from_numpy(r)).numpy().astype(np.int64)
    width = np.take_along_axis(edges, b.T + 1, 1).T - np.take_along_axis(edges, b.T, 1).T
    assert np.all(np.abs(dec - r) <= width + 1e-6)
    # decoded values are the bucket weights, which are monotone per dimension
    assert np.all(np.diff(codec.weights, axis=1) >= 0)
    assert np.allclose(dec, codec.weights[np.arange(dim)[None, :], b])



@pytest.mark.parametrize("kind", ["product", "scalar"])
@pytest.mark.parametrize("nbits,dim", [(1, 16), (2, 24), (2, 10), (4, 7)])
def test_scoring_from_codes_equals_decompress_then_dot(kind, nbits, dim):
    """WARP-style scoring from the packed bytes (one table per query vector, a sum of
    packed_dim lookups per residual) equals the dot product with the decompressed residual,
    for both codecs, every nbits and a dimension that does not fill the last byte."""
    from colengine.index.plaid.codec import fit_codec, score_codes

    rng = np.random.default_rng(nbits * 100 + dim)
    r = (rng.standard_normal((1500, dim)) * 0.1).astype(np.float32)
    codec = fit_codec(kind, r, nbits)
    packed = codec.compress(torch.from_numpy(r[:40]))
    q = torch.from_numpy(rng.standard_normal((5, dim)).astype(np.float32))
    tables = codec.query_tables(q)
    rows = torch.from_numpy(rng.integers(0, 5, 40))
    got = score_codes(tables, rows, packed)
    want = (q[rows] * codec.decompress(packed)).sum(dim=1)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="query vectors"):
        codec.query_tables(q[:, :-1])
    with pytest.raises(ValueError, match="do not fit"):
        score_codes(tables, rows[:3], packed)

def test_codec_bit_layout_is_packbits_dimension_major():
    codec = ScalarCodec(2, np.tile([-1.0, 0.0, 1.0], (8, 1)), np.tile([-1.5, -0.5, 0.5, 1.5], (8, 1)))
    vals = np.array([[-2, -0.5, 0.5, 2, 2, 0.5, -0.5, -2]], dtype=np.float32)
    packed = codec.compress(torch.from_numpy(vals)).numpy()
    bits = np.unpackbits(np.array([0, 1, 2, 3, 3, 2, 1, 0], np.uint8)[:, None], axis=1)[:, -2:]
    assert packed.tolist() == np.packbits(bits.reshape(1, -1), axis=1).tolist()


@pytest.mark.parametrize("nbits", [1, 2, 4])
@pytest.mark.parametrize("dim", [128, 20])
def test_product_codec_codes_each_group_by_its_nearest_codeword(nbits, dim):
    rng = np.random.default_rng(nbits + dim)
    r = (rng.standard_normal((3000, dim)) * rng.uniform(0.01, 0.2, dim)).astype(np.float32)
    codec = ProductCodec.fit(r, nbits)
    per, pdim = 8 // nbits, -(-dim // (8 // nbits))
    packed = codec.compress(torch.from_numpy(r)).numpy()
    assert packed.shape == (3000, pdim) and packed.dtype == np.uint8
    # reference: brute-force squared distances to every codeword of every group (numpy)
    x = np.zeros((3000, pdim * per), np.float32)
    x[:, :dim] = r
    d2 = ((x.reshape(3000, pdim, 1, per) - codec.codebooks[None]) ** 2).sum(-1)   # [n, pdim, 256]
    chosen = np.take_along_axis(d2, packed[..., None].astype(np.int64), 2)[..., 0]
    np.testing.assert_allclose(chosen, d2.min(axis=2), rtol=1e-4, atol=1e-6)
    dec = codec.decompress(torch.from_numpy(packed)).numpy()
    want = codec.codebooks[np.arange(pdim)[None, :], packed].reshape(3000, -1)[:, :dim]
    np.testing.assert_array_equal(dec, want.astype(np.float32))
    # the matmul path (GPU, MPS) picks the same codewords as faiss's (CPU)
    np.testing.assert_array_equal(codec._compress_torch(torch.from_numpy(r)).numpy(), packed)


def test_product_codec_beats_scalar_buckets_on_correlated_residuals():
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((32, 64)).astype(np.float32)
    r = (rng.standard_normal((20000, 32)).astype(np.float32) @ mix) * 0.05   # rank-32 in 64 dims
    errs = {}
    for codec in (ProductCodec.fit(r, 2), ScalarCodec.fit(r, 2)):
        dec = codec.decompress(codec.compress(torch.from_numpy(r))).numpy()
        errs[codec.kind] = float(((dec - r) ** 2).sum(1).mean())
    assert errs["product"] < 0.8 * errs["scalar"], errs


def test_product_codec_with_fewer_points_than_codewords_is_exact():
    r = np.random.default_rng(1).standard_normal((40, 12)).astype(np.float32)
    codec = ProductCodec.fit(r, 2)
    # exact up to the float16 the codewords are stored in
    np.testing.assert_allclose(codec.decompress(codec.compress(torch.from_numpy(r))).numpy(), r,
                               rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", ["product", "scalar"])
def test_codec_kind_survives_save_and_load(tmp_path, kind):
    docs = clustered_docs(n_docs=60, dim=16, n_clusters=6, seed=5, lo=5, hi=30)
    idx = PlaidIndex.build(docs, nbits=2, codec=kind)
    assert idx.codec.kind == kind and idx.stats()["codec"] == kind
    idx.save(tmp_path / "i")
    back = PlaidIndex.load(tmp_path / "i")
    assert type(back.codec) is type(idx.codec)
    for name, arr in idx.codec.to_arrays().items():
        np.testing.assert_array_equal(back.codec.to_arrays()[name], arr)
    q = torch.from_numpy(np.asarray(docs[3][:4], dtype=np.float32))
    a, b = idx.search(q, k=5), back.search(q, k=5)
    assert [h.doc_id for h in a[0]] == [h.doc_id for h in b[0]]


def test_unknown_codec_is_refused_before_any_work():
    with pytest.raises(ValueError, match="codec must be one of"):
        PlaidIndex.build([np.ones((3, 4), np.float32)], codec="opq")


def test_codec_rejects_bad_nbits():
    with pytest.raises(ValueError):
        ScalarCodec.fit(np.zeros((10, 4), np.float32), nbits=3)
    with pytest.raises(ValueError):
        PlaidIndex.build([np.ones((3, 4), np.float32)], nbits=8)



def test_the_number_of_centroids_is_never_capped_silently(corpus):
    """The manifest records PLAID's rule, what was asked and what was used; a number asked for
    explicitly and capped is also a warning (a capped rule on a small corpus is only recorded)."""
    T = sum(d.shape[0] for d in corpus)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idx = PlaidIndex.build(corpus, seed=1)
    rec = idx.meta["build"]["n_centroids"]
    assert rec["used"] == idx.n_centroids == default_n_centroids(T) and rec["asked"] is None
    assert rec["rule"] >= rec["used"]
    assert (rec["capped"] is None) == (rec["rule"] == rec["used"])
    with pytest.warns(UserWarning, match="n_centroids capped: .*100000 asked"):
        big = PlaidIndex.build(corpus, n_centroids=100_000, seed=1)
    rec = big.meta["build"]["n_centroids"]
    assert rec["asked"] == 100_000 and rec["used"] == big.n_centroids <= T // 39
    assert "39 tokens" in rec["capped"]

# -- tiny corpora ------------------------------------------------------------------------
@pytest.mark.parametrize("shapes", [[(3, 8)], [(1, 8)], [(1, 8), (2, 8)], [(0, 8), (4, 8)],
                                    [(50, 8)] * 2])
def test_tiny_corpora(shapes):
    rng = np.random.default_rng(0)
    docs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idx = PlaidIndex.build(docs)
    assert idx.n_centroids == default_n_centroids(sum(s[0] for s in shapes)) == 1 or \
        idx.n_centroids <= sum(s[0] for s in shapes) // 39
    q = rng.standard_normal((2, 4, 8)).astype(np.float32)
    hits = idx.search(q, k=3)
    nonempty = sum(1 for s in shapes if s[0])
    assert all(len(h) == min(3, nonempty) for h in hits)
    assert idx.stats()["documents"] == len(shapes)


def test_empty_corpus_and_tokenless_corpus_raise():
    with pytest.raises(ValueError):
        PlaidIndex.build([])
    with pytest.raises(ValueError):
        PlaidIndex.build([np.zeros((0, 8), np.float32)])


def test_default_n_centroids():
    assert default_n_centroids(815_632) == 8192
    assert default_n_centroids(1) == 1 and default_n_centroids(3) == 1
    assert default_n_centroids(100) == 2      # 100 // 39 -> 2
    for t in (1, 10, 500, 10_000, 10**6):
        assert default_n_centroids(t) * 39 <= max(39, t)


# -- knobs -------------------------------------------------------------------------------
def test_knob_validation(index, corpus):
    q = _queries(corpus, n=1)
    with pytest.raises(TypeError):
        index.search(q, k=5, n_probe=1.5)
    with pytest.raises(ValueError):
        index.search(q, k=5, n_candidates=0)
    with pytest.raises(ValueError):
        index.search(q, k=5, centroid_score_threshold=float("nan"))
    with pytest.raises(TypeError):
        index.search(q, k=5, nprobe=2)
    with pytest.raises(ValueError):
        index.search(q, k=0)
    with pytest.raises(ValueError):
        index.search(torch.zeros(1, 4, 7), k=5)
    assert Knobs.for_k(10).n_probe >= 1
    kn = Knobs.for_k(1000).replace(n_candidates=100)
    assert kn.n_exact == 1000 and kn.n_candidates == 1000
    assert Knobs.for_k(10).replace(centroid_score_threshold=None).centroid_score_threshold is None


def test_knobs_surface():
    """for_k gives PLAID's defaults by k; replace validates, keeps k <= n_exact <= n_candidates,
    lets n_exact follow n_candidates unless given, and None keeps an int knob."""
    assert Knobs.for_k(10) == Knobs(1, 0.45, 256, 64, 10)
    assert Knobs.for_k(100) == Knobs(2, 0.45, 1024, 256, 100)
    assert Knobs.for_k(2000) == Knobs(4, 0.4, 8000, 2000, 2000)
    base = Knobs.for_k(10)
    assert base.replace() == base and base.replace(n_probe=None, n_exact=None) == base
    assert base.replace(n_candidates=40) == Knobs(1, 0.45, 40, 10, 10)
    assert base.replace(n_candidates=40, n_exact=30) == Knobs(1, 0.45, 40, 30, 10)
    assert base.replace(n_exact=500).n_exact == 256             # stage 3 keeps at most stage 2's
    assert base.replace(n_exact=3).n_exact == 10                # never fewer than k
    assert base.replace(n_probe=np.int64(3)).n_probe == 3
    assert base.replace(centroid_score_threshold=1).centroid_score_threshold == 1.0
    for bad, err in ((dict(n_probe=0), ValueError), (dict(n_exact=-2), ValueError),
                     (dict(n_candidates=2.0), TypeError), (dict(n_probe=True), TypeError),
                     (dict(centroid_score_threshold="0.5"), TypeError),
                     (dict(centroid_score_threshold=float("inf")), ValueError)):
        with pytest.raises(err):
            base.replace(**bad)
    with pytest.raises(TypeError, match="valid: .*n_probe"):
        base.replace(ncells=2)
    with pytest.raises(ValueError, match="k must be positive"):
        Knobs.for_k(0)


def test_more_work_never_hurts(index, corpus):
    q = _queries(corpus, n=6)
    ref = index.search(q, k=10, **ALL)
    wide = index.search(q, k=10, n_probe=64, centroid_score_threshold=None, n_candidates=300, n_exact=300)
    assert [[h.doc_id for h in r] for r in wide] == [[h.doc_id for h in r] for r in ref]


# -- persistence -------------------------------------------------------------------------
def test_save_load_round_trip_identical_results(index, corpus, tmp_path):
    path = tmp_path / "idx"
    index.save(path)
    loaded = PlaidIndex.load(path)
    assert isinstance(loaded.residuals, np.memmap) or not loaded.residuals.flags.writeable
    q = _queries(corpus, n=5)
    for kn in ({}, ALL, {"n_probe": 3, "n_candidates": 64}):
        assert loaded.search(q, k=10, **kn) == index.search(q, k=10, **kn)
    man = json.loads((path / "manifest.json").read_text())
    assert man["kind"] == "plaid"
    for key in ("dim", "nbits", "n_centroids", "n_documents", "n_tokens", "plaid_format"):
        assert key in man["meta"]
    s = loaded.stats()
    assert s["documents"] == len(corpus) and s["tokens"] == index.n_tokens
    files = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert s["disk_bytes"] == files
    assert s["bytes_per_token"] == pytest.approx(files / index.n_tokens)


def test_build_with_path_and_model_meta(corpus, tmp_path):
    idx = PlaidIndex.build(corpus[:50], path=tmp_path / "p", model={"name": "m", "dim": 32})
    loaded = PlaidIndex.load(tmp_path / "p")
    assert loaded.meta["model"] == {"name": "m", "dim": 32}
    assert loaded.ids.ids == idx.ids.ids


def _saved(index, tmp_path):
    path = tmp_path / "c"
    index.save(path)
    man = json.loads((path / "manifest.json").read_text())
    return path, man


def test_truncated_file_raises(index, tmp_path):
    path, man = _saved(index, tmp_path)
    f = path / man["arrays"]["residuals"]["file"]
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(IndexFormatError):
        PlaidIndex.load(path)


def test_flipped_bytes_raise(index, tmp_path):
    path, man = _saved(index, tmp_path)
    f = path / man["arrays"]["codes"]["file"]
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError):
        PlaidIndex.load(path)


def test_foreign_and_wrong_kind_manifest_raise(index, corpus, tmp_path):
    path, man = _saved(index, tmp_path)
    bad = dict(man, format="something-else")
    (path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(IndexFormatError):
        PlaidIndex.load(path)
    ExhaustiveIndex.build(corpus[:5]).save(tmp_path / "ex")
    with pytest.raises(IndexFormatError):
        PlaidIndex.load(tmp_path / "ex")
    with pytest.raises(IndexFormatError):
        PlaidIndex.load(tmp_path / "nothing-here")


def test_inconsistent_meta_raises(index, tmp_path):
    path, man = _saved(index, tmp_path)
    man["meta"]["n_tokens"] += 1
    (path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(IndexFormatError):
        PlaidIndex.load(path)
    man["meta"]["n_tokens"] -= 1
    man["meta"]["plaid_format"] = 99
    (path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(IndexFormatError):
        PlaidIndex.load(path)


def test_out_of_range_codes_raise(index, tmp_path):
    from colengine.storage import load_bundle, save_bundle

    path, _ = _saved(index, tmp_path)
    b = load_bundle(path, mmap=False)
    codes = b.arrays["codes"].copy()
    codes[0] = index.n_centroids + 5
    b.arrays["codes"] = codes
    save_bundle(tmp_path / "bad", b)
    with pytest.raises(IndexFormatError):
        PlaidIndex.load(tmp_path / "bad")


def test_centroids_are_stored_one_byte_a_dimension_and_load_bit_for_bit(index, corpus, tmp_path):
    """A trained index keeps float16 centroids on the int8 grid: the files hold int8 values and
    one exponent per centroid, and loading gives back the very same float16 array."""
    from colengine.storage import load_bundle

    c = np.asarray(index.centroids)
    assert c.dtype == np.float16
    path, man = _saved(index, tmp_path)
    assert "centroids" not in man["arrays"]
    b = load_bundle(path, mmap=False)
    q, e = b.arrays["centroid_q"], b.arrays["centroid_exponents"]
    assert q.dtype == np.int8 and q.shape == c.shape and e.dtype == np.int8 and e.shape == (c.shape[0],)
    # the stored values, decoded independently of the engine, are the float16 centroids
    np.testing.assert_array_equal(q.astype(np.float64) * 2.0 ** e.astype(np.float64)[:, None],
                                  c.astype(np.float64))
    loaded = PlaidIndex.load(path)
    assert np.array_equal(np.asarray(loaded.centroids).view(np.uint16), c.view(np.uint16))
    qq = _queries(corpus, n=4)
    assert loaded.search(qq, k=10, **ALL) == index.search(qq, k=10, **ALL)


def test_centroid_rounding_is_within_one_step_of_the_trained_ones():
    from colengine.index.plaid.centroids import quantize_centroids

    rng = np.random.default_rng(3)
    c = rng.standard_normal((300, 16)).astype(np.float32)
    c[:100] /= np.linalg.norm(c[:100], axis=1, keepdims=True)     # unit rows
    c[100:200] *= 1e-4                                             # tiny rows
    c[200:] *= 50.0                                                # large rows (not normalised)
    c[7] = 0.0                                                     # a zero row
    cq = quantize_centroids(c).astype(np.float64)
    step = np.abs(c).max(axis=1, keepdims=True).astype(np.float64) / 127   # half a grid step at most
    assert np.all(np.abs(cq - c) <= step + 1e-12)
    assert np.all(cq[7] == 0)


def test_centroids_off_the_grid_stay_float16_and_older_layouts_still_load(index, corpus, tmp_path):
    """An index whose centroids are not on the grid (trained by an older colengine) is saved
    with its float16 centroids unchanged; a layout-3 folder (float16 ``centroids``) loads."""
    from colengine.storage import load_bundle, save_bundle

    old = np.asarray(index.centroids).astype(np.float32)
    old += np.float32(1e-3)                     # off the power-of-two grid
    legacy = PlaidIndex.build(corpus[:60], seed=0)
    legacy.centroids = old.astype(np.float16)
    path, man = _saved(legacy, tmp_path)
    assert "centroids" in man["arrays"] and "centroid_q" not in man["arrays"]
    assert np.array_equal(np.asarray(PlaidIndex.load(path).centroids), old.astype(np.float16))
    # the same arrays under layout version 3 (before the grid) load as before
    b = load_bundle(path, mmap=False)
    b.meta["plaid_format"] = 3
    save_bundle(tmp_path / "v3", b)
    assert np.array_equal(np.asarray(PlaidIndex.load(tmp_path / "v3").centroids), old.astype(np.float16))
    # float16 centroids are still checked for finite values
    nan = old.astype(np.float16)
    nan[1, 2] = np.nan
    b.arrays["centroids"] = nan
    save_bundle(tmp_path / "nan", b)
    with pytest.raises(IndexFormatError, match="finite|NaN"):
        PlaidIndex.load(tmp_path / "nan")


@pytest.mark.parametrize("native", [False, True])
def test_bfloat16_centroid_scores_keep_decoding_exact_and_results_equal(corpus, monkeypatch,
                                                                        native):
    """Where the CPU multiplies bfloat16 natively the search state holds the centroids in
    bfloat16 (exact for centroids on the int8 grid): decompression gives the float32 state's
    vectors bit for bit, an unpruned search the same hits, and a default search ranks with
    centroid scores within bfloat16 rounding of float32's. Off-grid centroids stay float32.
    ``native=False`` forces the float32 state; ``native=True`` the bfloat16 one (it runs,
    more slowly, on any CPU)."""
    from colengine import devices

    idx = PlaidIndex.build(corpus[:120], nbits=2, seed=0)
    q = _queries(corpus[:120], n=5)
    monkeypatch.setattr(devices, "native_bf16_matmul", lambda dev: False)
    idx._state = None
    st32 = idx._search_state()
    want_all = idx.search(q, k=10, **ALL)
    want = idx.search(q, k=10)
    monkeypatch.setattr(devices, "native_bf16_matmul", lambda dev: native and dev.type == "cpu")
    idx._state = idx._state_c = None   # (the centroid tensor is kept across states)
    st = idx._search_state()
    assert st.centroids.dtype == (torch.bfloat16 if native else torch.float32)
    assert torch.equal(st.centroids.float(), st32.centroids)
    rows = torch.arange(idx.n_rows)
    assert torch.equal(st.decompress(rows)[0], st32.decompress(rows)[0])
    got_all = idx.search(q, k=10, **ALL)
    for g, w in zip(got_all, want_all):
        assert [h.doc_id for h in g] == [h.doc_id for h in w]
        np.testing.assert_allclose([h.score for h in g], [h.score for h in w], rtol=0, atol=1e-6)
    # default knobs: the exact scores of whatever both return agree; the candidates may
    # differ only where bfloat16 moved a centroid score across a cut
    got = idx.search(q, k=10)
    overlap = np.mean([len({h.doc_id for h in g} & {h.doc_id for h in w}) / max(1, len(w))
                       for g, w in zip(got, want)])
    assert overlap >= 0.9
    for g, w in zip(got, want):
        ws = {h.doc_id: h.score for h in w}
        for h in g:
            if h.doc_id in ws:
                assert abs(h.score - ws[h.doc_id]) < 1e-5
    # centroids off the grid are not exact in bfloat16: float32 whatever the CPU
    off = idx.centroids.astype(np.float32) + np.float32(1e-3)
    idx.centroids = off.astype(np.float16)
    idx._state = None
    assert idx._search_state().centroids.dtype == torch.float32


@pytest.mark.parametrize("tamper", ["exponent", "minus128", "dtype", "shape"])
def test_bad_stored_centroids_are_a_format_error(index, tmp_path, tamper):
    from colengine.storage import load_bundle, save_bundle

    path, _ = _saved(index, tmp_path)
    b = load_bundle(path, mmap=False)
    q, e = b.arrays["centroid_q"].copy(), b.arrays["centroid_exponents"].copy()
    if tamper == "exponent":
        e[0] = 100
    elif tamper == "minus128":
        q[0, 0] = -128
    elif tamper == "dtype":
        q = q.astype(np.int16)
    else:
        e = e[:-1]
    b.arrays["centroid_q"], b.arrays["centroid_exponents"] = q, e
    save_bundle(tmp_path / "bad", b)
    with pytest.raises(IndexFormatError, match="centroid"):
        PlaidIndex.load(tmp_path / "bad")


# -- add / delete ------------------------------------------------------------------------
def test_add_and_delete_match_exhaustive_over_decompressed(corpus):
    base = PlaidIndex.build(corpus[:200], [f"d{i}" for i in range(200)], seed=0)
    new_ids = base.add(corpus[200:], [f"d{i}" for i in range(200, len(corpus))])
    assert new_ids[0] == "d200" and len(base) == len(corpus)
    with pytest.raises(DuplicateIdError):
        base.add(corpus[:1], ["d0"])
    gone = [f"d{i}" for i in range(0, len(corpus), 3)]
    base.delete(gone)
    with pytest.raises(UnknownIdError):
        base.delete(["d0"])
    assert len(base) == len(corpus) - len(gone)
    q = _queries(corpus, n=5)
    got = base.search(q, k=10, **ALL)
    ref_ids, ref_scores = einsum_topk(q, base.decompressed(), 10)
    for b, hits in enumerate(got):
        assert [h.doc_id for h in hits] == [base.ids[i] for i in ref_ids[b]]
        assert not {h.doc_id for h in hits} & set(gone)
    emb = base.embeddings_of(["d1", "d250"])
    assert emb[0].shape == corpus[1].shape and emb[1].shape == corpus[250].shape
    assert np.abs(emb[0].astype(np.float32) - corpus[1]).max() < 0.5


def test_index_registered():
    from colengine.index import INDEX_KINDS

    assert INDEX_KINDS["plaid"] is PlaidIndex


# -- k beyond the corpus, and queries whose probed lists hold nothing live (issue 11 / 12) -----
@pytest.mark.parametrize("k", [300, 1000])
def test_k_at_least_the_live_count_returns_every_live_document(corpus, k):
    """Before: ``search -k 1000`` on a 300-document index returned 299 (probing missed one)."""
    idx = PlaidIndex.build(corpus, [f"d{i}" for i in range(len(corpus))], nbits=2, seed=0)
    q = _queries(corpus, n=3)
    for hits in idx.search(q, k=k):                          # default knobs
        assert sorted(h.doc_id for h in hits) == sorted(f"d{i}" for i in range(len(corpus)))
    ref_ids, ref_scores = einsum_topk(q, idx.decompressed(), len(corpus))
    got = idx.search(q, k=k)
    for b, hits in enumerate(got):
        np.testing.assert_allclose([h.score for h in hits], ref_scores[b].numpy(), atol=1e-3)
    idx.delete([f"d{i}" for i in range(0, 300, 7)])
    live = {f"d{i}" for i in range(300) if i % 7}
    for hits in idx.search(q, k=k):
        assert {h.doc_id for h in hits} == live and len(hits) == len(live)


def _two_groups(n=60, dim=32, seed=3):
    """Documents near e0 (group a) and near e1 (group b): disjoint centroids."""
    rng = np.random.default_rng(seed)
    out = []
    for axis in (0, 1):
        for _ in range(n):
            x = rng.standard_normal((6, dim)).astype(np.float32) * 0.05
            x[:, axis] += 1.0
            out.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return out


def test_query_with_no_live_candidate_neither_crashes_nor_empties_the_batch():
    """Before: ``ValueError: range() arg 3 must not be zero`` in stage 3 when every probed list
    held only deleted documents, and the other queries of the batch got nothing."""
    docs = _two_groups()
    idx = PlaidIndex.build(docs, [f"a{i}" for i in range(60)] + [f"b{i}" for i in range(60)],
                           nbits=2, seed=0)
    idx.delete([f"a{i}" for i in range(60)])
    qa, qb = np.zeros((4, 32), np.float32), np.zeros((4, 32), np.float32)
    qa[:, 0], qb[:, 1] = 1.0, 1.0
    batch = torch.from_numpy(np.stack([qa, qb]))
    knobs = {"n_probe": 1, "n_candidates": 8, "n_exact": 8}
    assert all(h.doc_id.startswith("b") for h in idx.search(batch[:1], k=5, **knobs)[0])
    both = idx.search(batch, k=5, **knobs)
    alone = idx.search(batch[1:], k=5, **knobs)[0]
    assert all(h.doc_id.startswith("b") for h in both[0])     # only what exists, maybe nothing
    assert [h.doc_id for h in both[1]] == [h.doc_id for h in alone] and len(alone) == 5


def test_unpruned_search_is_chunked_by_its_pair_count(corpus):
    """Found on the GPU: ``centroid_score_threshold=None`` expands every (query token, posting)
    pair of the whole batch at once (46 GiB for 300 SciFact queries). The batch is now cut so
    that the pairs stay bounded, with the same results."""
    from colengine.index.plaid.search import _PAIR_BUDGET, query_chunk

    cpu = torch.device("cpu")
    assert query_chunk(100, 32, cpu) > 1
    assert query_chunk(100, 32, cpu, n_postings=10**6) == 1
    assert query_chunk(100, 32, cpu, n_postings=1000) * 32 * 1000 <= _PAIR_BUDGET
    # the compiled CPU stages are bounded by the centroid scores only
    assert query_chunk(10**6, 32, cpu, n_centroids=16_384) == 4
    assert query_chunk(10**6, 32, cpu, n_centroids=131_072) == 1
    idx = PlaidIndex.build(corpus, nbits=2, seed=0)
    q = _queries(corpus, n=8)
    for knobs in (ALL, {}):   # ({}: the compiled stages, the whole batch in one chunk)
        batch = idx.search(q, k=5, **knobs)
        one_by_one = [idx.search(q[i:i + 1], k=5, **knobs)[0] for i in range(q.shape[0])]
        for got, want in zip(batch, one_by_one):
            assert_hits_close(got, want)


# -- sparse stage 2 ----------------------------------------------------------------------
@pytest.mark.parametrize("n_probe,threshold,impute", [(1, 0.45, False), (3, None, False),
                                                     (2, 0.2, False), (2, 0.45, True)])
def test_sparse_stage2_equals_the_dense_one(corpus, n_probe, threshold, impute, monkeypatch):
    """Above _DENSE_M cells stage 2 works on the union of the probed lists; with the bound set
    to 0 every batch takes that path. It must keep the same scores and only candidates the
    dense path scores the same (stage-2 scores tie a lot, so which of equal documents are kept
    may differ), tombstones and a metadata filter included."""
    from colengine.index.plaid import search as sm

    idx = PlaidIndex.build(corpus, nbits=2, seed=1)
    idx.delete([str(i) for i in range(0, len(corpus), 7)])
    st = idx._search_state()
    q = clustered_queries(corpus, n=6, lq=8, seed=4)
    qvalid = torch.arange(8).unsqueeze(0) < torch.tensor([8, 5, 8, 1, 8, 7]).unsqueeze(1)
    S = _centroid_scores(q, qvalid, st)
    allowed = torch.zeros(idx.n_rows, dtype=torch.bool)
    allowed[::2] = True
    for allow in (None, allowed):
        args = (S, qvalid, st, n_probe, threshold)
        every = sm._stage2(*args, idx.n_rows, allow, impute)   # every candidate, dense
        monkeypatch.setattr(sm, "_DENSE_M", 0)
        got = sm._stage2(*args, 40, allow, impute)
        monkeypatch.undo()
        want = sm._stage2(*args, 40, allow, impute)
        w = want[0].shape[1]
        np.testing.assert_allclose(got[0][:, :w].numpy(), want[0].numpy(), rtol=1e-6)
        for b in range(6):
            full = dict(zip(every[1][b].tolist(), every[0][b].tolist()))
            for v, d in zip(got[0][b].tolist(), got[1][b].tolist()):
                if d >= 0:
                    assert abs(full[d] - v) < 1e-5
                    assert st.live is None or bool(st.live[d])
                    assert allow is None or bool(allow[d])



def test_expand_blocks_cover_the_expansion_in_order():
    """The lists' expansion, whole and in blocks, yields exactly each row's postings, row by
    row, whatever the budget (empty rows, a row longer than the budget, a budget larger than
    everything), from a buffer whose lists have gaps between them and are out of order."""
    from types import SimpleNamespace

    from colengine.index.plaid import search as sm

    starts = torch.tensor([20, 3, 5, 0, 17, 12])
    lens = torch.tensor([3, 0, 7, 1, 0, 4])
    st = SimpleNamespace(ivf_starts=starts, ivf_lens=lens, ivf_docs=torch.arange(100, 125))
    rows = torch.tensor([2, 0, 1, 5, 3, 2, 4])
    want_rep = [j for j, r in enumerate(rows.tolist()) for _ in range(int(lens[r]))]
    want = [100 + int(starts[r]) + i for r in rows.tolist() for i in range(int(lens[r]))]
    rep, got, got_lens = sm._expand(st, rows)
    assert rep.tolist() == want_rep and got.tolist() == want
    assert got_lens.tolist() == lens[rows].tolist()
    for budget in (1, 2, 4, 7, 100):
        got_rows, got_vals = [], []
        for sl, r, v in sm._expand_blocks(st, rows, budget):
            got_rows.append(torch.arange(sl.start, sl.stop)[r])
            got_vals.append(v)
        assert torch.cat(got_rows).tolist() == want_rep
        assert torch.cat(got_vals).tolist() == want
    assert list(sm._expand_blocks(st, torch.tensor([1, 4]), 3)) == []


@pytest.mark.parametrize("dense", [True, False])
def test_stage2_in_small_pair_blocks_equals_one_block(corpus, dense, monkeypatch):
    """Stage 2 expands (entry, document) pairs in blocks of _PAIR_BLOCK and accumulates the
    maxima: with tiny blocks it returns the same scores and documents as with one block."""
    from colengine.index.plaid import search as sm

    idx = PlaidIndex.build(corpus, nbits=2, seed=1)
    idx.delete([str(i) for i in range(0, len(corpus), 5)])
    st = idx._search_state()
    q = clustered_queries(corpus, n=4, lq=8, seed=2)
    qvalid = torch.arange(8).unsqueeze(0) < torch.tensor([8, 3, 8, 6]).unsqueeze(1)
    S = _centroid_scores(q, qvalid, st)
    if not dense:
        monkeypatch.setattr(sm, "_DENSE_M", 0)
    for impute in (False, True):
        want = sm._stage2(S, qvalid, st, 2, 0.3, 30, None, impute)
        monkeypatch.setattr(sm, "_PAIR_BLOCK", 7)
        got = sm._stage2(S, qvalid, st, 2, 0.3, 30, None, impute)
        monkeypatch.setattr(sm, "_PAIR_BLOCK", 1 << 20)
        np.testing.assert_allclose(got[0].numpy(), want[0].numpy(), rtol=1e-6)
        assert torch.equal(got[1], want[1])

def _centroid_scores(q, qvalid, st):
    """Stage 2's input: every centroid's score with every (query, token), ``[K, B, Lq]``
    (padded query tokens zeroed)."""
    return torch.einsum("kd,bld->kbl", st.centroids.float(), q * qvalid.unsqueeze(2)).contiguous()


@pytest.mark.parametrize("n_probe", [1, 2])
@pytest.mark.parametrize("impute,threshold", [(True, 0.45), (False, 0.45), (False, 0.2),
                                              (False, None)])
def test_stage2_scores_follow_their_definition(corpus, n_probe, impute, threshold):
    """A candidate's stage-2 score is sum over valid query tokens i of max(floor_i, the best
    kept centroid of the document for i), where kept = the n_probe best centroids of i plus
    (without impute) every centroid scoring >= threshold, and floor_i = 0, or with impute
    max(0, the (n_probe + 1)-th best centroid score of i: the most an unprobed centroid can
    score) and only the probed centroids kept;
    checked against a plain loop over the documents' centroid sets, padded query tokens
    included."""
    from colengine.index.plaid import search as sm

    idx = PlaidIndex.build(corpus, nbits=2, seed=1)
    st = idx._search_state()
    q = clustered_queries(corpus, n=3, lq=6, seed=9)
    lens = [6, 4, 1]
    qvalid = torch.arange(6).unsqueeze(0) < torch.tensor(lens).unsqueeze(1)
    vals, pos = sm._stage2(_centroid_scores(q, qvalid, st), qvalid, st, n_probe, threshold,
                           idx.n_rows, None, impute)
    S = q @ st.centroids.float().T                                           # [B, Lq, K]
    top = S.topk(n_probe, dim=2)
    nxt = S.sort(dim=2, descending=True).values[:, :, n_probe]   # best unprobed score
    codes = np.asarray(idx.codes).astype(np.int64)
    off = np.asarray(idx.doc_offsets)
    for b in range(3):
        n = lens[b]
        probed = [set(top.indices[b, i].tolist()) for i in range(n)]
        everything = set(range(idx.n_centroids))
        kept = probed if impute else [
            everything if threshold is None else
            p | set(torch.nonzero(S[b, i] >= threshold).view(-1).tolist())
            for i, p in enumerate(probed)]
        floor = nxt[b, :n].clamp(min=0) if impute else torch.zeros(n)
        seen = set()
        for v, d in zip(vals[b].tolist(), pos[b].tolist()):
            if d < 0:
                continue
            seen.add(d)
            cents = set(codes[off[d]:off[d + 1]].tolist())
            assert any(cents & p for p in probed)          # a candidate of a probed list
            want = sum(max([float(floor[i])] + [float(S[b, i, c]) for c in cents & kept[i]])
                       for i in range(n))
            assert abs(v - want) < 1e-4
        # every document of a probed list is a candidate
        assert seen == {d for d in range(len(off) - 1)
                        if any(set(codes[off[d]:off[d + 1]].tolist()) & p for p in probed)}


def test_stage4_decoded_in_the_kernel_equals_decompressed_blocks(corpus, monkeypatch):
    """On the CPU the kernel decodes stage 4's survivors chunk by chunk itself
    (SearchState.decode); elsewhere they are decompressed in blocks first. Same scores, same
    hits, for a batch with nothing pruned and at default knobs."""
    from colengine.index.plaid import search as sm

    idx = PlaidIndex.build(corpus, nbits=2, seed=0)
    q = _queries(corpus, n=5)
    want_all = idx.search(q, k=10, **ALL)
    want = idx.search(q, k=10)
    monkeypatch.setattr(sm, "_torch_backend", lambda st: False)
    for got_hits, want_hits in ((idx.search(q, k=10, **ALL), want_all),
                                (idx.search(q, k=10), want)):
        for g, w in zip(got_hits, want_hits):
            assert [h.doc_id for h in g] == [h.doc_id for h in w]
            np.testing.assert_allclose([h.score for h in g], [h.score for h in w], atol=1e-5)


@pytest.mark.parametrize("rows", [1 << 14, 7])
def test_stage3_scores_follow_their_definition(corpus, rows, monkeypatch):
    """A candidate's stage-3 score is sum over query tokens i of max over the document's
    centroids c of S[c, b, i] (no pruning, no floor); -1 candidates and documents without
    tokens score -inf. Checked against a plain loop for a batch whose candidate lists repeat
    documents and hold gaps, in one chunk and in chunks of at most 7 gathered rows (each
    chunk pads its lists to the longest one)."""
    from colengine.index.plaid import search as sm

    monkeypatch.setattr(sm, "_STAGE3_ROWS", rows)
    idx = PlaidIndex.build(corpus, nbits=2, seed=1)
    idx.add([np.zeros((0, corpus[0].shape[1]), np.float32)], ["empty"])
    st = idx._search_state()
    empty = idx.n_rows - 1
    q = clustered_queries(corpus, n=3, lq=5, seed=4)
    qvalid = torch.ones(3, 5, dtype=torch.bool)
    SK = _centroid_scores(q, qvalid, st)
    rng = np.random.default_rng(0)
    pos = torch.from_numpy(rng.integers(0, idx.n_rows - 1, size=(3, 12)))
    pos[0, 3] = pos[0, 7] = pos[1, 2]      # repeated documents, within and across queries
    pos[1, 5] = pos[2, 0] = -1
    pos[2, 4] = empty
    vals, sel = sm._stage3(SK, pos, st, 12)
    codes = np.asarray(idx.codes).astype(np.int64)
    off = np.asarray(idx.doc_offsets)
    for b in range(3):
        want = {}
        for d in pos[b].tolist():
            if d < 0:
                continue
            cents = sorted(set(codes[off[d]:off[d + 1]].tolist()))
            want[d] = (sum(max(float(SK[c, b, i]) for c in cents) for i in range(5))
                       if cents else float("-inf"))
        got = [(d, v) for d, v in zip(sel[b].tolist(), vals[b].tolist()) if d >= 0]
        assert {d for d, _ in got} == {d for d, v in want.items() if v > float("-inf")}
        for d, v in got:
            assert abs(v - want[d]) < 1e-4
        assert vals[b].tolist() == sorted(vals[b].tolist(), reverse=True)


def test_stage2_probes_one_centroid_per_token_even_when_scores_tie(corpus):
    """n_probe = 1 probes exactly one centroid per valid query token, the lowest-numbered of
    equal best ones: a zero query token ties every centroid at 0 and must neither probe nor
    keep them all (kept entries stay the probed one plus those above the threshold)."""
    from colengine.index.plaid import search as sm

    idx = PlaidIndex.build(corpus, nbits=2, seed=1)
    st = idx._search_state()
    q = clustered_queries(corpus, n=2, lq=5, seed=3)
    q[1, 2] = 0.0                                  # a valid token that scores 0 everywhere
    qvalid = torch.arange(5).unsqueeze(0) < torch.tensor([5, 4]).unsqueeze(1)
    SK = _centroid_scores(q, qvalid, st)
    for impute, threshold in ((False, 0.45), (True, 0.45), (False, None)):
        (pb, pi, pc), (eb, ei, ec, ev), _ = sm._entries(SK, qvalid, 1, threshold, impute)
        assert sorted(zip(pb.tolist(), pi.tolist())) == [(0, i) for i in range(5)] + \
            [(1, i) for i in range(4)]
        want = SK.argmax(dim=0)                    # torch's argmax: the first of equal maxima
        assert torch.equal(pc, want[pb, pi])
        assert int(pc[(pb == 1) & (pi == 2)]) == 0
        zero_token = (eb == 1) & (ei == 2)
        n_kept = int(zero_token.sum())
        assert n_kept == (idx.n_centroids if threshold is None else 1)
        torch.testing.assert_close(ev, SK[ec, eb, ei])


def test_score_by_ids_equals_einsum_over_the_decompressed_documents(index, corpus):
    """Index.score (reranking through the index protocol) against an independent einsum MaxSim
    over the same documents: PLAID's decompressed vectors, exhaustive's stored ones."""
    from conftest import einsum_maxsim

    q = _queries(corpus, n=3)
    ids = ["d7", "d0", "d123", "d42"]
    ex = ExhaustiveIndex.build(corpus, [f"d{i}" for i in range(len(corpus))])
    for idx in (index, ex):
        got = idx.score(q, ids).numpy()
        mats = [m.astype(np.float32) for m in idx.embeddings_of(ids)]
        want = np.stack([einsum_maxsim(q[b].numpy(), mats) for b in range(q.shape[0])])
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    pos = np.asarray(ex.ids.positions(ids))
    np.testing.assert_allclose(ex.score_positions(q, np.stack([pos, pos[::-1], -np.ones_like(pos)])
                                                  [[0, 1, 2]]).numpy()[:2],
                               np.stack([ex.score(q, ids)[0].numpy(), ex.score(q, ids[::-1])[1].numpy()]),
                               rtol=1e-5)
    for idx in (index, ex):
        with pytest.raises(UnknownIdError):
            idx.score(q, ["d1", "nope"])
        with pytest.raises(TypeError):
            idx.score(q, "d1")


@pytest.mark.parametrize("kind", ["flat", "hnsw", "groups"])
def test_centroid_index_kinds_assign_the_nearest_centroid(kind, monkeypatch):
    """Each of the centroid indexes token assignment uses (exact scan, HNSW, two-level groups
    by the number of centroids) gives the arg-max centroid for nearly every token (the exact
    scan for every one), and a miss is a near-best centroid, never a far one."""
    import faiss

    from colengine.index.plaid import centroids as cm

    rng = np.random.default_rng(0)
    C = rng.standard_normal((2048, 32)).astype(np.float32)
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    if kind != "flat":
        monkeypatch.setattr(cm, "HNSW_MIN_CENTROIDS", 1024)
    if kind == "groups":   # 32 groups of ~64 centroids, 8 probed: not an exhaustive scan
        monkeypatch.setattr(cm, "IVF_MIN_CENTROIDS", 1024)
        monkeypatch.setattr(cm, "_GROUP_SIZE", 64)
    index = cm.centroid_index(C)
    want = {"flat": faiss.IndexFlatIP, "hnsw": faiss.IndexHNSWFlat,
            "groups": cm.CentroidGroups}[kind]
    assert isinstance(index, want)
    x = C[rng.integers(0, C.shape[0], 3000)] + 0.05 * rng.standard_normal((3000, 32)).astype(np.float32)
    got = cm.assign(torch.from_numpy(x), torch.from_numpy(C), index).numpy()
    S = x @ C.T
    share = float(np.mean(got == S.argmax(axis=1)))
    assert share == 1.0 if kind == "flat" else share >= 0.95
    assert np.all(S[np.arange(x.shape[0]), got] >= S.max(axis=1) - 0.25)


def test_centroid_groups_probe_the_best_groups_and_find_the_best_centroid_in_them():
    """:class:`CentroidGroups` against a plain reference: the centroid it gives each token is
    the best (by inner product) among the centroids of the ``n_probe`` groups whose centres
    score highest for that token; probing every group is the exact arg-max; the answer does
    not depend on the block size."""
    from colengine.index.plaid.centroids import CentroidGroups

    rng = np.random.default_rng(3)
    C = rng.standard_normal((1000, 24)).astype(np.float32)
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    x = rng.standard_normal((700, 24)).astype(np.float32)
    g = CentroidGroups(C, group_size=50, n_probe=3, block=128)
    got = g.nearest(torch.from_numpy(x)).numpy()
    heads = g.heads.numpy()
    member_group = np.empty(C.shape[0], dtype=np.int64)
    for j in range(heads.shape[0]):
        member_group[g.order.numpy()[g.starts[j]:g.starts[j + 1]]] = j
    assert np.array_equal(member_group, (C @ heads.T).argmax(axis=1))   # each in its best group
    S = x @ C.T
    for t in range(x.shape[0]):
        probed = np.argsort(-(x[t] @ heads.T), kind="stable")[:3]
        allowed = np.flatnonzero(np.isin(member_group, probed))
        assert np.isin(got[t], allowed)
        assert S[t, got[t]] >= S[t, allowed].max() - 1e-5
    assert np.array_equal(CentroidGroups(C, group_size=50, n_probe=3, block=4096)
                          .nearest(torch.from_numpy(x)).numpy(), got)
    exact = CentroidGroups(C, group_size=50, n_probe=heads.shape[0], block=100)
    assert np.array_equal(exact.nearest(torch.from_numpy(x)).numpy(), S.argmax(axis=1))



def test_centroid_groups_with_duplicate_centroids_have_no_empty_group():
    """Many equal centroids (5 distinct among 600) give k-means equal group centres, and all
    but one of those would get no member: such groups are dropped, so probing never lands on
    an empty group, and every token still gets a centroid scoring the best among all."""
    from colengine.index.plaid.centroids import CentroidGroups

    rng = np.random.default_rng(5)
    base = rng.standard_normal((5, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    C = base[rng.integers(0, 5, 600)]
    g = CentroidGroups(C, group_size=50, n_probe=3)
    assert np.all(np.diff(g.starts) > 0) and len(g.starts) == g.heads.shape[0] + 1
    x = rng.standard_normal((200, 16)).astype(np.float32)
    got = g.nearest(torch.from_numpy(x)).numpy()
    S = x @ C.T
    np.testing.assert_allclose(S[np.arange(200), got], S.max(axis=1), atol=1e-5)

def test_kmeans_through_an_inverted_file_reaches_the_exact_scans_objective(monkeypatch):
    """From ``IVF_MIN_CENTROIDS`` on k-means assigns through an inverted file: its centroids
    are unit vectors and their objective (mean best inner product of the points) stays within
    0.5% of k-means with exact assignments on the same data."""
    from colengine.index.plaid import centroids as cm

    rng = np.random.default_rng(4)
    centres = rng.standard_normal((64, 32)).astype(np.float32)
    x = centres[rng.integers(0, 64, 20000)]
    x += 0.3 * rng.standard_normal((20000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    exact = cm.train_centroids(x, 512, niter=4, seed=0)
    monkeypatch.setattr(cm, "IVF_MIN_CENTROIDS", 256)
    monkeypatch.setattr(cm, "HNSW_MIN_CENTROIDS", 256)
    monkeypatch.setattr(cm, "_KMEANS_IVF_NPROBE", 2)      # 8 lists, 2 probed
    ivf = cm.train_centroids(x, 512, niter=4, seed=0)
    np.testing.assert_allclose(np.linalg.norm(ivf, axis=1), 1.0, atol=1e-4)
    objective = [float((x @ c.T).max(axis=1).mean()) for c in (exact, ivf)]
    assert objective[1] >= 0.995 * objective[0]


@settings(max_examples=60, deadline=None)
@given(p=hst.integers(1, 5), extra=hst.integers(-40, 1500), m=hst.integers(1, 6),
       levels=hst.sampled_from([3, 50, None]), seed=hst.integers(0, 2**16))
def test_top_cells_equal_topk_along_the_centroids(p, extra, m, levels, seed):
    """Stage 2's top-p cells per query token (ranked within the best blocks of centroids from
    512 p centroids on; below, torch.topk itself) against ``torch.topk`` along the centroids:
    the same sorted values, and distinct cells per column that hold them (which of equal
    scores is taken is unspecified: few distinct levels force ties)."""
    from colengine.index.plaid.search import _TOP_BLOCK, _top_cells

    k = 8 * _TOP_BLOCK * p + extra
    g = torch.Generator().manual_seed(seed)
    S = (torch.randint(0, levels, (k, m), generator=g).float() if levels
         else torch.randn(k, m, generator=g))
    vals, idx = _top_cells(S, p)
    want = S.topk(p, dim=0)
    assert vals.shape == idx.shape == (p, m)
    torch.testing.assert_close(vals, want.values, rtol=0, atol=0)
    torch.testing.assert_close(S.gather(0, idx), vals, rtol=0, atol=0)
    for c in range(m):
        assert len(set(idx[:, c].tolist())) == p
