"""A corpus read from disk on access (colengine.corpus.JsonlCorpus) and the streamed build
over it: same documents as a plain JSON parse, same index as a build from a list, and the
BM25 side never holding every text (issue 15)."""

from __future__ import annotations

import gc
import gzip
import json
import random
import tracemalloc

import numpy as np
import pytest
from conftest import assert_hits_close

from colengine.corpus import JsonlCorpus


def _write(path, rows, *, gz: bool = False, blank_lines: bool = False):
    lines = []
    for r in rows:
        lines.append(json.dumps(r, ensure_ascii=False) + "\n")
        if blank_lines:
            lines.append("\n")
    data = "".join(lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "délta", "ε", "zeta", "日本", "theta", "iota", "kappa"]
    out = []
    for i in range(n):
        row = {"_id": f"d{i}", "text": " ".join(rng.choices(words, k=rng.randint(1, 12)))}
        if i % 3 == 0:
            row["title"] = rng.choice(words)
        if i % 4 == 0:
            row["metadata"] = {"n": i, "even": i % 2 == 0}
        out.append(row)
    return out


@pytest.mark.parametrize("gz", [False, True])
def test_reads_what_a_plain_parse_reads(tmp_path, gz):
    rows = _rows(57)
    rows[5]["text"] = "   "                                 # blank: skipped
    rows[5].pop("title", None)
    path = _write(tmp_path / ("c.jsonl.gz" if gz else "c.jsonl"), rows, gz=gz, blank_lines=True)
    kept = [r for i, r in enumerate(rows) if i != 5]
    want = [{"title": r.get("title") or "", "text": r["text"]} for r in kept]
    c = JsonlCorpus(path)
    assert len(c) == len(kept) and c.skipped == 1
    assert c.ids == [r["_id"] for r in kept]
    assert c.metadata == [r.get("metadata") for r in kept]
    assert list(c) == want
    order = list(range(len(c)))
    random.Random(1).shuffle(order)                        # random access, backwards included
    assert [c[i] for i in order] == [want[i] for i in order]
    assert c[-1] == want[-1] and c[3:9] == want[3:9] and c[::7] == want[::7]
    with pytest.raises(IndexError):
        c[len(c)]
    with pytest.raises(TypeError):
        c["0"]
    c.close()
    assert c[2] == want[2]                                  # reopened on the next read


@pytest.mark.parametrize("line, match", [
    ('{"_id": "a", "text": "x"}\n{"_id": "b", "text": 3}\n', r"c\.jsonl:2: document 'b': 'text' must be a string, got int"),
    ('{"_id": "a", "text": "x"}\nnot json\n', r"c\.jsonl:2: not valid JSON"),
    ('[1, 2]\n', r"c\.jsonl:1: expected a JSON object, got list"),
    ('{"text": "x"}\n', r"c\.jsonl:1: a corpus row needs '_id' or 'docid' or 'id' and 'text'"),
    ('{"_id": "a", "text": "x", "metadata": [1]}\n', r"c\.jsonl:1: 'metadata' must be an object"),
    ('{"_id": "a", "text": "x", "title": 5}\n', r"c\.jsonl:1: 'title' must be a string"),
])
def test_bad_rows_are_named_by_file_and_line(tmp_path, line, match):
    (tmp_path / "c.jsonl").write_text(line)
    with pytest.raises(ValueError, match=match):
        JsonlCorpus(tmp_path / "c.jsonl")


def test_empty_documents_are_refused_when_asked_and_fields_are_chosen(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"key": "a", "body": "x"}\n{"key": "b", "body": ""}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: document 'b' is empty"):
        JsonlCorpus(p, id_field="key", text_field="body", skip_empty=False)
    c = JsonlCorpus(p, id_field="key", text_field="body")
    assert c.ids == ["a"] and c[0] == {"title": "", "text": "x"}
    with pytest.raises(FileNotFoundError):
        JsonlCorpus(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_bytes(b'{"_id": "a", "text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: not UTF-8"):
        JsonlCorpus(tmp_path / "bad.jsonl")


def test_a_file_changed_after_indexing_is_a_clear_error(tmp_path):
    p = _write(tmp_path / "c.jsonl", _rows(4))
    c = JsonlCorpus(p)
    p.write_text("garbage\n" * 40)
    with pytest.raises(ValueError, match="changed after it was indexed"):
        c[2]


def test_streamed_build_from_disk_equals_the_build_from_a_list(tiny_encoder, tmp_path):
    """Retriever.build over a JsonlCorpus (stream=True: every step reads it a chunk at a time)
    gives the index, BM25, texts and metadata of the same build over the documents as a list."""
    from colengine import Retriever
    from colengine.testing import sample_corpus

    docs = sample_corpus()
    rows = [{**d, "metadata": {"i": i, "odd": i % 2 == 1}} for i, d in enumerate(docs)]
    corpus = JsonlCorpus(_write(tmp_path / "c.jsonl", rows))
    ids = [d["_id"] for d in docs]
    as_list = [{"title": d.get("title") or "", "text": d["text"]} for d in docs]
    kw = dict(model=tiny_encoder, index="plaid", seed=4, stream=True, chunk_size=7, bm25=True,
              show_progress=False, long_documents="truncate")
    a = Retriever.build(corpus, corpus.ids, metadata=corpus.metadata, path=tmp_path / "a", **kw)
    b = Retriever.build(as_list, ids, metadata=[r["metadata"] for r in rows], **kw)
    np.testing.assert_array_equal(a.index.codes, b.index.codes)
    np.testing.assert_array_equal(a.index.residuals, b.index.residuals)
    back = Retriever.load(tmp_path / "a", trust_remote_code=True)
    for q in (docs[3]["text"], docs[10]["text"][:40]):
        assert_hits_close(back.search(q, k=5), b.search(q, k=5))
        assert_hits_close(back.search(q, k=5, pipeline="bm25"), b.search(q, k=5, pipeline="bm25"))
        flt = {"odd": True}
        got = back.search(q, k=5, filter=flt, return_metadata=True)
        assert_hits_close(got, b.search(q, k=5, filter=flt, return_metadata=True))
        assert got and all(h.metadata["odd"] for h in got)
    assert back.get(ids) == b.get(ids)
    assert back.get([ids[0]])[0]["text"] == docs[0]["text"]


def test_bm25_over_a_corpus_on_disk_does_not_hold_every_text(tmp_path):
    """The BM25 side of a streamed build tokenises the corpus read a chunk at a time and keeps
    packed term ids (4 bytes a term), not texts: the tokenising pass's Python allocations peak
    far below the corpus's text (one chunk of 1,024 texts and the term ids), which a list of the texts (the control) holds whole. The
    index built from the lazy corpus equals the one built from the list."""
    from colengine.bm25 import Analyzer, BM25Index
    from colengine.retriever import _Texts

    rng = random.Random(3)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=30)) for _ in range(300)]
    rows = [{"_id": str(i), "text": " ".join(rng.choices(vocab, k=25))} for i in range(12_000)]
    corpus = JsonlCorpus(_write(tmp_path / "c.jsonl", rows))
    text_bytes = sum(len(r["text"]) for r in rows)          # 9.3 MB
    del rows
    gc.collect()

    def peak(texts):
        tracemalloc.start()
        try:
            terms, _ = BM25Index._encode_texts(texts(), Analyzer("en"), [], {}, False)
            return tracemalloc.get_traced_memory()[1], terms
        finally:
            tracemalloc.stop()

    peak(lambda: _Texts(corpus)[:10])                       # imports and caches, not measured
    lazy_peak, terms = peak(lambda: _Texts(corpus))
    list_peak, _ = peak(lambda: list(_Texts(corpus)))
    assert list_peak > text_bytes                            # the measurement sees a held corpus
    assert lazy_peak < 0.4 * text_bytes, (lazy_peak, text_bytes, terms.nbytes)
    lazy = BM25Index.build(_Texts(corpus), corpus.ids, show_progress=False)
    eager = BM25Index.build(list(_Texts(corpus)), corpus.ids, show_progress=False)
    q = [" ".join(vocab[:3]), vocab[7]]
    for got, want in zip(lazy.search(q, k=10), eager.search(q, k=10)):
        assert got and len(got) == len(want)
        assert_hits_close(got, want)
