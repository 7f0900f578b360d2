"""The write-ahead log: torn and corrupt lines, replay by Retriever.load, stale logs ignored."""

from __future__ import annotations

import pytest

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
