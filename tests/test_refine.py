"""PLAID refinement vectors (``refine=``): the exact stage scores a finer copy of each token.

References: an einsum MaxSim over the original vectors (rounded as the kind stores them), the
exhaustive index, and a plain dict of the documents through add / delete / compact / save /
load / retrain."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_hits_close, clustered_docs, clustered_queries, einsum_maxsim

from colengine.embeddings import PackedEmbeddings
from colengine.errors import IndexFormatError
from colengine.index.exhaustive import ExhaustiveIndex
from colengine.index.plaid import PlaidIndex
from colengine.index.plaid import refine as rf

ALL = dict(n_probe=10**9, centroid_score_threshold=None, n_candidates=10**9, n_exact=10**9)
KINDS = ["float16", "int8"]


@pytest.fixture(scope="module")
def corpus():
    return clustered_docs(240, 32, 30, 5, 3, 50)


@pytest.fixture(scope="module")
def queries(corpus):
    return clustered_queries(corpus, 6, 10, 7)


def _topk(q: torch.Tensor, docs: list[np.ndarray], k: int) -> tuple[list[list[int]], np.ndarray]:
    """float64 einsum MaxSim top-``k`` (positions, scores ``[B, k]``) of ``docs``."""
    s = np.stack([einsum_maxsim(qb.numpy(), docs) for qb in q])
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return top.tolist(), np.take_along_axis(s, top, 1)


def _assert_top(got, want_ids: list[list[int]], want_scores: np.ndarray) -> None:
    """Hits ``got`` match :func:`_topk`'s: the scores within 1e-4, and the same document at
    each rank unless the two tie within float error (then either order is right)."""
    for b, hits in enumerate(got):
        np.testing.assert_allclose([h.score for h in hits], want_scores[b], atol=1e-4)
        for r, (h, w) in enumerate(zip(hits, want_ids[b])):
            if h.doc_id != str(w):
                assert abs(h.score - want_scores[b][r]) < 1e-4


def _stored(x: np.ndarray, kind: str, *, packed: bool = True) -> np.ndarray:
    """What ``kind`` keeps of ``x``, computed independently in numpy (float64); ``packed``:
    of ``x`` as a build reads it (float16, the packed token store's dtype)."""
    x = np.asarray(np.asarray(x, dtype=np.float16) if packed else x, dtype=np.float64)
    if kind == "float16":
        return x.astype(np.float16).astype(np.float64)
    s = np.abs(x).max(axis=1, keepdims=True) / 127.0
    return np.clip(np.round(x / np.where(s > 0, s, 1.0)), -127, 127) * s


@pytest.mark.parametrize("kind", KINDS)
def test_encode_take_matches_an_independent_quantiser(kind):
    x = np.random.default_rng(0).standard_normal((300, 24)).astype(np.float32)
    x[5] = 0.0                                     # an all-zero token stays zero (no NaN)
    vec, scale = rf.encode(x, kind)
    assert vec.dtype == rf.REFINE_KINDS[kind] and (scale is None) == (kind == "float16")
    got = rf.take(torch.from_numpy(vec), None if scale is None else torch.from_numpy(scale),
                  torch.arange(300)).numpy()
    np.testing.assert_allclose(got, _stored(x, kind, packed=False), rtol=1e-6, atol=1e-7)
    # each coordinate within half a step of the token's grid (float16: its own rounding)
    bound = 2.0 ** -11 if kind == "float16" else 0.5 / 127
    err = np.abs(got - x) / np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-30)
    assert err.max() <= bound + 1e-6
    assert not np.isnan(got).any() and (got[5] == 0).all()


def _copies_taken(monkeypatch) -> None:
    """Score refined indexes as the Triton backend does (float32 copies of the candidates'
    rows, :meth:`SearchState.decompress`) instead of where the vectors are stored."""
    from colengine.index.plaid import search as sm

    monkeypatch.setattr(sm, "_torch_backend", lambda st: False)


@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "copies"])
@pytest.mark.parametrize("kind", KINDS)
def test_nothing_pruned_equals_maxsim_over_the_stored_copies(corpus, queries, kind, in_place,
                                                             monkeypatch):
    """Both ways of scoring the copies (read where they are stored, the CPU's; taken as
    float32 copies first, a GPU's) give the float64 MaxSim over what the kind stores."""
    if not in_place:
        _copies_taken(monkeypatch)
    idx = PlaidIndex.build(corpus, nbits=2, seed=0, refine=kind)
    assert idx.refine_kind == kind and idx.stats()["refine"] == kind
    want_ids, want_scores = _topk(queries, [_stored(d, kind) for d in corpus], 10)
    _assert_top(idx.search(queries, k=10, **ALL), want_ids, want_scores)


@pytest.mark.parametrize("kind", KINDS)
def test_the_gpu_path_scores_the_copies_with_the_triton_kernel(corpus, queries, kind, monkeypatch):
    """What a GPU runs on a refined index: float32 copies of the candidates' rows
    (:meth:`SearchState.decompress`) scored by the Triton kernel (here under its interpreter),
    which refuses int8 stores and scales: the float64 MaxSim over the stored copies again."""
    import functools

    import colengine.kernels as kernels
    from colengine.kernels._interpret import interpret_mode

    if not (interpret_mode() or torch.cuda.is_available()):
        pytest.fail("the Triton kernel needs TRITON_INTERPRET=1 (conftest sets it) or CUDA")
    docs = corpus[:40]
    idx = PlaidIndex.build(docs, nbits=2, seed=0, refine=kind)
    _copies_taken(monkeypatch)
    calls = []
    triton_kernel = functools.partial(kernels.score_candidates_packed_unchecked,
                                      backend="triton")

    def kernel(*args, **kwargs):
        calls.append(kwargs.get("row_scale"))
        return triton_kernel(*args, **kwargs)

    monkeypatch.setattr(kernels, "score_candidates_packed_unchecked", kernel)
    want_ids, want_scores = _topk(queries[:3], [_stored(d, kind) for d in docs], 5)
    got = idx.search(queries[:3], k=5, **ALL)
    assert calls and all(c is None for c in calls)   # copies, never an int8 store + scales
    _assert_top(got, want_ids, want_scores)


def test_float16_refinement_gives_the_exhaustive_index_s_ranking(corpus, queries):
    """float16 is the exhaustive index's own precision: with nothing pruned the two return
    the same hits, and at the default knobs every returned score is the exhaustive one."""
    idx = PlaidIndex.build(corpus, nbits=1, seed=0, refine="float16")
    ex = ExhaustiveIndex.build(corpus)
    for got, want in zip(idx.search(queries, k=10, **ALL), ex.search(queries, k=10)):
        assert_hits_close(got, want)
    full = ex.search(queries, k=len(corpus))
    assert all(len(r) == len(corpus) for r in full)   # every document has a reference score
    for b, hits in enumerate(idx.search(queries, k=10)):
        table = {h.doc_id: h.score for h in full[b]}
        for h in hits:
            assert abs(h.score - table[h.doc_id]) < 1e-4


def test_refinement_beats_decoded_residuals_at_the_same_knobs(corpus, queries):
    """The same centroids and codes, so the same candidates: only the exact stage differs,
    and scoring the refined copies finds at least as many of the exhaustive top-10."""
    ex = ExhaustiveIndex.build(corpus)
    want = [{h.doc_id for h in r} for r in ex.search(queries, k=10)]
    plain = PlaidIndex.build(corpus, nbits=1, seed=0)
    fine = PlaidIndex.build(corpus, nbits=1, seed=0, refine="float16")
    np.testing.assert_array_equal(plain.codes, fine.codes)
    kn = dict(n_probe=4, n_candidates=64, n_exact=40)

    def recall(idx):
        return np.mean([len({h.doc_id for h in r} & w) / 10
                        for r, w in zip(idx.search(queries, k=10, **kn), want)])

    assert recall(fine) >= recall(plain)
    assert recall(fine) == pytest.approx(1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_add_delete_compact_save_load_retrain_keep_each_document_s_copy(corpus, tmp_path, kind):
    model: dict[str, np.ndarray] = {f"d{i}": corpus[i] for i in range(150)}
    idx = PlaidIndex.build([model[i] for i in model], list(model), nbits=2, seed=0, refine=kind)

    def check(index):
        assert sorted(index.ids) == sorted(model)
        got = index.embeddings_of(list(model))
        for i, e in zip(model, got):
            # float16 exactly; int8 within one step of its grid (a coordinate on a rounding
            # boundary may go either way) plus the float16 of embeddings_of
            want = _stored(model[i], kind)
            tol = 0.0 if kind == "float16" else np.abs(want).max(axis=1, keepdims=True) / 127
            assert (np.abs(e.astype(np.float64) - want) <= tol * 1.01 + 1e-3 * (tol > 0)).all()

    new = {f"n{i}": corpus[150 + i] for i in range(60)}
    idx.add(list(new.values()), ids=list(new))
    model.update(new)
    check(idx)
    gone = [f"d{i}" for i in range(0, 150, 3)] + ["n5"]
    idx.delete(gone)
    for g in gone:
        del model[g]
    check(idx)
    idx.save(tmp_path / "i")       # compacts
    back = PlaidIndex.load(tmp_path / "i")
    assert back.refine_kind == kind and back.n_tokens == sum(v.shape[0] for v in model.values())
    check(back)
    man = json.loads((tmp_path / "i" / "manifest.json").read_text())
    assert man["meta"]["plaid_format"] == 5 and man["meta"]["refine"] == kind
    back.delete(["d1"])
    del model["d1"]
    back.retrain(n_centroids=16)
    assert back.refine_kind == kind
    check(back)
    # searches after all of it still score the refined copies: nothing pruned = einsum
    q = clustered_queries(list(model.values()), 3, 8, 2)
    _, scores = _topk(q, [_stored(model[i], kind) for i in model], 5)
    for b, hits in enumerate(back.search(q, k=5, **ALL)):
        np.testing.assert_allclose([h.score for h in hits], scores[b], atol=1e-4)


def test_an_index_without_refinement_is_written_as_format_4(corpus, tmp_path):
    PlaidIndex.build(corpus[:50], nbits=2, path=tmp_path / "i")
    man = json.loads((tmp_path / "i" / "manifest.json").read_text())
    assert man["meta"]["plaid_format"] == 4 and man["meta"]["refine"] is None
    assert "refine" not in man["arrays"]


def test_bad_refine_kind_is_refused_before_any_work(corpus):
    with pytest.raises(ValueError, match="refine must be one of"):
        PlaidIndex.build(corpus, refine="bfloat16")
    with pytest.raises(ValueError, match="refine must be one of"):
        PlaidIndex.build_from_iterator([(["a"], [corpus[0]])], refine=True, show_progress=False)


def test_a_manifest_that_disagrees_with_the_arrays_is_refused(corpus, tmp_path):
    PlaidIndex.build(corpus[:50], nbits=2, refine="int8", path=tmp_path / "i")
    p = tmp_path / "i" / "manifest.json"
    man = json.loads(p.read_text())
    man["meta"]["refine"] = "float16"
    p.write_text(json.dumps(man))
    with pytest.raises(IndexFormatError, match="refine"):
        PlaidIndex.load(tmp_path / "i", verify=False)


def test_inconsistent_refinement_arrays_are_refused(corpus):
    idx = PlaidIndex.build(corpus[:40], nbits=2, refine="int8")
    b = idx.to_bundle()
    cases = {
        "scales missing": {k: v for k, v in b.arrays.items() if k != "refine_scale"},
        "short vectors": {**b.arrays, "refine": b.arrays["refine"][:-1]},
        "wrong dtype": {**b.arrays, "refine": b.arrays["refine"].astype(np.float32)},
        "float64 scales": {**b.arrays, "refine_scale": b.arrays["refine_scale"].astype(np.float64)},
    }
    for name, arrays in cases.items():
        bad = type(b)(kind=b.kind, meta=b.meta, arrays=arrays)
        with pytest.raises(IndexFormatError):
            PlaidIndex.from_bundle(bad)


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_build_resumed_writes_the_same_copies(corpus, tmp_path, monkeypatch, kind):
    import colengine.index.plaid.checkpoint as ck

    monkeypatch.setattr(ck, "_COMMIT_EVERY_S", 0.0)
    ids = [f"d{i}" for i in range(len(corpus))]
    one = PlaidIndex.build(corpus, ids, n_centroids=16, seed=1, refine=kind)
    chunks = [(ids[a:a + 40], PackedEmbeddings.from_list(corpus[a:a + 40]))
              for a in range(0, len(corpus), 40)]
    runs = {"n": 0}

    def dies_in_pass_two():
        runs["n"] += 1
        for i, c in enumerate(chunks):
            if runs["n"] == 2 and i == 3:
                raise KeyboardInterrupt
            yield c

    with pytest.raises(KeyboardInterrupt):
        PlaidIndex.build_from_iterator(dies_in_pass_two, n_centroids=16, seed=1, refine=kind,
                                       path=tmp_path / "s", show_progress=False)
    with pytest.raises(ValueError, match="other settings"):   # the folder is refine's own
        PlaidIndex.build_from_iterator(chunks, n_centroids=16, seed=1, path=tmp_path / "s",
                                       show_progress=False)
    st = PlaidIndex.build_from_iterator(chunks, n_centroids=16, seed=1, refine=kind,
                                        path=tmp_path / "s", show_progress=False)
    for name in ("codes", "residuals", "refine", "refine_scale"):
        a, b = getattr(st, name), getattr(one, name)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "copies"])
def test_filtered_exact_scoring_reads_the_refined_copies(corpus, queries, in_place, monkeypatch):
    """A selective filter scores its allowed documents exactly: with refinement those
    scores are the exhaustive ones restricted to the allowed set."""
    if not in_place:
        _copies_taken(monkeypatch)
    idx = PlaidIndex.build(corpus, nbits=1, seed=0, refine="float16")
    allowed = np.zeros(len(corpus), dtype=bool)
    allowed[::9] = True
    keep = np.flatnonzero(allowed)
    ex = ExhaustiveIndex.build([corpus[i] for i in keep], [str(i) for i in keep])
    for got, want in zip(idx.search(queries, k=5, allowed=allowed), ex.search(queries, k=5)):
        assert_hits_close(got, want)


def test_retriever_and_cli_pass_refine_through(tiny_encoder, tiny_model_path, tmp_path, capsys):
    from colengine import Retriever
    from colengine.cli import main

    docs = [f"document {i} about topic {i % 7} and more words {i * 3}" for i in range(60)]
    r = Retriever.build(docs, model=tiny_encoder, refine="int8", path=tmp_path / "r",
                        show_progress=False)
    assert r.index.refine_kind == "int8"
    back = Retriever.load(tmp_path / "r", model=tiny_encoder)
    assert back.index.refine_kind == "int8"
    assert_hits_close(back.search("topic 3", k=3), r.search("topic 3", k=3))
    with pytest.raises(TypeError, match="refine"):
        Retriever.build(docs, model=tiny_encoder, index="exhaustive", refine="int8")
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"_id": str(i), "text": t}) + "\n"
                            for i, t in enumerate(docs)))
    assert main(["index", str(data), "--out", str(tmp_path / "cli"), "--model",
                 str(tiny_model_path), "--device", "cpu", "--refine", "float16"]) == 0
    capsys.readouterr()
    cli = Retriever.load(tmp_path / "cli", model=tiny_encoder)
    assert cli.index.refine_kind == "float16"
    assert cli.index.stats()["bytes_per_token"] > 2 * tiny_encoder.dim


@pytest.mark.parametrize("kind", [None, "int8", "float16"])
def test_stage4_reads_ahead_the_rows_it_scores(corpus, queries, kind, monkeypatch):
    """Before the CPU scores stage 4's survivors it advises the pages of exactly their rows
    in the store it reads (the refinement copies and int8 scales, else codes and residuals);
    the results are the same without it."""
    import colengine.memory as memory
    from colengine.index.plaid import search as ps

    idx = PlaidIndex.build(corpus, nbits=2, seed=0, refine=kind)
    st = idx._search_state()
    calls: list[tuple[int, int, np.ndarray, np.ndarray]] = []
    real = memory.will_need

    def spy(addr, row_bytes, starts, stops):
        calls.append((addr, row_bytes, np.asarray(starts), np.asarray(stops)))
        return real(addr, row_bytes, starts, stops)

    monkeypatch.setattr(memory, "will_need", spy)
    pos = torch.tensor([[5, 2, -1, 5], [7, -1, -1, -1]])
    assert ps.prefetch_stored(st, pos) > 0
    stores = [st.refine, st.refine_scale] if kind else [st.codes, st.residuals]
    stores = [t for t in stores if t is not None]
    assert [(a, b) for a, b, _, _ in calls] == [
        (t.data_ptr(), t.stride(0) * t.element_size()) for t in stores]
    off = idx.doc_offsets
    for _, _, starts, stops in calls:    # rows 2, 5 and 7: each once
        assert sorted(zip(starts.tolist(), stops.tolist())) == [
            (int(off[r]), int(off[r + 1])) for r in (2, 5, 7)]
    calls.clear()
    knobs = dict(n_probe=4, n_candidates=64, n_exact=16)
    got = idx.search(queries, 5, **knobs)
    assert calls, "stage 4 did not read ahead"
    monkeypatch.setattr(ps, "prefetch_stored", lambda st, pos: 0)
    want = idx.search(queries, 5, **knobs)
    assert [[h.doc_id for h in row] for row in got] == [[h.doc_id for h in row] for row in want]
