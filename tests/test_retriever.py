"""Retriever end to end, checked against an independent einsum MaxSim over the same vectors."""

from __future__ import annotations

import numpy as np
import pytest

from colengine import Encoder, ExhaustiveIndex, Hit, IndexFormatError, Retriever, UnknownIdError
from colengine.errors import DuplicateIdError
from colengine.testing import sample_corpus
from conftest import einsum_maxsim, load_beir

QUERIES = ["how do plants make energy from light", "memory safety without garbage collection",
           "the first humans on the moon"]


def _assert_matches_reference(r: Retriever, queries: list[str], k: int = 10) -> None:
    """search() top-k ids equal the einsum top-k over the index's own vectors; scores within 1e-3."""
    docs = [r.index.docs[i].astype(np.float32) for i in range(len(r.index))]
    q = r.encoder.encode_queries(queries).numpy()
    got = [r.search(text, k=k) for text in queries]
    for qi, hits in enumerate(got):
        ref = einsum_maxsim(q[qi], docs)
        order = np.argsort(-ref, kind="stable")[:k]
        assert [h.doc_id for h in hits] == [r.index.ids[int(i)] for i in order]
        np.testing.assert_allclose([h.score for h in hits], ref[order], atol=1e-3)


@pytest.fixture(scope="module")
def tiny_retriever(tiny_encoder):
    corpus = sample_corpus()
    return Retriever.build(corpus, [d["_id"] for d in corpus], model=tiny_encoder,
                           index="exhaustive", show_progress=False)


def test_tiny_model_matches_einsum(tiny_retriever):
    _assert_matches_reference(tiny_retriever, QUERIES, k=10)


@pytest.mark.slow
def test_minilm_on_500_scifact_docs_matches_einsum(minilm_encoder):
    ids, texts = load_beir("scifact", n_docs=500)
    r = Retriever.build(texts, ids, model=minilm_encoder, index="exhaustive", show_progress=False,
                        long_documents="truncate")   # the reference encodes truncated texts
    assert r.index.dim == 128 and len(r) == 500
    _assert_matches_reference(r, [
        "0-dimensional biomaterials show inductive properties.",
        "ALDH1 expression is associated with poorer prognosis for breast cancer primary tumors.",
        "Vitamin D deficiency effects the risk of tuberculosis.",
    ], k=10)


def test_search_batch_equals_single(tiny_retriever):
    batch = tiny_retriever.search_batch(QUERIES, k=5)
    assert batch == [tiny_retriever.search(q, k=5) for q in QUERIES]
    assert all(isinstance(h, Hit) for hits in batch for h in hits)
    assert tiny_retriever.search_batch([], k=5) == []


def test_k_larger_than_corpus(tiny_retriever):
    hits = tiny_retriever.search(QUERIES[0], k=1000)
    assert len(hits) == len(tiny_retriever) == len(sample_corpus())


def test_rerank_scores_equal_einsum(tiny_retriever):
    ids = ["doc3", "doc0", "doc12", "doc7"]
    hits = tiny_retriever.rerank(QUERIES[0], ids)
    q = tiny_retriever.encoder.encode_queries([QUERIES[0]])[0].numpy()
    ref = einsum_maxsim(q, [d.astype(np.float32) for d in tiny_retriever.index.embeddings_of(ids)])
    expect = sorted(zip(ids, ref), key=lambda t: -t[1])
    assert [h.doc_id for h in hits] == [i for i, _ in expect]
    np.testing.assert_allclose([h.score for h in hits], [s for _, s in expect], atol=1e-3)
    assert tiny_retriever.rerank(QUERIES[0], ids, k=2) == hits[:2]
    assert tiny_retriever.rerank(QUERIES[0], []) == []


def test_rerank_texts_agrees_with_indexed_rerank(tiny_retriever):
    corpus = {d["_id"]: f"{d['title']} {d['text']}" for d in sample_corpus()}
    ids = ["doc1", "doc4", "doc9"]
    a = tiny_retriever.rerank(QUERIES[1], ids)
    b = tiny_retriever.rerank_texts(QUERIES[1], [corpus[i] for i in ids], ids=ids)
    assert [h.doc_id for h in a] == [h.doc_id for h in b]
    np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-3)


@pytest.mark.parametrize("call, err, match", [
    (lambda r: r.search(""), ValueError, "query is empty"),
    (lambda r: r.search("   "), ValueError, "query is empty"),
    (lambda r: r.search(None), TypeError, "query must be str"),
    (lambda r: r.search("ok", k=0), ValueError, "k must be positive"),
    (lambda r: r.search("ok", k=-3), ValueError, "k must be positive"),
    (lambda r: r.search("ok", k=2.5), TypeError, "k must be an int"),
    (lambda r: r.search("ok", pipeline="magic"), ValueError, "unknown pipeline"),
    (lambda r: r.search("ok", pipeline="bm25"), ValueError, "needs BM25"),
    (lambda r: r.search_batch("one string"), TypeError, "list of queries"),
    (lambda r: r.search("ok", nprobe=2), TypeError, r"valid: \['n_probe'"),
    (lambda r: r.search("ok", pipeline="bm25", n_probe_=2), TypeError, "unknown search knob"),
    (lambda r: r.search("ok", n_probe=2), TypeError, "n_probe"),   # exhaustive: no knobs
    (lambda r: r.rerank("ok", ["doc1", "nope"]), UnknownIdError, "nope"),
    (lambda r: r.rerank("ok", ["doc1", "doc1"]), DuplicateIdError, "twice"),
    (lambda r: r.delete(["doc1", "missing"]), UnknownIdError, "missing"),
    (lambda r: r.index.search(np.zeros((32, 64), np.float32)), ValueError, "dim 64"),
    (lambda r: r.index.search(np.zeros((32, 128), np.int32)), TypeError, "float"),
])
def test_bad_input_is_named(tiny_retriever, call, err, match):
    n = len(tiny_retriever)
    with pytest.raises(err, match=match):
        call(tiny_retriever)
    assert len(tiny_retriever) == n  # nothing changed


def test_bad_build_input(tiny_encoder):
    with pytest.raises(ValueError, match="empty corpus"):
        Retriever.build([], model=tiny_encoder, index="exhaustive")
    with pytest.raises(DuplicateIdError, match="'a'"):
        Retriever.build(["x", "y"], ["a", "a"], model=tiny_encoder, index="exhaustive")
    with pytest.raises(ValueError, match="2 ids for 3"):
        Retriever.build(["x", "y", "z"], ["a", "b"], model=tiny_encoder, index="exhaustive")
    with pytest.raises(ValueError, match="unknown index kind"):
        Retriever.build(["x"], model=tiny_encoder, index="hnsw")
    with pytest.raises(ValueError, match=r"documents\[1\] is empty"):
        Retriever.build(["x", ""], model=tiny_encoder, index="exhaustive")


def test_default_ids_add_delete(tiny_encoder):
    r = Retriever.build(["apples and pears", "rockets to the moon", "bread and yeast"],
                        model=tiny_encoder, index="exhaustive", show_progress=False)
    assert r.index.ids.ids == ["0", "1", "2"]
    r.delete(["1"])
    assert r.add(["a rocket launch"]) == ["3"]  # never reuses a deleted id
    with pytest.raises(DuplicateIdError, match="already in the index"):
        r.add(["again"], ids=["0"])
    assert r.index.ids.ids == ["0", "2", "3"]
    hits = r.search("rocket", k=3)
    # the same as a fresh build over the same documents
    fresh = Retriever.build(["apples and pears", "bread and yeast", "a rocket launch"],
                            ["0", "2", "3"], model=tiny_encoder, index="exhaustive",
                            show_progress=False)
    assert [h.doc_id for h in hits] == [h.doc_id for h in fresh.search("rocket", k=3)]
    np.testing.assert_allclose([h.score for h in hits],
                               [h.score for h in fresh.search("rocket", k=3)], atol=1e-4)


def test_save_load_round_trip(tiny_retriever, tiny_model_path, tmp_path):
    path = tiny_retriever.save(tmp_path / "idx")
    loaded = Retriever.load(path)   # the tiny model's code is colengine's own: trusted
    assert isinstance(loaded.index.inner, ExhaustiveIndex)   # passages (long_documents="chunk")
    assert isinstance(loaded.index.inner.docs.tokens, np.memmap)
    assert loaded.encoder.name == str(tiny_model_path.resolve())
    for q in QUERIES:
        assert loaded.search(q, k=10) == tiny_retriever.search(q, k=10)
    loaded.add(["something new about volcanoes"], ids=["new"])
    loaded.save()
    again = Retriever.load(path, trust_remote_code=True)
    assert "new" in again.index.ids and len(again) == len(tiny_retriever) + 1


def test_load_errors(tmp_path, tiny_retriever):
    with pytest.raises(IndexFormatError, match="no such index"):
        Retriever.load(tmp_path / "nothing")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(IndexFormatError, match="not a colengine index"):
        Retriever.load(tmp_path / "notes")
    tiny_retriever.index.save(tmp_path / "bare")  # an index, but not a retriever
    with pytest.raises(IndexFormatError, match="expected 'retriever'"):
        Retriever.load(tmp_path / "bare")


def test_loading_an_index_runs_no_code_from_its_model_folder(tiny_model_path, tiny_encoder,
                                                              tmp_path):
    """Issue 11 item 1: an index whose manifest names a model folder with an ``auto_map`` to a
    Python file used to import that file on load, with no opt-in."""
    import shutil

    model = tmp_path / "their-model"
    shutil.copytree(tiny_model_path, model)
    marker = tmp_path / "code-ran"
    code_files = [p for p in model.rglob("*.py")]
    assert code_files, "the tiny model must ship its modeling code"
    for p in code_files:
        p.write_text(p.read_text() + f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    docs = ["a text about volcanoes", "a text about bees"]
    r = Retriever.build(docs, model=Encoder(tiny_model_path, device="cpu", trust_remote_code=True),
                        index="exhaustive", show_progress=False)
    r.encoder.name = str(model)            # as if their index named their folder
    r.save(tmp_path / "idx")
    with pytest.raises(ValueError, match="--trust-remote-code"):
        Retriever.load(tmp_path / "idx")
    assert not marker.exists()
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        Encoder(model, device="cpu")
    assert not marker.exists()
    # opting in is possible, and then the code does run (so the marker above means something)
    Retriever.load(tmp_path / "idx", trust_remote_code=True)
    assert marker.exists()


# -- PLAID through the Retriever: typed knobs, one device policy ---------------------------
@pytest.fixture(scope="module")
def plaid_retriever(tiny_encoder):
    corpus = sample_corpus()
    return Retriever.build(corpus, [d["_id"] for d in corpus], model=tiny_encoder,
                           index="plaid", device="cpu", show_progress=False)


def test_plaid_knobs_are_passed_down(plaid_retriever):
    """Knobs given to Retriever.search reach the index: unpruned knobs give the index's own
    unpruned search, and bad values are the index's errors."""
    import torch

    r = plaid_retriever
    wide = dict(n_probe=10**6, centroid_score_threshold=None, n_candidates=10**6, n_exact=10**6)
    q = r.encoder.encode_queries(QUERIES)
    assert r.search_batch(QUERIES, k=4, **wide) == r.index.search(q, 4, **wide)
    assert [r.search(x, k=4, **wide) for x in QUERIES] == r.index.search(q, 4, **wide)
    assert r.search(QUERIES[0], k=4, n_probe=None) == r.search(QUERIES[0], k=4)
    with pytest.raises(ValueError, match="n_probe must be positive"):
        r.search(QUERIES[0], n_probe=0)
    with pytest.raises(TypeError, match="n_exact must be an int"):
        r.search(QUERIES[0], n_exact=2.0)
    with pytest.raises(ValueError, match="centroid_score_threshold must be finite"):
        r.search(QUERIES[0], centroid_score_threshold=float("inf"))
    assert r.index.device == torch.device("cpu")


def test_device_reaches_the_plaid_index(plaid_retriever, tmp_path, tiny_model_path):
    """Retriever.build/load(device=) decide where PLAID searches: load(device="cpu") keeps it
    on the CPU even where CUDA exists, and a device this machine lacks is refused by name."""
    import torch

    path = plaid_retriever.save(tmp_path / "idx")
    r = Retriever.load(path, device="cpu")
    assert r.index.device == torch.device("cpu")
    assert r.search(QUERIES[0], k=3) == plaid_retriever.search(QUERIES[0], k=3)
    with pytest.raises(ValueError, match="unknown device"):
        Retriever.load(path, device="gpu")
    if torch.cuda.is_available():
        assert Retriever.load(path, model=plaid_retriever.encoder,
                              device="cuda").index.device.type == "cuda"
        assert Retriever.load(path).index.device.type == "cuda"   # auto
    else:
        # the encoder given as an object takes no device: the index alone is asked for CUDA
        with pytest.raises(ValueError, match="no CUDA GPU"):
            Retriever.load(path, model=plaid_retriever.encoder, device="cuda")
        with pytest.raises(ValueError, match="no CUDA GPU"):
            Retriever.build(["x", "y"], model=plaid_retriever.encoder, index="plaid",
                            device="cuda", show_progress=False)
        assert Retriever.load(path).index.device.type == "cpu"    # auto without CUDA


def test_one_device_policy(monkeypatch):
    """'auto' is CUDA > MPS > CPU, except where MPS is excluded (PLAID's search)."""
    import torch

    from colengine import devices
    from colengine.index.plaid import PlaidIndex

    assert devices.resolve_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "xla", "meta", "cuda:x"):
        with pytest.raises(ValueError, match="unknown device"):
            devices.resolve_device(bad)
    if not torch.cuda.is_available():
        assert devices.resolve_device("auto", mps=False) == torch.device("cpu")
        # the real MPS check answers False here; pretend it answered True
        monkeypatch.setattr(devices, "mps_available", lambda: True)
        assert devices.resolve_device("auto") == torch.device("mps")
        assert devices.resolve_device("auto", mps=False) == torch.device("cpu")
        docs = [np.ones((3, 8), np.float32), np.eye(4, 8, dtype=np.float32)]
        assert PlaidIndex.build(docs, device="auto").device == torch.device("cpu")
    else:
        assert devices.resolve_device("auto") == torch.device("cuda")
        n = torch.cuda.device_count()
        with pytest.raises(ValueError, match="CUDA GPU"):
            devices.resolve_device(f"cuda:{n}")
