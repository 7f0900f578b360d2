"""The write-ahead log: torn and corrupt lines, replay by Retriever.load, stale logs ignored."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_hits_close

from colengine import Retriever, wal
from colengine.errors import IndexFormatError
from colengine.testing import sample_corpus


def test_records_round_trip_and_a_torn_tail_is_left_unread(tmp_path):
    path = tmp_path / "wal-000001.jsonl"
    recs = [wal.add_record([{"id": "a", "text": "x é", "metadata": {"n": 1}}]),
            wal.delete_record(["b", "c"])]
    end = wal.append_records(path, [wal.encode_record(r) for r in recs], 0)
    assert wal.read_records(path) == (recs, end)
    # a crash in the middle of the next append leaves a line without its newline
    with open(path, "ab") as f:
        f.write(wal.encode_record(wal.delete_record(["z"]))[:-5])
    assert wal.read_records(path) == (recs, end)
    assert wal.read_records(path, end) == ([], end)
    # the next writer cuts the torn line off before appending
    new = wal.delete_record(["d"])
    end2 = wal.append_records(path, [wal.encode_record(new)], end)
    assert wal.read_records(path) == (recs + [new], end2)
    assert path.stat().st_size == end2
    assert wal.read_records(tmp_path / "missing.jsonl", 0) == ([], 0)


@pytest.mark.parametrize("line", [b"00000000 {\"op\":\"delete\",\"ids\":[]}\n",  # wrong crc
                                  b"garbage\n",
                                  wal.encode_record({"op": "drop", "ids": []})])
def test_a_corrupt_record_is_an_error(tmp_path, line):
    path = tmp_path / "wal-000001.jsonl"
    path.write_bytes(wal.encode_record(wal.delete_record(["a"])) + line)
    with pytest.raises(IndexFormatError, match="corrupt write-ahead log"):
        wal.read_records(path)


def test_load_replays_the_current_log_and_ignores_stale_ones(tmp_path, tiny_encoder):
    corpus = sample_corpus()[:12]
    path = tmp_path / "idx"
    r = Retriever.build(corpus, [d["_id"] for d in corpus], model=tiny_encoder, path=path,
                        index="exhaustive", show_progress=False)
    gen = r.generation
    add = wal.add_record([{"id": "n1", "text": "a new text about volcanoes",
                           "metadata": {"lang": "is"}}])
    off = wal.append_records(wal.wal_path(path, gen), [wal.encode_record(add)], 0)
    wal.append_records(wal.wal_path(path, gen), [wal.encode_record(wal.delete_record(["doc0"]))],
                       off)
    # a log of an older generation (saved already; its deletion was cut short by a crash)
    wal.append_records(wal.wal_path(path, gen - 1),
                       [wal.encode_record(wal.delete_record(["doc1"]))], 0)

    loaded = Retriever.load(path, model=tiny_encoder)
    # reference: the same changes made in memory
    r.add(["a new text about volcanoes"], ["n1"], metadata=[{"lang": "is"}])
    r.delete(["doc0"])
    assert sorted(loaded.index.ids) == sorted(r.index.ids)
    assert "doc1" in loaded.index.ids and "doc0" not in loaded.index.ids
    assert loaded.get(["n1"]) == r.get(["n1"])
    got, want = loaded.search("volcanoes", k=5), r.search("volcanoes", k=5)
    assert [h.doc_id for h in got] == [h.doc_id for h in want]
    assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-4)
    plain = Retriever.load(path, model=tiny_encoder, replay_log=False)
    assert "n1" not in plain.index.ids and "doc0" in plain.index.ids

    loaded.save()                      # a checkpoint: the log's changes are now saved
    wal.prune_logs(path, loaded.generation)
    assert sorted(p.name for p in path.glob("wal-*")) == []
    again = Retriever.load(path, model=tiny_encoder)
    assert sorted(again.index.ids) == sorted(r.index.ids)


def _passages():
    from colengine.embeddings import PackedEmbeddings
    from colengine.longdocs import EncodedPassages

    rng = np.random.default_rng(0)
    docs = PackedEmbeddings.from_list([rng.standard_normal((n, 8)) for n in (3, 0, 5, 2)])
    return EncodedPassages(docs, [0, 0, 1, 2], [0, 1, 0, 0], [0, 3, 0, 0], [3, 5, 5, 2], 3,
                           {"documents": 3, "passages": 4})


def test_vectors_round_trip_bit_for_bit():
    from colengine.embeddings import PackedEmbeddings

    rng = np.random.default_rng(1)
    docs = PackedEmbeddings.from_list([rng.standard_normal((n, 16)) for n in (4, 1, 7)])
    rec = wal.add_record([{"id": str(i), "text": "t"} for i in range(3)], docs)
    back = wal.record_vectors(wal._decode(wal.encode_record(rec).rstrip(b"\n"), "log"), 16)
    assert back.tokens.dtype == np.float16
    np.testing.assert_array_equal(back.tokens, docs.tokens)
    np.testing.assert_array_equal(back.offsets, docs.offsets)
    p = _passages()
    rec = wal.add_record([{"id": str(i), "text": "t"} for i in range(3)], p)
    q = wal.record_vectors(wal._decode(wal.encode_record(rec).rstrip(b"\n"), "log"), 8)
    np.testing.assert_array_equal(q.docs.tokens, p.docs.tokens)
    for name in ("doc", "window", "start", "end"):
        np.testing.assert_array_equal(getattr(q, name), getattr(p, name))
    assert q.n_texts == 3 and q.report == p.report
    assert wal.record_vectors(wal.add_record([{"id": "a", "text": "t"}]), 8) is None
    assert wal.record_vectors(wal.delete_record(["a"]), 8) is None


@pytest.mark.parametrize("change, match", [
    (lambda v: v.update(dim=16), "dim 16 for an index of dim 8"),
    (lambda v: v.update(float16=v["float16"][:-8]), "bytes for 10 tokens"),
    (lambda v: v.update(float16="not base64!"), "not base64"),
    (lambda v: v.update(lengths=[3, -1, 5, 3]), "bad lengths"),
    (lambda v: v.update(kind="pickle"), "not a vectors object"),
    (lambda v: v.update(n_texts=4), "passages"),
    (lambda v: v.update(doc=[0, 0, 2, 1]), "passages"),
    (lambda v: v.pop("report"), "passages"),
])
def test_malformed_vectors_are_an_index_format_error(change, match):
    from colengine.errors import IndexFormatError

    v = wal.pack_vectors(_passages())
    change(v)
    with pytest.raises(IndexFormatError, match=match):
        wal.unpack_vectors(v, n_documents=3, dim=8)
    with pytest.raises(IndexFormatError, match="3 documents' vectors for 2 documents"):
        wal.unpack_vectors({**wal.pack_vectors(_passages().docs), "lengths": [3, 0, 7]},
                           n_documents=2, dim=8)


def test_a_load_applies_the_vectors_a_record_carries_without_encoding(tmp_path, tiny_encoder,
                                                                     monkeypatch):
    """An add logged with its vectors is replayed from them: a load whose encoder cannot
    encode documents still holds it, with the writer's scores; a record without vectors
    (an older log) is encoded again."""
    corpus = sample_corpus()[:12]
    path = tmp_path / "idx"
    r = Retriever.build(corpus, [d["_id"] for d in corpus], model=tiny_encoder, path=path,
                        index="plaid", show_progress=False)
    texts = ["a new text about volcanoes", "and one about the deep sea"]
    enc = r.encode_documents(texts)
    rec = wal.add_record([{"id": "n1", "text": texts[0]}, {"id": "n2", "text": texts[1]}], enc)
    wal.append_records(wal.wal_path(path, r.generation), [wal.encode_record(rec)], 0)
    r.add(texts, ["n1", "n2"], encoded=enc)

    def refuse(self, *a, **kw):
        raise AssertionError("documents encoded again")

    monkeypatch.setattr(Retriever, "encode_documents", refuse)
    loaded = Retriever.load(path, model=tiny_encoder)
    assert sorted(loaded.index.ids) == sorted(r.index.ids)
    for q in ("volcanoes", "deep sea"):
        assert_hits_close(loaded.search(q, k=5), r.search(q, k=5))
    monkeypatch.undo()
    plain = wal.add_record([{"id": "n3", "text": "an older record, no vectors"}])
    wal.append_records(wal.wal_path(path, r.generation), [wal.encode_record(plain)],
                       wal.wal_path(path, r.generation).stat().st_size)
    assert "n3" in Retriever.load(path, model=tiny_encoder).index.ids
