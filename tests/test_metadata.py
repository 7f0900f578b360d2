"""Metadata store and filters: the SQL against a plain-Python model of the documents, filtered
search against exhaustive MaxSim restricted to the allowed set, persistence and atomicity."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from conftest import clustered_docs, clustered_queries, einsum_topk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colengine import FilterError, Hit, IndexFormatError, Retriever, UnknownIdError
from colengine.embeddings import PackedEmbeddings
from colengine.index.exhaustive import ExhaustiveIndex
from colengine.index.plaid import PlaidIndex
from colengine.metadata import MetadataStore, compile_filter
from colengine.testing import sample_corpus

ALL = dict(n_probe=10**9, centroid_score_threshold=None, n_candidates=10**9, n_exact=10**9)


# -- an independent reference: the filter language over a list of dicts -------------------
def _kind(v: Any) -> str:
    return ("null" if v is None else "bool" if isinstance(v, bool)
            else "number" if isinstance(v, (int, float)) else "text")


def reference(flt: Mapping[str, Any], meta: Mapping[str, Any]) -> bool:
    """What the issue's filter language means for one document's metadata dict."""
    def eq(f, v):
        return f in meta and _kind(meta[f]) == _kind(v) and meta[f] == v

    def cmp(f, op, v):
        if f not in meta or _kind(meta[f]) != _kind(v):
            return False
        a = meta[f]
        return {"$gt": a > v, "$gte": a >= v, "$lt": a < v, "$lte": a <= v}[op]

    ok = True
    for key, cond in flt.items():
        if key == "$and":
            ok = ok and all(reference(c, meta) for c in cond)
        elif key == "$or":
            ok = ok and any(reference(c, meta) for c in cond)
        elif key == "$not":
            ok = ok and not reference(cond, meta)
        elif not isinstance(cond, Mapping):
            ok = ok and eq(key, cond)
        else:
            for op, v in cond.items():
                r = {"$eq": lambda: eq(key, v), "$ne": lambda: not eq(key, v),
                     "$in": lambda: any(eq(key, x) for x in v),
                     "$nin": lambda: not any(eq(key, x) for x in v),
                     "$exists": lambda: (key in meta) == v}.get(op, lambda: cmp(key, op, v))()
                ok = ok and r
    return ok


FIELDS = ["lang", "year", "score", "flag", "tag", "nothere"]
SCALARS = [0, 1, 2, 2020, 2021, 1.5, 2020.0, -3, "en", "fr", "de", "2020", "", True, False, None]


def _docs_model(n: int = 80, seed: int = 0) -> list[tuple[str, dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        meta: dict[str, Any] = {}
        for f in FIELDS[:-1]:
            if rng.random() < 0.8:
                meta[f] = SCALARS[int(rng.integers(len(SCALARS)))]
        out.append((f"doc{i}", meta))
    return out


DOCS = _docs_model()


@pytest.fixture(scope="module")
def store():
    s = MetadataStore()
    s.add([d for d, _ in DOCS], texts=[f"text {d}" for d, _ in DOCS], metadata=[m for _, m in DOCS])
    return s


def _expected(flt) -> list[str]:
    return sorted(d for d, m in DOCS if reference(flt, m))


_scalar = st.sampled_from(SCALARS)
_ordered = st.sampled_from([0, 1, 2, 2020, 2021, 1.5, -3, "en", "fr", "2020", ""])
_field = st.sampled_from(FIELDS)
_leaf = st.one_of(
    st.builds(lambda f, v: {f: v}, _field, _scalar),
    st.builds(lambda f, op, v: {f: {op: v}}, _field, st.sampled_from(["$eq", "$ne"]), _scalar),
    st.builds(lambda f, op, v: {f: {op: v}}, _field,
              st.sampled_from(["$gt", "$gte", "$lt", "$lte"]), _ordered),
    st.builds(lambda f, op, v: {f: {op: v}}, _field, st.sampled_from(["$in", "$nin"]),
              st.lists(_scalar, max_size=4)),
    st.builds(lambda f, v: {f: {"$exists": v}}, _field, st.booleans()),
    st.builds(lambda f, a, b: {f: {"$gte": a, "$lt": b}}, _field, _ordered, _ordered),
)
_filters = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.builds(lambda xs: {"$and": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda xs: {"$or": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda x: {"$not": x}, inner),
        st.builds(lambda a, b: {**a, **b}, inner, inner),   # implicit AND of several keys
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(_filters)
def test_random_filters_match_the_python_model(store, flt):
    assert sorted(store.matching_ids(flt)) == _expected(flt)


@pytest.mark.parametrize("flt", [
    {"lang": "en"}, {"lang": {"$eq": "en"}}, {"lang": {"$ne": "en"}}, {"year": {"$gt": 2020}},
    {"year": {"$gte": 2020}}, {"year": {"$lt": 2}}, {"year": {"$lte": 2}}, {"year": 2020.0},
    {"tag": {"$in": ["en", 1, None]}}, {"tag": {"$nin": ["en", 1]}}, {"tag": {"$in": []}},
    {"flag": True}, {"flag": False}, {"flag": None}, {"flag": 1},
    {"score": {"$exists": True}}, {"score": {"$exists": False}},
    {"$and": [{"lang": "en"}, {"year": {"$gte": 0}}]}, {"$or": [{"lang": "fr"}, {"flag": True}]},
    {"$not": {"lang": "en"}}, {"$not": {"$or": [{"lang": "en"}, {"$not": {"year": 1}}]}},
    {"lang": "de", "year": {"$gt": 0, "$lt": 3}},
])
def test_each_operator_matches_the_python_model(store, flt):
    got = sorted(store.matching_ids(flt))
    assert got == _expected(flt)


def test_operators_are_not_vacuous(store):
    """The fixed model exercises each operator with a non-trivial split."""
    n = len(DOCS)
    for flt in [{"lang": "en"}, {"year": {"$gte": 2020}}, {"flag": True}, {"score": {"$exists": False}}]:
        assert 0 < len(_expected(flt)) < n


def test_unknown_field_matches_nothing_but_exists_false_matches_all(store):
    assert store.matching_ids({"nothere": "x"}) == []
    assert store.matching_ids({"nothere": {"$gt": 0}}) == []
    assert len(store.matching_ids({"nothere": {"$exists": False}})) == len(DOCS)
    assert len(store.matching_ids({"nothere": {"$ne": 1}})) == len(DOCS)


@pytest.mark.parametrize("flt, match", [
    ("lang = 'en'", "must be an object"),
    ({}, "empty filter"),
    ({"lang": {}}, "empty operator"),
    ({"$where": "1 = 1"}, "unknown top-level operator '\\$where'"),
    ({"lang": {"$where": "1"}}, "unknown operator '\\$where'"),
    ({"lang": {"$regex": "e.*"}}, "unknown operator"),
    ({"a; DROP TABLE documents": 1}, "invalid field name"),
    ({"lang' OR 1=1 --": "en"}, "invalid field name"),
    ({"a.b": 1}, "invalid field name"),
    ({"year": {"$gt": True}}, "number or a string"),
    ({"year": {"$gt": None}}, "number or a string"),
    ({"year": {"$gt": [1]}}, "must be str, int"),
    ({"year": {"$in": 3}}, "expects a list"),
    ({"year": {"$in": [[1]]}}, "must be str, int"),
    ({"year": [2020, 2021]}, "use \\{'\\$in'"),
    ({"year": {"$exists": 1}}, "true or false"),
    ({"year": float("nan")}, "finite"),
    ({"year": 2**70}, "64-bit"),
    ({"$and": []}, "non-empty list"),
    ({"$or": {"lang": "en"}}, "non-empty list"),
    ({"$not": ["x"]}, "must be an object"),
    ({"year": {"$in": list(range(1001))}}, "more than 1000"),
])
def test_invalid_filters_raise_a_named_filter_error(store, flt, match):
    with pytest.raises(FilterError, match=match):
        store.matching_ids(flt)
    assert issubclass(FilterError, ValueError)


def test_deep_nesting_is_rejected(store):
    flt: dict = {"lang": "en"}
    for _ in range(40):
        flt = {"$not": flt}
    with pytest.raises(FilterError, match="deeper"):
        store.matching_ids(flt)


@pytest.mark.parametrize("value", ["'; DROP TABLE documents; --", "en' OR '1'='1", '"', "\\",
                                   "en\x00x", "%", "_"])
def test_injection_values_are_inert(store, value):
    assert store.matching_ids({"lang": value}) == []
    assert store.matching_ids({"lang": {"$in": [value, "en"]}}) == _expected({"lang": "en"})
    assert len(store) == len(DOCS)   # the table is still there, whole


def test_values_are_bound_parameters():
    evil = "x') OR 1=1 --"
    sql, params = compile_filter({"lang": evil, "year": {"$in": [1, "a"]}})
    assert "1=1" not in sql and "x')" not in sql and evil in params


def test_store_values_are_checked(store):
    s = MetadataStore()
    with pytest.raises(ValueError, match="field name"):
        s.add(["a"], metadata=[{"bad key": 1}])
    with pytest.raises(TypeError, match="must be str, int"):
        s.add(["a"], metadata=[{"k": [1, 2]}])
    with pytest.raises(ValueError, match="finite"):
        s.add(["a"], metadata=[{"k": float("inf")}])
    with pytest.raises(TypeError, match="dict or None"):
        s.add(["a"], metadata=["x"])
    assert len(s) == 0


# -- filtered search at the index level ----------------------------------------------------
@pytest.fixture(scope="module")
def plaid_corpus():
    docs = clustered_docs(400, 32, 40, 3, 3, 40)
    return docs, PlaidIndex.build(docs, [f"d{i}" for i in range(len(docs))], nbits=2, seed=0)


def _restricted_reference(q, packed: PackedEmbeddings, mask: np.ndarray, k: int):
    """Top-k positions and scores by einsum MaxSim over the allowed documents only."""
    keep = np.flatnonzero(mask)
    sub = PackedEmbeddings.from_list([packed[int(i)] for i in keep], dtype=np.float32)
    top, scores = einsum_topk(q, sub, k)
    return [[int(keep[j]) for j in row] for row in top], scores


@pytest.mark.parametrize("share", [0.5, 0.1, 0.02])
@pytest.mark.parametrize("exact_tokens", [0, 10**9])   # the probing path and the exact path
def test_filtered_plaid_unpruned_equals_exhaustive_on_allowed(plaid_corpus, share, exact_tokens,
                                                              monkeypatch):
    docs, idx = plaid_corpus
    monkeypatch.setattr(idx, "exact_filter_tokens", exact_tokens)
    rng = np.random.default_rng(7)
    mask = rng.random(len(idx)) < share
    q = clustered_queries(docs, 5, 10, 11)
    k = 10
    ref_pos, ref_scores = _restricted_reference(q, idx.decompressed(), mask, k)
    got = idx.search(q, k=k, allowed=mask, **ALL)
    for b, hits in enumerate(got):
        assert [h.doc_id for h in hits] == [idx.ids[p] for p in ref_pos[b]]
        np.testing.assert_allclose([h.score for h in hits], ref_scores[b].numpy(), rtol=1e-4, atol=1e-3)
        assert all(mask[idx.ids.positions([h.doc_id])[0]] for h in hits)


@pytest.mark.parametrize("exact_tokens", [0, 10**9])
def test_one_percent_filter_still_returns_k_hits(exact_tokens, monkeypatch):
    docs = clustered_docs(2000, 32, 60, 5, 3, 30)
    idx = PlaidIndex.build(docs, nbits=2, seed=0)
    monkeypatch.setattr(idx, "exact_filter_tokens", exact_tokens)
    mask = np.zeros(len(idx), dtype=bool)
    mask[np.random.default_rng(1).choice(len(idx), 20, replace=False)] = True   # 1%
    q = clustered_queries(docs, 8, 10, 2)
    for hits in idx.search(q, k=10, allowed=mask):   # default knobs
        assert len(hits) == 10
        assert all(mask[idx.ids.positions([h.doc_id])[0]] for h in hits)


def test_filtered_plaid_after_delete_and_add(plaid_corpus):
    docs, base = plaid_corpus
    idx = PlaidIndex.build(docs[:300], [f"d{i}" for i in range(300)], nbits=2, seed=0)
    idx.delete([f"d{i}" for i in range(0, 300, 7)])   # tombstones stay below auto-compaction
    idx.add(docs[300:], [f"d{i}" for i in range(300, len(docs))])
    mask = np.random.default_rng(3).random(len(idx)) < 0.3
    q = clustered_queries(docs, 4, 10, 5)
    ref_pos, _ = _restricted_reference(q, idx.decompressed(), mask, 10)
    for b, hits in enumerate(idx.search(q, k=10, allowed=mask, **ALL)):
        assert [h.doc_id for h in hits] == [idx.ids[p] for p in ref_pos[b]]


def test_exact_plan_block_cache_is_reused_and_stays_right_through_add_delete_compact(
        plaid_corpus):
    """The exact plan keeps decompressed blocks between searches; after adds, deletes and a
    compaction (rows renumbered) every result still equals the reference on the allowed set."""
    docs, _ = plaid_corpus
    idx = PlaidIndex.build(docs[:300], [f"d{i}" for i in range(300)], nbits=2, seed=0)
    idx.exact_filter_tokens = 10**9
    idx.auto_compact_share = 1.0
    q = clustered_queries(docs, 3, 10, 9)
    rng = np.random.default_rng(4)

    def check(mask):
        ref_pos, ref_scores = _restricted_reference(q, idx.decompressed(), mask, 10)
        for b, hits in enumerate(idx.search(q, k=10, allowed=mask, **ALL)):
            assert [h.doc_id for h in hits] == [idx.ids[p] for p in ref_pos[b]]
            np.testing.assert_allclose([h.score for h in hits], ref_scores[b].numpy(),
                                       rtol=1e-4, atol=1e-3)

    mask = rng.random(len(idx)) < 0.6                 # ~180 allowed: two blocks
    check(mask)
    misses = idx.exact_cache_stats["misses"]
    check(mask)                                       # the same allowed rows: all cached
    assert idx.exact_cache_stats["misses"] == misses and idx.exact_cache_stats["hits"] >= misses
    idx.add(docs[300:320], [f"d{i}" for i in range(300, 320)])
    idx.delete([f"d{i}" for i in range(0, 300, 11)])
    check(np.concatenate([mask[:len(idx) - 20], np.ones(20, dtype=bool)])[:len(idx)])
    assert idx.compact() > 0                          # rows renumbered: blocks dropped
    assert not idx._exact_cache
    check(rng.random(len(idx)) < 0.6)
    idx.exact_cache_bytes = 0                         # off: same results, nothing kept
    check(mask[:len(idx)])


def test_filtered_exhaustive_equals_einsum_on_allowed(plaid_corpus):
    docs, _ = plaid_corpus
    idx = ExhaustiveIndex.build(docs)
    mask = np.random.default_rng(2).random(len(idx)) < 0.2
    q = clustered_queries(docs, 4, 10, 9)
    ref_pos, ref_scores = _restricted_reference(q, idx.docs, mask, 10)
    for b, hits in enumerate(idx.search(q, k=10, allowed=mask)):
        assert [h.doc_id for h in hits] == [idx.ids[p] for p in ref_pos[b]]
        np.testing.assert_allclose([h.score for h in hits], ref_scores[b].numpy(), atol=1e-3)
    assert idx.search(q, k=5, allowed=np.zeros(len(idx), bool)) == [[] for _ in range(4)]
    with pytest.raises(ValueError, match="bool array"):
        idx.search(q, k=5, allowed=np.ones(3, bool))


# -- the Retriever -------------------------------------------------------------------------
LANGS = ["en", "fr", "de"]


def _corpus_meta():
    corpus = sample_corpus()
    meta = [{"lang": LANGS[i % 3], "year": 2000 + i, "even": i % 2 == 0} if i % 5 else None
            for i in range(len(corpus))]
    return corpus, meta


@pytest.fixture(scope="module")
def meta_retriever(tiny_encoder):
    corpus, meta = _corpus_meta()
    return Retriever.build(corpus, [d["_id"] for d in corpus], metadata=meta, model=tiny_encoder,
                           index="plaid", nbits=2, bm25=True, show_progress=False)


def _allowed_ids(flt) -> set[str]:
    corpus, meta = _corpus_meta()
    return {d["_id"] for d, m in zip(corpus, meta) if reference(flt, m or {})}


FILTERS = [{"lang": "en"}, {"year": {"$gte": 2020}}, {"$or": [{"even": True}, {"lang": "de"}]},
           {"year": {"$in": [2003, 2011, 2029]}}]


@pytest.mark.parametrize("flt", FILTERS)
def test_retriever_filter_equals_exhaustive_on_allowed(meta_retriever, flt):
    r = meta_retriever
    allowed = _allowed_ids(flt)
    assert 0 < len(allowed) < len(r)
    q = r.encoder.encode_queries(["plants and light", "space travel"])
    dec = r.index.decompressed()
    mask = np.array([i in allowed for i in r.index.ids])
    ref_pos, _ = _restricted_reference(q, dec, mask, 5)
    got = r.search_batch(["plants and light", "space travel"], k=5, filter=flt, **ALL)
    for b, hits in enumerate(got):
        assert [h.doc_id for h in hits] == [r.index.ids[p] for p in ref_pos[b]]


@pytest.mark.parametrize("pipeline", ["bm25", "bm25+rerank", "fusion"])
def test_bm25_pipelines_honour_the_filter(meta_retriever, pipeline):
    r = meta_retriever
    flt = {"lang": "fr"}
    allowed = _allowed_ids(flt)
    hits = r.search("energy from the sun in plants", k=50, pipeline=pipeline, filter=flt)
    assert hits and {h.doc_id for h in hits} <= allowed
    if pipeline == "bm25":   # scores are the unfiltered BM25 scores of the allowed documents
        full = {h.doc_id: h.score for h in r.search("energy from the sun in plants", k=50,
                                                    pipeline="bm25")}
        assert [h.doc_id for h in hits] == [d for d in full if d in allowed]
        np.testing.assert_allclose([h.score for h in hits], [full[h.doc_id] for h in hits])


def test_return_text_metadata_and_get(meta_retriever):
    r = meta_retriever
    corpus, meta = _corpus_meta()
    by_id = {d["_id"]: (d, m) for d, m in zip(corpus, meta)}
    plain = r.search("plants", k=3)
    rich = r.search("plants", k=3, return_text=True, return_metadata=True)
    assert rich == plain   # text and metadata do not change identity
    for h in rich:
        d, m = by_id[h.doc_id]
        assert h.text == d["text"] and h.metadata == (m or {})
    assert all(h.text is None and h.metadata is None for h in plain)
    got = r.get(["doc3", "doc0"])
    assert got[0] == {"id": "doc3", "text": by_id["doc3"][0]["text"],
                      "title": by_id["doc3"][0]["title"], "metadata": by_id["doc3"][1] or {}}
    assert got[1]["metadata"] == {}   # doc0 was given None
    with pytest.raises(UnknownIdError, match="nope"):
        r.get(["doc1", "nope"])
    with pytest.raises(FilterError, match="unknown operator"):
        r.search("plants", filter={"lang": {"$like": "e%"}})
    assert r.search("plants", filter={"lang": "xx"}) == []


def test_hit_text_and_metadata_leave_equality_and_repr_alone():
    assert Hit("a", 1.0) == Hit("a", 1.0, text="x")
    assert repr(Hit("a", 1.0)) == "Hit(doc_id='a', score=1.0)"


def test_add_delete_save_load_keep_metadata_in_step(tiny_encoder, tmp_path):
    corpus, meta = _corpus_meta()
    path = tmp_path / "idx"
    r = Retriever.build(corpus[:20], [d["_id"] for d in corpus[:20]], metadata=meta[:20],
                        model=tiny_encoder, index="exhaustive", show_progress=False,
                        store_texts=False)
    r.add(corpus[20:], [d["_id"] for d in corpus[20:]], metadata=meta[20:])
    r.delete(["doc1", "doc21"])
    with pytest.raises(UnknownIdError):
        r.get(["doc21"])
    assert "text" not in r.get(["doc2"])[0]
    flt = {"year": {"$gte": 2015}}
    before = r.search("plants", k=5, filter=flt)
    assert {h.doc_id for h in before} <= _allowed_ids(flt) - {"doc21"}
    r.save(path)
    # the database is a file of the generation, listed in the manifest with its checksum
    manifest = json.loads((path / "manifest.json").read_text())
    entry = manifest["files"]["metadata.sqlite"]
    db = path / entry["file"]
    assert entry["file"] == f"g{manifest['generation']:06d}/metadata.sqlite" and db.is_file()
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT count(*) FROM documents").fetchone()[0] == len(r)
    con.close()
    blob = db.read_bytes()
    r2 = Retriever.load(path, model=tiny_encoder)
    assert r2.search("plants", k=5, filter=flt) == before
    assert r2.search("plants", k=5, filter={"year": 2099}) == []
    r2.add([{"title": "New", "text": "plants grow in light"}], ["new"], metadata=[{"year": 2099}])
    assert r2.get(["new"])[0]["metadata"] == {"year": 2099}
    assert [h.doc_id for h in r2.search("plants", k=5, filter={"year": 2099})] == ["new"]
    assert db.read_bytes() == blob   # the saved generation is never written by a reader
    r2.delete(["doc2"])
    r2.save()
    r3 = Retriever.load(path, model=tiny_encoder)
    assert len(r3.metadata) == len(r3) == len(r)
    assert r3.search("plants", k=50, filter={"year": 2099})[0].doc_id == "new"
    with pytest.raises(UnknownIdError):
        r3.get(["doc2"])


def test_a_crash_before_the_manifest_swap_keeps_vectors_and_metadata_together(tiny_encoder,
                                                                             tmp_path, monkeypatch):
    corpus, meta = _corpus_meta()
    path = tmp_path / "idx"
    r = Retriever.build(corpus[:10], [d["_id"] for d in corpus[:10]], metadata=meta[:10],
                        model=tiny_encoder, index="exhaustive", path=path, show_progress=False)
    r.add(corpus[10:], [d["_id"] for d in corpus[10:]], metadata=meta[10:])
    real = os.replace

    def crash(src, dst, *a, **kw):
        if str(dst).endswith("manifest.json"):
            raise OSError("simulated crash")
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        r.save()
    monkeypatch.setattr(os, "replace", real)
    old = Retriever.load(path, model=tiny_encoder)
    assert len(old) == len(old.metadata) == 10
    assert sorted(old.metadata.ids()) == sorted(old.index.ids)
    r.save()
    new = Retriever.load(path, model=tiny_encoder)
    assert len(new) == len(new.metadata) == len(corpus)


def test_tampered_or_escaping_metadata_file_is_refused(tiny_encoder, tmp_path):
    corpus, meta = _corpus_meta()
    path = tmp_path / "idx"
    Retriever.build(corpus[:8], metadata=meta[:8], model=tiny_encoder, index="exhaustive",
                    path=path, show_progress=False)
    manifest = json.loads((path / "manifest.json").read_text())
    db = path / manifest["files"]["metadata.sqlite"]["file"]
    data = bytearray(db.read_bytes())
    data[-100] ^= 0xFF
    db.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="checksum"):
        Retriever.load(path, model=tiny_encoder)
    manifest["files"]["metadata.sqlite"]["file"] = "../outside.sqlite"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="only .g000001/metadata.sqlite. is allowed"):
        Retriever.load(path, model=tiny_encoder, verify=False)


def test_bad_metadata_fails_before_encoding(tiny_encoder):
    corpus, _ = _corpus_meta()
    with pytest.raises(ValueError, match="2 metadata entries for 3"):
        Retriever.build(corpus[:3], metadata=[{}, {}], model=tiny_encoder, index="exhaustive")
    with pytest.raises(TypeError, match="one dict"):
        Retriever.build(corpus[:3], metadata={"a": 1}, model=tiny_encoder, index="exhaustive")
    with pytest.raises(ValueError, match="field name"):
        Retriever.build(corpus[:2], metadata=[{"a b": 1}, None], model=tiny_encoder,
                        index="exhaustive")
