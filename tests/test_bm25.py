"""BM25 first stage: analyzer per script, scoring, add/delete, save/load without pickles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from colengine.bm25 import Analyzer, BM25Index, resolve_language
from colengine.errors import DuplicateIdError, IndexFormatError, UnknownIdError
from colengine.storage import Bundle, load_bundle, save_bundle

DOCS = [
    "The cat sat on the mat.",
    "Dogs and cats are pets; a dog's bark is loud.",
    "Quantum computing uses qubits.",
    "Cats chase mice, mice eat cheese.",
    "Stock markets rose 3.5 percent.",
]
IDS = ["d0", "d1", "d2", "d3", "d4"]


def ranked(idx, q, k=10):
    return [h.doc_id for h in idx.search([q], k)[0]]


def test_english_analyzer_matches_lucene_choices():
    a = Analyzer("en")
    assert a("The cats were running; the dog's bark.") == ["cat", "were", "run", "dog", "bark"]
    assert a("3.5 mg COVID-19") == ["3.5", "mg", "covid", "19"]
    assert a("") == []


def test_arabic_normalisation_stopwords_and_stemming():
    a = Analyzer("ar")
    # harakat removed, hamza-alef folded, stopword "من" dropped, definite article stemmed off
    assert a("وَخَيْرُ أَعْمَامِي") == a("وخير اعمامي")
    toks = a("من هو عبد المطلب")
    assert "من" not in toks and "هو" not in toks
    assert "مطلب" in toks  # "المطلب" -> "مطلب" by the Arabic Snowball stemmer


def test_cjk_and_thai_are_bigrammed():
    assert Analyzer("zh")("检索系统") == ["检索", "索系", "系统"]
    assert Analyzer("ja")("東京タワー") == ["東京", "京タ", "タワ", "ワー"]
    assert Analyzer("zh")("中") == ["中"]
    th = Analyzer("th")("ภาษาไทย")
    assert th[0] == "ภา" and all(len(t) >= 2 for t in th)
    # a tone mark stays with its consonant (grapheme clusters)
    assert "ง่า" in Analyzer("th")("ง่าย")
    # mixed scripts in one string: Latin words are kept whole
    assert Analyzer("zh")("BM25检索") == ["bm25", "检索"]


def test_language_names_and_errors():
    assert resolve_language("Arabic") == "ar" and resolve_language("en-US") == "en"
    assert resolve_language(None) == "none"
    with pytest.raises(ValueError, match="unsupported BM25 language"):
        Analyzer("klingon")


def test_scores_equal_lucene_bm25_formula():
    idx = BM25Index.build(DOCS, IDS, show_progress=False)
    a = Analyzer("en")
    toks = [a(d) for d in DOCS]
    n, avg = len(DOCS), sum(map(len, toks)) / len(DOCS)
    k1, b = 0.9, 0.4
    q = "cat mice"
    expect = []
    for t in toks:
        s = 0.0
        for term in a(q):
            df = sum(term in u for u in toks)
            tf = t.count(term)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            s += idf * tf / (tf + k1 * (1 - b + b * len(t) / avg))
        expect.append(s)
    np.testing.assert_allclose(idx.scores(q), expect, rtol=1e-5)
    hits = idx.search([q], 10)[0]
    assert [h.doc_id for h in hits] == ["d3", "d0", "d1"]  # d3 has cat + mice twice
    assert all(h.score > 0 for h in hits)  # non-matching documents are left out


def test_search_validation_and_empty_queries():
    idx = BM25Index.build(DOCS, IDS, show_progress=False)
    assert idx.search(["the of and"], 5) == [[]]  # only stopwords
    assert idx.search(["zzzz"], 5) == [[]]
    assert idx.search([], 5) == []
    with pytest.raises(ValueError):
        idx.search(["cat"], 0)
    with pytest.raises(TypeError):
        idx.search("cat", 5)
    with pytest.raises(ValueError, match="empty corpus"):
        BM25Index.build([], [])
    with pytest.raises(DuplicateIdError):
        BM25Index.build(["a", "b"], ["x", "x"])
    with pytest.raises(TypeError, match="unknown BM25 parameters"):
        BM25Index.build(DOCS, IDS, k3=1.0)


def test_ties_are_broken_by_insertion_order():
    idx = BM25Index.build(["apple pie", "apple pie", "pear"], ["z", "a", "m"], show_progress=False)
    assert ranked(idx, "apple") == ["z", "a"]


def test_add_equals_fresh_build():
    idx = BM25Index.build(DOCS[:3], IDS[:3], show_progress=False)
    assert idx.add(DOCS[3:], IDS[3:]) == IDS[3:]
    fresh = BM25Index.build(DOCS, IDS, show_progress=False)
    assert len(idx) == 5
    for q in ["cat mice", "stock percent", "qubits", "dog bark"]:
        assert idx.search([q], 10) == fresh.search([q], 10)
    with pytest.raises(DuplicateIdError):
        idx.add(["again"], ["d0"])
    assert idx.add(["default ids continue"]) == ["5"]


def test_delete_equals_fresh_build_and_unknown_id_changes_nothing():
    idx = BM25Index.build(DOCS, IDS, show_progress=False)
    before = idx.search(["cat"], 10)
    with pytest.raises(UnknownIdError):
        idx.delete(["d0", "nope"])
    assert idx.search(["cat"], 10) == before and len(idx) == 5
    idx.delete(["d0", "d3"])
    fresh = BM25Index.build([DOCS[i] for i in (1, 2, 4)], ["d1", "d2", "d4"], show_progress=False)
    for q in ["cat mice", "stock", "qubits dog"]:
        assert idx.search([q], 10) == fresh.search([q], 10)
    assert "d0" not in ranked(idx, "cat mat")
    with pytest.raises(ValueError, match="empty"):
        idx.delete(["d1", "d2", "d4"])


def test_bundle_round_trip_without_pickles(tmp_path):
    texts = DOCS + ["检索系统很好", "ภาษาไทยง่าย", "عبد المطلب بن هاشم"]
    ids = IDS + ["zh", "th", "ar"]
    idx = BM25Index.build(texts, ids, language="en", show_progress=False, k1=1.2, b=0.75)
    b = idx.to_bundle()
    for name, arr in b.arrays.items():
        assert arr.dtype != object and all(c.isalnum() or c in "_.-" for c in name), name
    save_bundle(tmp_path / "bm25", b)
    # a plain np.load with allow_pickle=False reads every array
    for f in (tmp_path / "bm25").rglob("*.npy"):
        np.load(f, allow_pickle=False)
    loaded = BM25Index.from_bundle(load_bundle(tmp_path / "bm25", kind="bm25"))
    assert len(loaded) == len(idx) and loaded.params["k1"] == 1.2 and loaded.params["b"] == 0.75
    for q in ["cat mice", "系统", "ไทย", "المطلب", "stock 3.5"]:
        assert loaded.search([q], 10) == idx.search([q], 10), q
    # the loaded (memory-mapped) index still mutates
    loaded.add(["a new cat"], ["new"])
    assert "new" in ranked(loaded, "cat")
    loaded.delete(["zh"])
    assert ranked(loaded, "系统") == []


def test_from_bundle_rejects_inconsistent_arrays():
    b = BM25Index.build(DOCS, IDS, show_progress=False).to_bundle()
    bad = Bundle(b.kind, b.meta, {**b.arrays, "doc_offsets": b.arrays["doc_offsets"][:-1]})
    with pytest.raises(IndexFormatError):
        BM25Index.from_bundle(bad)
    missing = Bundle(b.kind, b.meta, {k: v for k, v in b.arrays.items() if k != "vocab_utf8"})
    with pytest.raises(IndexFormatError):
        BM25Index.from_bundle(missing)


@pytest.mark.parametrize("method", ["lucene", "robertson", "atire"])
def test_score_matrix_equals_bm25s_builder(method):
    """The vectorised score matrix equals bm25s's own (per-document Python) builder on a
    random corpus with repeated terms, empty documents and a term in every document."""
    import bm25s

    from colengine.bm25 import score_matrix

    rng = np.random.default_rng(3)
    n_terms = 40
    lens = rng.integers(0, 30, 300)
    lens[[5, 77]] = 0
    per_doc = [list(rng.zipf(1.5, size=n) % (n_terms - 1) + 1) for n in lens]
    per_doc = [d + [0] for d in per_doc]        # term 0 is in every document (atire idf 0)
    offsets = np.zeros(len(per_doc) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in per_doc], out=offsets[1:])
    terms = np.concatenate([np.asarray(d, dtype=np.int32) for d in per_doc])
    params = {"k1": 1.2, "b": 0.75, "method": method, "delta": 0.5}
    ref = bm25s.BM25(k1=1.2, b=0.75, method=method).build_index_from_ids(
        unique_token_ids=list(range(n_terms)), corpus_token_ids=[list(map(int, d)) for d in per_doc],
        show_progress=False)
    got = score_matrix(terms, offsets, n_terms, params)

    def dense(m):
        out = np.zeros((n_terms, len(per_doc)))
        for t in range(n_terms):
            a, b = int(m["indptr"][t]), int(m["indptr"][t + 1])
            out[t, np.asarray(m["indices"][a:b])] = m["data"][a:b]
        return out

    assert got["num_docs"] == len(per_doc)
    np.testing.assert_allclose(dense(got), dense(ref), rtol=1e-5, atol=1e-6)
    for t in range(n_terms):    # documents ascending within each term, as bm25s's search expects
        seg = got["indices"][got["indptr"][t]:got["indptr"][t + 1]]
        assert np.all(np.diff(seg) > 0)


def test_bm25_scores_equal_bm25s_end_to_end():
    """BM25Index's scores equal bm25s's BM25 indexed on the same analyzer's tokens."""
    import bm25s

    texts = [f"doc {i} about {' '.join(['cells'] * (i % 4))} proteins {i % 7} and genes"
             for i in range(200)] + ["genes genes genes", "nothing but a stopword: the"]
    idx = BM25Index.build(texts, show_progress=False)
    an = Analyzer("en")
    vocab = sorted({t for x in texts for t in an(x)})
    vmap = {t: i for i, t in enumerate(vocab)}
    ref = bm25s.BM25(k1=0.9, b=0.4, method="lucene")
    ref.scores = ref.build_index_from_ids(
        unique_token_ids=list(range(len(vocab))),
        corpus_token_ids=[[vmap[t] for t in an(x)] for x in texts], show_progress=False)
    for q in ["cells proteins", "genes", "doc 3 about cells", "unknownword"]:
        ids = [vmap[t] for t in an(q) if t in vmap]
        want = ref.get_scores_from_ids(ids) if ids else np.zeros(len(texts))
        np.testing.assert_allclose(idx.scores(q), want, rtol=1e-5, atol=1e-6)
