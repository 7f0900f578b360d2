"""Long documents: windows, chunk / late encodings, per-document search over passages."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from pylate.models import ColBERT

from colengine import Retriever
from colengine.errors import IndexFormatError, UnknownIdError
from colengine.index.exhaustive import ExhaustiveIndex
from colengine.longdocs import (PassageIndex, check_policy, encode_passages, passage_key,
                                segments, windows)
from colengine.storage import Bundle
from colengine.testing import sample_corpus
from colengine.types import Hit, Passage

from conftest import assert_hits_close


def _texts() -> list[str]:
    return [f"{d['title']} {d['text']}" for d in sample_corpus()]


def _long(n: int, start: int = 0) -> str:
    t = _texts()
    return " ".join(t[(start + i) % len(t)] for i in range(n))


def _corpus() -> tuple[list[str], list[str]]:
    """Short documents plus long ones (up to 6 MiniLM windows, 3 tiny-pplx windows)."""
    texts = _texts()[:10] + [_long(7, 3), _long(12, 10), _long(20, 1)]
    return [f"d{i}" for i in range(len(texts))], texts


def _reference_windows(n: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Brute force: the windows are the shortest run of size-``size`` spans, ``size -
    overlap`` apart from 0, whose last one reaches ``n``."""
    out = []
    for j in range(n + 1):
        s = j * (size - overlap)
        out.append((s, min(s + size, n)))
        if s + size >= n:
            return out
    raise AssertionError


def _content_ids(enc, text: str) -> list[int]:
    return list(enc.model.tokenizer(text.strip(), add_special_tokens=False)["input_ids"])


def _own_forward(enc, ids: list[int]) -> np.ndarray:
    """One sequence through the model alone, as PyLate builds it: the tokenizer's special
    tokens, the document prefix inserted after the first token (``ColBERT.insert_prefix_token``),
    the skiplist (``ColBERT.skiplist_mask``), L2-normalised; float32 ``[n, d]``."""
    m, tok = enc.model, enc.model.tokenizer
    lead = [tok.cls_token_id] if tok.cls_token_id is not None else []
    trail = [tok.sep_token_id] if tok.sep_token_id is not None else []
    x = ColBERT.insert_prefix_token(torch.tensor([lead + ids + trail]), m.document_prefix_id)
    feats = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    if "token_type_ids" in tok("a"):
        feats["token_type_ids"] = torch.zeros_like(x)
    with torch.inference_mode():
        emb = m.forward(feats)["token_embeddings"][0]
    keep = ColBERT.skiplist_mask(x, m.skiplist)[0]
    return torch.nn.functional.normalize(emb[keep].float(), dim=-1).numpy()


# -- windows -------------------------------------------------------------------------------
@pytest.mark.parametrize("n,size,overlap", [(1, 4, 0), (4, 4, 1), (5, 4, 1), (100, 7, 3),
                                            (253, 253, 32), (254, 253, 32), (1000, 253, 0)])
def test_windows_match_brute_force(n, size, overlap):
    got = windows(n, size, overlap)
    assert got == _reference_windows(n, size, overlap)
    covered = np.zeros(n, dtype=int)
    for s, e in got:
        covered[s:e] += 1
    assert (covered >= 1).all()
    for (s0, e0), (s1, _) in zip(got, got[1:]):
        assert e0 - s0 == size and e0 - s1 == overlap


def test_segments_cover_windows_within_context():
    wins = windows(1000, 100, 20)
    for ctx in (100, 180, 260, 1000):
        segs = segments(wins, 100, 80, ctx)
        assert [j for a, b, _ in segs for j in range(a, b)] == list(range(len(wins)))
        for a, b, s0 in segs:
            assert s0 == wins[a][0] and wins[b - 1][1] - s0 <= ctx


@pytest.mark.parametrize("enc_name", ["minilm_encoder", "tiny_encoder"])
def test_chunk_offsets_and_lengths_exact(enc_name, request):
    enc = request.getfixturevalue(enc_name)
    ids, texts = _corpus()
    ep = encode_passages(enc, texts, check_policy("chunk"), show_progress=False)
    rp = check_policy("chunk").resolve(enc)
    skip = set(enc.model.skiplist)
    n_special = 1 + (enc.model.tokenizer.cls_token_id is not None) + \
        (enc.model.tokenizer.sep_token_id is not None)
    assert rp.content == enc.document_length - n_special and rp.overlap == enc.document_length // 8
    for d, text in enumerate(texts):
        toks = _content_ids(enc, text)
        want = _reference_windows(len(toks), rp.content, rp.overlap)
        rows = np.flatnonzero(ep.doc == d)
        assert list(zip(ep.start[rows].tolist(), ep.end[rows].tolist())) == want
        assert ep.window[rows].tolist() == list(range(len(want)))
        for r, (s, e) in zip(rows, want):   # every kept token is there, nothing else
            n_kept = sum(t not in skip for t in toks[s:e]) + n_special
            assert ep.docs.lengths[r] == n_kept
    assert ep.report["long_documents"] == sum(
        len(_content_ids(enc, t)) > rp.content for t in texts) >= 3
    assert ep.report["truncated"] == 0 and ep.report["passages"] == len(ep.docs)


# -- encodings -----------------------------------------------------------------------------
def test_chunk_windows_equal_independent_encodings(tiny_encoder):
    enc = tiny_encoder
    _, texts = _corpus()
    ep = encode_passages(enc, texts[-3:], check_policy("chunk"), show_progress=False)
    assert len(ep.docs) > 3
    for r in range(len(ep.docs)):
        toks = _content_ids(enc, texts[-3:][ep.doc[r]])
        ref = _own_forward(enc, toks[ep.start[r]:ep.end[r]])
        np.testing.assert_allclose(ep.docs[r].astype(np.float32), ref, atol=2e-3)
    # window 0 is what PyLate itself encodes when it truncates
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pylate = enc.encode_documents(texts[-3:], show_progress=False, dtype="float32")
    for d in range(3):
        first = int(np.flatnonzero(ep.doc == d)[0])
        np.testing.assert_allclose(ep.docs[first].astype(np.float32), pylate[d], atol=2e-3)


def test_late_windows_saw_the_whole_document(tiny_encoder):
    enc = tiny_encoder
    short, long = _texts()[0], _long(6, 2)
    toks = _content_ids(enc, long)
    rp = check_policy("late").resolve(enc)
    assert rp.content < len(toks) <= rp.context_content   # several windows, one segment
    late = encode_passages(enc, [short, long], check_policy("late"), show_progress=False)
    chunk = encode_passages(enc, [short, long], check_policy("chunk"), show_progress=False)
    for name in ("doc", "window", "start", "end"):
        assert getattr(late, name).tolist() == getattr(chunk, name).tolist()
    assert late.docs.lengths.tolist() == chunk.docs.lengths.tolist()
    # a one-window document: the same computation
    np.testing.assert_allclose(late.docs[0].astype(np.float32),
                               chunk.docs[0].astype(np.float32), atol=2e-3)
    # every window of the long one differs from its independent encoding ...
    rows = np.flatnonzero(late.doc == 1)
    assert rows.size >= 2
    for r in rows:
        diff = np.abs(late.docs[r].astype(np.float32) - chunk.docs[r].astype(np.float32))
        assert diff.max() > 1e-2        # 5x the float16 tolerance used for "equal"
    # ... and is a slice of one forward pass over the whole document
    assert enc.model.tokenizer.cls_token_id is None      # PyLate's input: t0 [D] t1 t2 ...
    full = _own_forward(enc, toks)                       # its rows, skiplist removed
    seq = [toks[0], enc.model.document_prefix_id] + toks[1:]
    role = [0, -1] + list(range(1, len(toks)))
    keep = [t not in set(enc.model.skiplist) for t in seq]
    row = np.cumsum(keep) - 1
    for r in rows:
        s, e = int(late.start[r]), int(late.end[r])
        want = [int(row[p]) for p in range(len(seq))
                if keep[p] and (role[p] == -1 or s <= role[p] < e)]
        np.testing.assert_allclose(late.docs[r].astype(np.float32), full[want], atol=2e-3)


def test_late_splits_texts_longer_than_the_context(tiny_encoder):
    long = _long(30)
    toks = _content_ids(tiny_encoder, long)
    pol = check_policy("late", None, 600)
    rp = pol.resolve(tiny_encoder)
    assert len(toks) > rp.context_content
    ep = encode_passages(tiny_encoder, [long], pol, show_progress=False)
    assert list(zip(ep.start.tolist(), ep.end.tolist())) == windows(len(toks), rp.content,
                                                                  rp.overlap)
    assert ep.report["segments"] == len(segments(windows(len(toks), rp.content, rp.overlap),
                                                  rp.content, rp.stride, rp.context_content)) > 1
    assert check_policy("late", None, 10**6).resolve(tiny_encoder).context == 1024   # capped


# -- search over passages ------------------------------------------------------------------
@pytest.fixture(scope="module")
def chunked(minilm_encoder):
    ids, texts = _corpus()
    r = Retriever.build(texts, ids, model=minilm_encoder, index="exhaustive",
                        metadata=[{"i": i} for i in range(len(ids))], show_progress=False)
    ref = encode_passages(minilm_encoder, texts, check_policy("chunk"), show_progress=False)
    return r, ids, texts, ref


def _reference_scores(q: torch.Tensor, ref) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brute force: einsum MaxSim of the query against every window, max per document;
    (scores [n_docs], best window [n_docs], every window's score [n_passages])."""
    qq = q[0].double().numpy()
    per = np.array([np.einsum("qd,td->qt", qq, ref.docs[p].astype(np.float64)).max(1).sum()
                    for p in range(len(ref.docs))])
    best = np.full(ref.n_texts, -np.inf)
    win = np.zeros(ref.n_texts, dtype=int)
    for p in range(len(ref.docs)):
        if per[p] > best[ref.doc[p]]:
            best[ref.doc[p]], win[ref.doc[p]] = per[p], ref.window[p]
    return best, win, per


def test_document_scores_are_max_over_passages(chunked, minilm_encoder):
    r, ids, texts, ref = chunked
    assert len(r) == len(ids) and r.index.n_passages == len(ref.docs) > len(ids)
    n_later = 0
    for query in ("how do plants turn sunlight into energy", "which language prevents data races"):
        q = minilm_encoder.encode_queries([query])
        best, win, per = _reference_scores(q, ref)
        order = np.argsort(-best, kind="stable")
        hits = r.search(query, k=len(ids))
        assert len(hits) == len(ids) and len({h.doc_id for h in hits}) == len(ids)
        assert_hits_close(hits, [Hit(ids[i], float(best[i])) for i in order], atol=2e-3)
        for h in hits:   # the window named is the best one (or ties with it)
            d = ids.index(h.doc_id)
            rows = np.flatnonzero((ref.doc == d) & (ref.window == h.passage.index))
            assert rows.size == 1 and abs(per[rows[0]] - best[d]) < 2e-3
            assert h.passage == Passage(int(ref.window[rows[0]]), int(ref.start[rows[0]]),
                                        int(ref.end[rows[0]]))
            n_later += int(h.passage.index == win[d] > 0)
        top = r.search(query, k=3)
        assert [h.doc_id for h in top] == [h.doc_id for h in hits[:3]]
        rr = r.rerank(query, [ids[i] for i in range(len(ids))])
        assert_hits_close(rr, [Hit(ids[i], float(best[i])) for i in order], atol=2e-3)
    assert n_later > 0   # text past the first window decides some scores


def test_filters_and_k_count_documents(chunked, minilm_encoder):
    r, ids, texts, ref = chunked
    query = "the history of printing and books"
    best, _, _ = _reference_scores(minilm_encoder.encode_queries([query]), ref)
    keep = [i for i in range(len(ids)) if i % 2 == 0 or i >= 10]
    hits = r.search(query, k=4, filter={"$or": [{"i": {"$in": keep}}]})
    want = sorted(keep, key=lambda i: -best[i])[:4]
    assert [h.doc_id for h in hits] == [ids[i] for i in want]
    # the long documents hold most passages: k documents still come back
    hits = r.search(query, k=5, filter={"i": {"$gte": 10}})
    assert sorted(h.doc_id for h in hits) == ["d10", "d11", "d12"]


def test_delete_add_get_work_per_document(minilm_encoder):
    ids, texts = _corpus()
    r = Retriever.build(texts, ids, model=minilm_encoder, index="plaid", show_progress=False)
    q = "movable type printing press"
    before = {h.doc_id: h.score for h in r.search(q, k=len(ids))}
    n_pass = r.index.n_passages
    long_passages = int((r.index._doc == ids.index("d12")).sum())
    assert long_passages > 2
    r.delete(["d12", "d0"])
    assert "d12" not in r.index.ids and len(r) == len(ids) - 2
    assert r.index.n_passages == n_pass - long_passages - 1
    assert not any(k.startswith("d12\x1f") for k in r.index.inner.ids)
    assert all(h.doc_id not in ("d12", "d0") for h in r.search(q, k=len(ids)))
    with pytest.raises(UnknownIdError):
        r.get(["d12"])
    r.add([texts[-1]], ids=["d12"])
    after = {h.doc_id: h.score for h in r.search(q, k=len(ids))}
    assert abs(after["d12"] - before["d12"]) < 1e-3
    assert r.get(["d12"])[0]["text"] == texts[-1]
    new = r.add(["a new short text about printing"])
    assert new == [str(len(ids))] and new[0] in r.index.ids


def test_truncate_reproduces_the_old_behaviour(minilm_encoder):
    ids, texts = _corpus()
    with pytest.warns(UserWarning, match="3 of 13 documents .* truncated"):
        r = Retriever.build(texts, ids, model=minilm_encoder, index="exhaustive",
                            long_documents="truncate", show_progress=False)
    assert isinstance(r.index, ExhaustiveIndex)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = ExhaustiveIndex.build(minilm_encoder.encode_documents(texts, show_progress=False), ids)
    q = minilm_encoder.encode_queries(["the water cycle"])
    assert r.index.search(q, k=13) == old.search(q, k=13)
    assert [h.score for h in r.index.search(q, k=13)[0]] == [h.score for h in old.search(q, k=13)[0]]
    assert r.info()["long_documents"] == {"mode": "truncate"}


def test_save_load_round_trip_keeps_passages(chunked, tmp_path):
    r, ids, _, _ = chunked
    r.save(tmp_path / "idx")
    back = Retriever.load(tmp_path / "idx", model=r.encoder)
    assert isinstance(back.index, PassageIndex) and back.index.ids.ids == ids
    for name in ("_doc", "_win", "_start", "_end"):
        assert getattr(back.index, name).tolist() == getattr(r.index, name).tolist()
    q = "how do vaccines work"
    a, b = r.search(q, k=5), back.search(q, k=5)
    assert a == b and [h.passage for h in a] == [h.passage for h in b]
    assert back.info()["long_documents"]["mode"] == "chunk"
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["meta"]["passages"]["format"] == 1
    assert all(e["file"].endswith(".npy") for n, e in manifest["arrays"].items()
               if n.startswith("passages/"))


def test_a_bad_passage_map_is_refused(chunked):
    r, ids, _, _ = chunked
    pb = r.index.passage_bundle()
    with pytest.raises(ValueError, match="format 99"):
        PassageIndex.from_bundle(r.index.inner, Bundle("passages", {**pb.meta, "format": 99},
                                                       pb.arrays))
    bad = dict(pb.arrays, window=pb.arrays["window"] + 1)
    with pytest.raises(ValueError, match="passage table says"):
        PassageIndex.from_bundle(r.index.inner, Bundle("passages", pb.meta, bad))


def test_a_tampered_passage_map_on_disk_is_an_index_format_error(chunked, tmp_path):
    r, _, _, _ = chunked
    r.save(tmp_path / "idx")
    mpath = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["meta"]["passages"]["format"] = 2
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="passage map"):
        Retriever.load(tmp_path / "idx", model=r.encoder)


def test_passage_keys_never_collide():
    pairs = [("a", 1), ("a\x1f1", 0), ("a", 10), ("a\x1f", 10), ("a\x1f1", 1)]
    assert len({passage_key(d, w) for d, w in pairs}) == len(pairs)


def test_streamed_build_gives_the_same_passages(minilm_encoder, recwarn):
    ids, texts = _corpus()
    ids, texts = ids[8:], texts[8:]
    a = Retriever.build(texts, ids, model=minilm_encoder, stream=True, chunk_size=2,
                        show_progress=False)
    b = Retriever.build(texts, ids, model=minilm_encoder, index="exhaustive",
                        show_progress=False)
    for name in ("_doc", "_win", "_start", "_end"):
        assert getattr(a.index, name).tolist() == getattr(b.index, name).tolist()
    assert a.index.ids.ids == ids and len(a.index.inner.ids) == b.index.n_passages
    assert {h.doc_id for h in a.search("printing press", k=len(ids))} == set(ids)
    assert not [w for w in recwarn if "truncated" in str(w.message)]   # nothing was cut


# -- bad input at the door -----------------------------------------------------------------
@pytest.mark.parametrize("kw,err,msg", [
    ({"long_documents": "split"}, ValueError, "long_documents must be one of"),
    ({"long_documents": None}, ValueError, "long_documents must be one of"),
    ({"overlap": -1}, ValueError, "overlap must be >= 0"),
    ({"overlap": 1.0}, ValueError, r"\[0, 1\)"),
    ({"overlap": "8"}, TypeError, "overlap must be an int"),
    ({"overlap": True}, TypeError, "overlap must be an int"),
    ({"context": 0}, ValueError, "context must be positive"),
    ({"context": 2.5, "long_documents": "late"}, TypeError, "context must be an int"),
    ({"context": 4096}, ValueError, "context is for long_documents='late'"),
    ({"long_documents": "truncate", "overlap": 8}, ValueError, "overlap is for"),
])
def test_bad_values_fail_before_the_model_loads(kw, err, msg):
    with pytest.raises(err, match=msg):   # the model name is not even looked at
        Retriever.build(["a text"], model="no-such/model-anywhere", **kw)


def test_values_that_need_the_model_fail_before_encoding(minilm_encoder, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("encoded before the check")

    monkeypatch.setattr("colengine.longdocs._forward", boom)
    with pytest.raises(ValueError, match="smaller than the window's 253 text tokens"):
        Retriever.build(["a text"], model=minilm_encoder, overlap=253)
    with pytest.raises(ValueError, match="shorter than the model's document length 256"):
        Retriever.build(["a text"], model=minilm_encoder, long_documents="late", context=100)


def test_cli_index_and_info_report_passages(tmp_path, tiny_model_path, capsys):
    from colengine.cli import main

    ids, texts = _corpus()
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in zip(ids, texts)))
    out = tmp_path / "idx"
    assert main(["index", str(corpus), "--out", str(out), "--model", str(tiny_model_path),
                 "--trust-remote-code", "--index", "exhaustive", "--long-documents", "late",
                 "--overlap", "0.25", "-q"]) == 0
    said = capsys.readouterr().out
    assert "13 documents as" in said and "passages" in said
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["long_documents"] == "late" and info["documents"] == 13
    assert info["passages"] > 13 and info["tokens"] > 0
    assert info["meta"]["passages"]["policy"]["overlap"] == 128


def test_passages_and_queries_encode_from_several_threads(tiny_encoder):
    """The server encodes queries and long documents on several threads with one encoder: the
    Rust tokenizer is not safe across threads (a call that changes its truncation while
    another runs fails with "Already borrowed", seen as a 500 under a write + search load), so
    every tokenizer use goes through the encoder's lock. Each thread's result must also equal
    the single-threaded one."""
    import threading

    pol = check_policy("chunk")
    doc = ["glaciers of iceland, note " + " ".join(["ice"] * 40)]
    want_q = tiny_encoder.encode_queries(["glaciers of iceland"], show_progress=False)
    want_d = encode_passages(tiny_encoder, doc, pol, show_progress=False)
    errors: list[str] = []

    def queries() -> None:
        try:
            for _ in range(100):
                got = tiny_encoder.encode_queries(["glaciers of iceland"], show_progress=False)
                assert torch.allclose(got, want_q, atol=1e-5)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))

    def passages() -> None:
        try:
            for _ in range(100):
                got = encode_passages(tiny_encoder, doc, pol, show_progress=False)
                assert np.allclose(np.asarray(got.docs.tokens, dtype=np.float32),
                                   np.asarray(want_d.docs.tokens, dtype=np.float32),
                                   atol=1e-3)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=f) for f in (queries, passages, queries, passages)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
