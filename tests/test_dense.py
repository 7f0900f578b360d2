"""The dense first stage: quantised search against numpy references, persistence, the
dense / dense+rerank / hybrid pipelines against brute force, and errors at the door."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import colengine.dense.index as dense_index_module
from colengine import Retriever
from colengine.dense import DenseEncoder, DenseIndex
from colengine.errors import IndexFormatError
from colengine.testing import sample_corpus

N, D, B, K = 300, 64, 7, 10


# -- independent numpy references --------------------------------------------------------------
def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def ref_int8(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """sentence-transformers' int8 rule (clip, (x - lo) / step - 128, truncate) and back to
    each bucket's middle."""
    step = (hi - lo) / 255
    c = (np.clip(x, lo, hi) - lo) / step - 128
    c = np.trunc(c).astype(np.int8)
    return lo + (c.astype(np.float64) + 128.5) * step


def ref_scores(q: np.ndarray, x: np.ndarray, precision: str) -> np.ndarray:
    if precision == "float32":
        return q.astype(np.float64) @ x.T.astype(np.float64)
    if precision == "int8":
        lo, hi = x.min(axis=0), x.max(axis=0)
        return ref_int8(q, lo, hi) @ ref_int8(x, lo, hi).T
    sq, sx = np.where(q > 0, 1.0, -1.0), np.where(x > 0, 1.0, -1.0)   # +-1 dot = dims - 2 hamming
    return sq @ sx.T


def check_top(hits, scores: np.ndarray, ids: list[str], k: int, atol: float = 1e-4,
              allowed: set[str] | None = None) -> None:
    """Each query's hits are a top-k of ``scores`` (ties in either order), scores exact."""
    pos = {d: i for i, d in enumerate(ids)}
    for b, row in enumerate(hits):
        keep = [i for i, d in enumerate(ids) if allowed is None or d in allowed]
        want = np.sort(scores[b, keep])[::-1][:k]
        assert len(row) == len(want)
        got = np.array([h.score for h in row])
        np.testing.assert_allclose(got, want, atol=atol)
        for h in row:
            assert allowed is None or h.doc_id in allowed
            assert abs(h.score - scores[b, pos[h.doc_id]]) <= atol


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    x = unit(rng.standard_normal((N, D)))
    q = unit(rng.standard_normal((B, D)))
    return x, q, [f"d{i}" for i in range(N)]


@pytest.mark.parametrize("ann", ["flat", "hnsw"])
@pytest.mark.parametrize("precision", ["float32", "int8", "ubinary"])
def test_quantised_search_equals_numpy_reference(data, precision, ann):
    x, q, ids = data
    idx = DenseIndex.build(x, ids, precision=precision, rescore=None, ann=ann, ef_search=N)
    check_top(idx.search(q, K), ref_scores(q, x, precision), ids, K)


@pytest.mark.parametrize("rescore", ["int8", "float32"])
@pytest.mark.parametrize("ann", ["flat", "hnsw"])
def test_binary_rescoring_equals_numpy_reference(data, rescore, ann):
    x, q, ids = data
    idx = DenseIndex.build(x, ids, precision="ubinary", rescore=rescore, ann=ann, ef_search=N)
    second = ref_scores(q, x, "int8" if rescore == "int8" else "float32")
    if rescore == "int8":   # float query against the dequantised documents
        lo, hi = x.min(axis=0), x.max(axis=0)
        second = q.astype(np.float64) @ ref_int8(x, lo, hi).T
    # every document a candidate: the result is the rescoring vectors' exact top-k
    check_top(idx.search(q, K, rescore_multiplier=N), second, ids, K)
    # the default 4k candidates: the best 4k by Hamming, re-ranked by the rescoring vectors
    first = ref_scores(q, x, "ubinary")
    for b, row in enumerate(idx.search(q, K)):
        cut = np.sort(first[b])[::-1][4 * K - 1]
        assert all(first[b, int(h.doc_id[1:])] >= cut for h in row)
        scores = [h.score for h in row]
        assert scores == sorted(scores, reverse=True)
        np.testing.assert_allclose(scores, [second[b, int(h.doc_id[1:])] for h in row], atol=1e-4)


@pytest.mark.parametrize("dims", [16, 40])
def test_mrl_truncation_renormalises_and_searches_the_truncated_vectors(data, dims):
    x, q, ids = data
    xt, qt = unit(x[:, :dims]), unit(q[:, :dims])
    for precision in ("float32", "int8"):
        idx = DenseIndex.build(xt, ids, precision=precision)
        check_top(idx.search(qt, K), ref_scores(qt, xt, precision), ids, K)


def test_encoder_dims_precision_and_pooling_on_the_tiny_pplx_model():
    texts = [d["text"] for d in sample_corpus()[:6]]
    full = DenseEncoder("tiny-pplx", device="cpu")
    cut = DenseEncoder(full.model, dims=32, precision="int8")
    assert (full.model_dim, full.dim, cut.dim) == (64, 64, 32)
    raw = full.encode_documents(texts)
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(cut.encode_documents(texts), unit(raw[:, :32]), atol=1e-5)
    # mean pooling over the transformer's token states, as the model's config says
    st = full.model
    assert st[1].get_config_dict()["pooling_mode_mean_tokens"]
    feats = st.tokenize(texts[:2])
    out = st[0]({k: v for k, v in feats.items()})["token_embeddings"].detach().numpy()
    mask = feats["attention_mask"].numpy()[..., None]
    mean = (out * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(raw[:2], unit(mean), atol=1e-4)


@pytest.mark.parametrize("ann", ["flat", "hnsw"])
def test_filters_and_deletes_inside_the_search(data, monkeypatch, ann):
    x, q, ids = data
    rng = np.random.default_rng(2)
    allowed = np.sort(rng.choice(N, 40, replace=False))
    for exact_rows in (N, 0):   # exact numpy plan, then faiss with an IDSelectorBitmap
        monkeypatch.setattr(dense_index_module, "EXACT_ROWS", exact_rows)
        for precision in ("float32", "int8", "ubinary"):
            idx = DenseIndex.build(x, ids, precision=precision, rescore=None, ann=ann)
            ref = ref_scores(q, x, precision)
            keep = {ids[i] for i in allowed}
            check_top(idx.search(q, K, allowed_rows=allowed), ref, ids, K, allowed=keep)
            gone = [h.doc_id for h in idx.search(q, 3)[0]]
            idx.delete(gone)
            check_top(idx.search(q, K), ref, ids, K, allowed=set(ids) - set(gone))
            assert len(idx) == N - 3


def test_adds_use_the_build_ranges(data):
    x, q, ids = data
    idx = DenseIndex.build(x[:200], ids[:200], precision="int8")
    idx.add(x[200:], ids[200:])
    lo, hi = x[:200].min(axis=0), x[:200].max(axis=0)   # out-of-range values are clipped
    ref = ref_int8(q, lo, hi) @ ref_int8(x, lo, hi).T
    check_top(idx.search(q, K), ref, ids, K)
    with pytest.raises(ValueError, match="dimension"):
        idx.add(x[:2, :32], ["n1", "n2"])


@pytest.mark.parametrize("precision,rescore,ann", [("float32", None, "flat"), ("int8", None, "hnsw"),
                                                    ("ubinary", "int8", "hnsw"),
                                                    ("ubinary", "float32", "flat")])
def test_index_bundle_round_trip(data, tmp_path, precision, rescore, ann):
    from colengine.storage import Bundle, load_bundle, save_bundle

    x, q, ids = data
    idx = DenseIndex.build(x, ids, precision=precision, rescore=rescore, ann=ann)
    idx.delete(["d3"])
    b = idx.to_bundle()
    save_bundle(tmp_path / "i", b)
    back = DenseIndex.from_bundle(load_bundle(tmp_path / "i", kind="dense"))
    assert [[(h.doc_id, h.score) for h in r] for r in back.search(q, K)] == \
           [[(h.doc_id, h.score) for h in r] for r in idx.search(q, K)]
    assert "d3" not in back.ids
    if ann == "hnsw":   # a stored graph that does not match the arrays is refused
        arrays = dict(b.arrays)
        arrays["codes" if "codes" in arrays else "vectors"] = arrays.get(
            "codes", arrays.get("vectors"))[:-1]
        arrays["hnsw"] = DenseIndex.build(x[:10], ids[:10], precision=precision, rescore=rescore,
                                          ann="hnsw").to_bundle().arrays["hnsw"]
        with pytest.raises(ValueError):
            DenseIndex.from_bundle(Bundle("dense", b.meta, arrays))


# -- the Retriever's pipelines -----------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus():
    docs = sample_corpus()
    meta = [{"topic": "science" if i < 16 else "tech"} for i in range(len(docs))]
    return docs, [d["_id"] for d in docs], meta


@pytest.fixture(scope="module")
def retriever(corpus, tiny_encoder):
    docs, ids, meta = corpus
    return Retriever.build(docs, ids, model=tiny_encoder, index="exhaustive", bm25=True,
                           dense=DenseEncoder("tiny-pplx", device="cpu"), metadata=meta,
                           show_progress=False)


QUERIES = ["how do plants make energy?", "memory safety without a garbage collector",
           "search engines and inverted indexes"]


def _texts(docs):
    return [f"{d['title']} {d['text']}".strip() for d in docs]


def test_dense_pipeline_is_brute_force_over_the_encoder(retriever, corpus):
    docs, ids, meta = corpus
    enc = retriever.dense.encoder
    ref = enc.encode_queries(QUERIES) @ enc.encode_documents(_texts(docs)).T
    check_top(retriever.search_batch(QUERIES, 5, pipeline="dense"), ref, ids, 5)
    tech = {i for i, m in zip(ids, meta) if m["topic"] == "tech"}
    check_top(retriever.search_batch(QUERIES, 5, pipeline="dense", filter={"topic": "tech"}),
              ref, ids, 5, allowed=tech)


def _maxsim(r, query, cand):
    s = r.index.score(r.encoder.encode_queries([query]), cand)[0].numpy()
    return sorted(zip(cand, s.tolist()), key=lambda t: -t[1])


def test_dense_rerank_and_hybrid_are_maxsim_over_their_candidates(retriever, corpus):
    from colengine.fusion import reciprocal_rank_fusion

    docs, ids, _ = corpus
    enc = retriever.dense.encoder
    dense = enc.encode_queries(QUERIES) @ enc.encode_documents(_texts(docs)).T
    c = 8
    for b, query in enumerate(QUERIES):
        first = [ids[i] for i in np.argsort(-dense[b], kind="stable")[:c]]
        want = _maxsim(retriever, query, first)[:4]
        got = retriever.search(query, 4, pipeline="dense+rerank", candidates=c)
        assert [h.doc_id for h in got] == [d for d, _ in want]
        np.testing.assert_allclose([h.score for h in got], [s for _, s in want], atol=1e-4)
        lexical = retriever.bm25.search([query], c)[0]
        dense_hits = retriever.search(query, c, pipeline="dense")
        fused = [h.doc_id for h in reciprocal_rank_fusion([dense_hits, lexical], k=c)]
        want = _maxsim(retriever, query, fused)[:4]
        got = retriever.search(query, 4, pipeline="hybrid", candidates=c)
        assert [h.doc_id for h in got] == [d for d, _ in want]
    # every document a candidate: dense+rerank is exhaustive MaxSim
    for query in QUERIES:
        assert [h.doc_id for h in retriever.search(query, 5, pipeline="dense+rerank",
                                                   candidates=len(ids))] == \
               [h.doc_id for h in retriever.search(query, 5, pipeline="late")]
        hits = retriever.search(query, 5, pipeline="hybrid", filter={"topic": "science"})
        assert all(int(h.doc_id[3:]) < 16 for h in hits) and len(hits) == 5


def test_retriever_round_trip_adds_and_deletes(tmp_path, corpus, tiny_encoder):
    docs, ids, _ = corpus
    enc = DenseEncoder("tiny-pplx", dims=32, precision="ubinary", device="cpu")
    r = Retriever.build(docs, ids, model=tiny_encoder, index="exhaustive", dense=enc,
                        dense_options={"rescore": "float32", "ann": "hnsw"},
                        path=tmp_path / "idx", show_progress=False)
    before = r.search_batch(QUERIES, 5, pipeline="dense+rerank", candidates=12)
    back = Retriever.load(tmp_path / "idx", model=tiny_encoder)
    assert back.info()["dense"]["precision"] == "ubinary" and back.dense.encoder.dim == 32
    assert back.search_batch(QUERIES, 5, pipeline="dense+rerank", candidates=12) == before
    top = back.search(QUERIES[0], 1, pipeline="dense")[0].doc_id
    back.delete([top])
    back.add(["Photosynthesis in kelp turns light into sugar."], ids=["new"])
    back.save()
    again = Retriever.load(tmp_path / "idx", model=tiny_encoder)
    got = [h.doc_id for h in again.search(QUERIES[0], len(ids), pipeline="dense")]
    assert top not in got and "new" in got and len(got) == len(ids)
    # a manifest whose dense record does not match its arrays is a format error
    mpath = tmp_path / "idx" / "manifest.json"
    man = json.loads(mpath.read_text())
    assert any(name.startswith("dense/") for name in man["arrays"])
    man["meta"]["dense_meta"]["index"]["precision"] = "float32"
    mpath.write_text(json.dumps(man))
    with pytest.raises(IndexFormatError, match="dense index"):
        Retriever.load(tmp_path / "idx", model=tiny_encoder)


# -- errors at the door --------------------------------------------------------------------------
def test_bad_input_fails_at_the_door(data, corpus, tiny_encoder, monkeypatch):
    x, _, ids = data
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        DenseEncoder("no-such-model-anywhere", precision="fp16")   # before any model load
    with pytest.raises(ValueError, match="larger than the model's dimension 64"):
        DenseEncoder("tiny-pplx", dims=65, device="cpu")
    with pytest.raises(ValueError, match="divisible by 8"):
        DenseEncoder("tiny-pplx", dims=20, precision="ubinary", device="cpu")
    with pytest.raises(ValueError, match="rescore"):
        DenseIndex.build(x, ids, precision="int8", rescore="float32")
    with pytest.raises(ValueError, match="unknown precision"):
        DenseIndex.build(x, ids, precision="int4")
    with pytest.raises(ValueError, match="ann must be"):
        DenseIndex.build(x, ids, ann="ivf")
    with pytest.raises(ValueError, match="NaN"):
        DenseIndex.build(np.full((2, 8), np.nan, dtype=np.float32))
    docs, ids_, _ = corpus
    calls = []
    monkeypatch.setattr(type(tiny_encoder), "encode_documents",
                        lambda *a, **k: calls.append(1) or pytest.fail("encoded"))
    with pytest.raises(TypeError, match="unknown dense option"):
        Retriever.build(docs, ids_, model=tiny_encoder, dense="tiny-pplx",
                        dense_options={"nlist": 4}, show_progress=False)
    with pytest.raises(ValueError, match="larger than the model's dimension"):
        Retriever.build(docs, ids_, model=tiny_encoder,
                        dense=DenseEncoder("tiny-pplx", dims=128, device="cpu"))
    assert calls == []
    monkeypatch.undo()
    plain = Retriever.build(docs[:4], ids_[:4], model=tiny_encoder, index="exhaustive",
                            show_progress=False)
    for p in ("dense", "dense+rerank", "hybrid"):
        with pytest.raises(ValueError, match="needs dense vectors"):
            plain.search("q", 2, pipeline=p)


def test_default_dense_model_falls_back_announced_and_names_fail(monkeypatch, tmp_path):
    from colengine.dense.models import DEFAULT_DENSE_MODEL, resolve_dense_name
    from colengine.models import ModelNotFoundError, UntrustedModelError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    said: list[str] = []
    assert resolve_dense_name(True, announce=said.append) == "minilm"
    assert DEFAULT_DENSE_MODEL in said[0] and "minilm" in said[0]
    with pytest.raises(ModelNotFoundError):
        DenseEncoder(DEFAULT_DENSE_MODEL)          # named explicitly: an error, never a swap
    # a folder whose code is not colengine's own runs nothing without an opt-in
    from colengine.dense.models import dense_alias_path

    folder = tmp_path / "m"
    shutil.copytree(dense_alias_path("tiny-pplx"), folder)
    (folder / "modeling_pplx_qwen3.py").write_text("raise SystemExit('ran untrusted code')\n")
    with pytest.raises(UntrustedModelError):
        DenseEncoder(folder)


def test_eval_runs_the_dense_pipelines(tmp_path, tiny_encoder):
    from colengine.eval import evaluate
    from colengine.eval.datasets import Dataset

    docs = sample_corpus()
    ids = [d["_id"] for d in docs]
    ds = Dataset("toy", ids, [d["title"] for d in docs], [d["text"] for d in docs],
                 {"q1": "photosynthesis in plants", "q2": "rust memory safety"},
                 {"q1": {"doc0": 1}, "q2": {"doc9": 1}})
    res = evaluate(ds, "dense,dense+rerank,hybrid", model=tiny_encoder, dense_model="tiny-pplx",
                   dense_precision="int8", k=5, output=tmp_path, cache_dir=tmp_path / "cache",
                   show_progress=False, plot=False, announce=lambda m: None)
    pipes = res["datasets"]["toy"]["pipelines"]
    assert set(pipes) == {"dense", "dense+rerank", "hybrid"}
    assert res["datasets"]["toy"]["setup"]["dense"]["precision"] == "int8"
    with pytest.raises(ValueError, match="without a dense pipeline"):
        evaluate(ds, "bm25", dense_model="minilm", show_progress=False)
