"""Sharded indexes on a local Ray with 2 CPUs: equality with one index, routing, persistence
and faults (killed actors, missing or corrupted shard folders)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import ray
from conftest import assert_hits_close, hold_first_append

from colengine import IndexFormatError, Retriever
from colengine.distributed import ShardedRetriever, ShardUnavailableError, shard_of
from colengine.distributed.shard import build_plaid_shard
from colengine.errors import DuplicateIdError, FilterError, UnknownIdError
from colengine.server.service import BACKGROUND_NICE
from colengine.storage import current_generation
from colengine.testing import sample_corpus

QUERIES = ["how do plants make energy?", "what powers the cell",
           "which language prevents data races without garbage collection",
           "how do search engines rank documents for keywords"]
SHARDS = 3


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(minilm_encoder):
    docs = sample_corpus()
    ids = [d["_id"] for d in docs]
    meta = [{"topic": "science" if i < 16 else "tech", "year": 2000 + i}
            for i in range(len(docs))]
    packed = minilm_encoder.encode_documents(
        [f"{d['title']} {d['text']}" for d in docs], show_progress=False)
    return docs, ids, meta, packed


@pytest.fixture(scope="module")
def exhaustive(corpus, minilm_encoder, tmp_path_factory):
    """3 exhaustive shards built by ``colengine index --shards 3`` (Ray Data encoding)."""
    from colengine.cli import main

    docs, _, meta, _ = corpus
    root = tmp_path_factory.mktemp("exh")
    data = root / "corpus.jsonl"
    data.write_text("".join(json.dumps({**d, "metadata": m}) + "\n" for d, m in zip(docs, meta)))
    assert main(["index", str(data), "--out", str(root / "idx"), "--model", minilm_encoder.name,
                 "--device", "cpu", "--shards", str(SHARDS), "--index", "exhaustive",
                 "-q"]) == 0
    r = ShardedRetriever.load(root / "idx", model=minilm_encoder, timeout=20)
    yield r
    r.close()


@pytest.fixture(scope="module")
def plaid(corpus, minilm_encoder, tmp_path_factory):
    """3 PLAID shards on shared centroids, built from the vectors encoded here."""
    docs, ids, meta, packed = corpus
    r = ShardedRetriever.build_encoded(packed, ids, model=minilm_encoder, documents=docs,
                                       metadata=meta, shards=SHARDS,
                                       path=tmp_path_factory.mktemp("plaid") / "idx", timeout=20)
    yield r
    r.close()


def _copy(r: ShardedRetriever, dst: Path, encoder, **kw) -> ShardedRetriever:
    shutil.copytree(r.path, dst)
    return ShardedRetriever.load(dst, model=encoder, **{"timeout": 20, **kw})


def test_exhaustive_shards_equal_one_index(exhaustive, corpus, minilm_encoder):
    docs, ids, meta, _ = corpus
    one = Retriever.build(docs, ids=ids, model=minilm_encoder, index="exhaustive",
                          metadata=meta, show_progress=False)
    for k in (5, len(ids)):
        got = exhaustive.search_batch(QUERIES, k=k)
        want = one.search_batch(QUERIES, k=k)
        for g, w in zip(got, want):
            assert not g.partial
            assert_hits_close(g, w, atol=2e-3)
    flt = {"topic": "tech", "year": {"$lt": 2028}}
    for q in QUERIES:
        got = exhaustive.search(q, k=4, filter=flt, return_metadata=True)
        assert_hits_close(got, one.search(q, k=4, filter=flt), atol=2e-3)
        assert all(h.metadata["topic"] == "tech" and h.metadata["year"] < 2028 for h in got)
    assert len(exhaustive) == len(ids)
    assert exhaustive.centroids is None


def test_plaid_shards_equal_one_plaid_index_with_the_same_centroids(plaid, corpus,
                                                                    minilm_encoder):
    _, ids, _, packed = corpus
    ref = build_plaid_shard(packed, ids, centroids=plaid.centroids, codec=plaid.codec,
                            normalized=plaid.normalized, device="cpu")
    n = len(ids)
    # nothing pruned: every centroid probed, no threshold, every candidate scored exactly
    knobs = {"n_probe": ref.n_centroids, "centroid_score_threshold": None,
             "n_candidates": n, "n_exact": n}
    q = minilm_encoder.encode_queries(QUERIES)
    for k in (3, 10):
        got = plaid.search_batch(QUERIES, k=k, **knobs)
        want = ref.search(q, k=k, **knobs)
        for g, w in zip(got, want):
            assert [h.doc_id for h in g] == [h.doc_id for h in w]
            np.testing.assert_allclose([h.score for h in g], [h.score for h in w],
                                       rtol=1e-5, atol=1e-4)
    # the sharded index's shared centroids are what every shard stores
    assert plaid.centroids.dtype == np.float16 and plaid.centroids.shape[1] == 128
    for s in plaid.meta["shards"]:
        shard = Retriever.load(plaid.path / s["name"], model=minilm_encoder, verify=False)
        np.testing.assert_array_equal(np.asarray(shard.index.centroids), plaid.centroids)
        assert all(shard_of(i, SHARDS) == int(s["name"][-4:]) for i in shard.index.ids)


def test_refined_plaid_shards_rank_as_one_exhaustive_index(corpus, minilm_encoder, tmp_path):
    """``refine="float16"``: every shard keeps its tokens at the exhaustive index's precision,
    so with nothing pruned the sharded PLAID search returns the exhaustive ranking."""
    docs, ids, meta, packed = corpus
    with pytest.raises(ValueError, match="refine must be one of"):
        ShardedRetriever.build_encoded(packed, ids, model=minilm_encoder, shards=2,
                                       refine="fp8", path=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    r = ShardedRetriever.build_encoded(packed, ids, model=minilm_encoder, documents=docs,
                                       shards=2, refine="float16", path=tmp_path / "idx",
                                       timeout=20)
    try:
        one = Retriever.build(docs, ids=ids, model=minilm_encoder, index="exhaustive",
                              show_progress=False)
        n = len(ids)
        knobs = {"n_probe": 10**6, "centroid_score_threshold": None, "n_candidates": n,
                 "n_exact": n}
        for g, w in zip(r.search_batch(QUERIES, k=5, **knobs), one.search_batch(QUERIES, k=5)):
            assert_hits_close(g, w, atol=1e-4)
        for s in r.meta["shards"]:
            shard = Retriever.load(r.path / s["name"], model=minilm_encoder, verify=False)
            assert shard.index.refine_kind == "float16"
    finally:
        r.close()


def _owned(r: ShardedRetriever, ids: list[str]) -> dict[str, int]:
    """Which shard holds each of ``ids`` (asked of every shard)."""
    held = {}
    res, _ = r._call("known", {i: (ids,) for i in range(r.n_shards)})
    for s, found in res.items():
        for doc_id in found:
            assert doc_id not in held, f"{doc_id} held by two shards"
            held[doc_id] = s
    return held


def test_add_delete_routing_against_a_dict(plaid, corpus, minilm_encoder, tmp_path):
    docs, ids, _, _ = corpus
    r = _copy(plaid, tmp_path / "idx", minilm_encoder)
    model = {i: d["text"] for i, d in zip(ids, docs)}
    try:
        new = [f"kelp-{j}" for j in range(7)]
        texts = [f"Kelp forest number {j} turns sunlight into sugar under the sea." for j in
                 range(7)]
        assert r.add(texts, ids=new, metadata=[{"topic": "sea", "n": j} for j in range(7)]) == new
        model.update(zip(new, texts))
        gone = ["doc3", "doc17", "kelp-2", "doc30"]
        r.delete(gone)
        for g in gone:
            del model[g]
        given = str(len(ids))             # the next automatic id, given explicitly
        r.add(["Given the next automatic id."], ids=[given])
        model[given] = "Given the next automatic id."
        auto = r.add(["An automatic id for this one."])
        assert auto == [str(len(ids) + 1)]   # automatic ids go on from the build's count,
        model[auto[0]] = "An automatic id for this one."   # past the ids given explicitly
        everything = sorted(set(ids) | set(new) | set(auto) | {given})
        held = _owned(r, everything)
        assert held == {i: shard_of(i, SHARDS) for i in model}
        assert len(r) == len(model)
        assert [d["text"] for d in r.get(sorted(model))] == [model[i] for i in sorted(model)]
        got = r.search("kelp forest sunlight sugar sea", k=len(model), filter={"topic": "sea"})
        assert sorted(h.doc_id for h in got) == sorted(i for i in new if i in model)
        with pytest.raises(DuplicateIdError, match="kelp-0"):
            r.add(["again"], ids=["kelp-0"])
        with pytest.raises(UnknownIdError, match="doc3"):
            r.delete(["doc3"])
        assert _owned(r, everything) == held       # a refused change changed nothing
    finally:
        r.close()


def test_save_and_load_the_top_manifest(plaid, minilm_encoder, tmp_path):
    r = _copy(plaid, tmp_path / "idx", minilm_encoder)
    try:
        before = json.loads((r.path / "manifest.json").read_text())
        r.add(["Seagrass meadows store carbon in their roots."], ids=["seagrass"])
        r.delete(["doc5"])
        touched = {shard_of("seagrass", SHARDS), shard_of("doc5", SHARDS)}
        want = r.search_batch(QUERIES + ["seagrass carbon"], k=5)
        r.save()
        after = json.loads((r.path / "manifest.json").read_text())
        assert after["generation"] == before["generation"] + 1
        for i, (b, a) in enumerate(zip(before["meta"]["shards"], after["meta"]["shards"])):
            assert a["generation"] == current_generation(r.path / a["name"])
            assert a["generation"] == b["generation"] + (1 if i in touched else 0)
        assert sum(s["documents"] for s in after["meta"]["shards"]) == len(r)
        r.close()
        r = ShardedRetriever.load(r.path, model=minilm_encoder, timeout=20)
        assert len(r) == 32
        got = r.search_batch(QUERIES + ["seagrass carbon"], k=5)
        for g, w in zip(got, want):
            assert [h.doc_id for h in g] == [h.doc_id for h in w]
        assert r.get(["seagrass"])[0]["text"].startswith("Seagrass")
        # a change not saved is not on disk: the shard folder keeps its generation
        r.add(["Not saved."], ids=["unsaved"])
        name = r.names[shard_of("unsaved", SHARDS)]
        shard = Retriever.load(r.path / name, model=minilm_encoder, verify=False)
        assert "unsaved" not in shard.index.ids
        assert shard.generation == after["meta"]["shards"][int(name[-4:])]["generation"]
    finally:
        r.close()


def test_a_killed_shard_actor_is_restarted_and_the_search_retried(plaid, minilm_encoder,
                                                                 tmp_path):
    r = _copy(plaid, tmp_path / "idx", minilm_encoder)
    try:
        r.add(["Kelp forests turn sunlight into sugar under the sea."], ids=["kelp"])
        want = r.search_batch(QUERIES, k=5)
        owner = shard_of("kelp", SHARDS)
        ray.kill(r.actors[owner], no_restart=False)      # Ray restarts it from its folder
        got = r.search_batch(QUERIES, k=5)
        for g, w in zip(got, want):
            assert not g.partial
            assert [(h.doc_id, h.score) for h in g] == [(h.doc_id, h.score) for h in w]
        assert r.restarts[owner] == 1
        # the unsaved add was replayed into the new actor
        assert _owned(r, ["kelp"]) == {"kelp": owner}
    finally:
        r.close()


def test_a_dead_shard_fails_naming_it_unless_partial_is_allowed(plaid, minilm_encoder,
                                                               tmp_path):
    r = _copy(plaid, tmp_path / "idx", minilm_encoder)
    try:
        n = len(r)
        full = r.search_batch(QUERIES, k=n)
        dead = 1
        ray.kill(r.actors[dead], no_restart=True)
        # the live shards must answer within the timeout (a late one counts as missing too):
        # on a loaded 2-core machine 2 s was not always enough for them, for either call
        r.timeout = 10.0
        with pytest.raises(ShardUnavailableError, match="shard-0001") as e:
            r.search(QUERIES[0], k=5)
        assert e.value.shards == ("shard-0001",)
        got = r.search_batch(QUERIES, k=5, allow_partial=True)
        for g, f in zip(got, full):
            assert g.partial and g.missing == ("shard-0001",)
            alive = [h for h in f if shard_of(h.doc_id, SHARDS) != dead][:5]
            # (k = n scores every live document exactly, k = 5 searches: two computations)
            assert_hits_close(g, alive)
    finally:
        r.close()


def test_a_missing_or_corrupted_shard_folder_is_named_at_load(plaid, minilm_encoder,
                                                              tmp_path):
    missing = tmp_path / "missing"
    shutil.copytree(plaid.path, missing)
    shutil.rmtree(missing / "shard-0001")
    with pytest.raises(IndexFormatError, match="shard-0001.*missing"):
        ShardedRetriever.load(missing, model=minilm_encoder)

    flipped = tmp_path / "flipped"          # same size, one byte changed: the checksum
    shutil.copytree(plaid.path, flipped)
    gen = current_generation(flipped / "shard-0002")
    codes = flipped / "shard-0002" / f"g{gen:06d}" / "index" / "residuals.npy"
    data = bytearray(codes.read_bytes())
    data[-1] ^= 0xFF
    codes.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="shard-0002.*checksum"):
        ShardedRetriever.load(flipped, model=minilm_encoder, timeout=20)

    cut = tmp_path / "cut"                  # truncated: found before any actor starts
    shutil.copytree(plaid.path, cut)
    codes = cut / "shard-0000" / f"g{current_generation(cut / 'shard-0000'):06d}" / "index" \
        / "codes.npy"
    codes.write_bytes(codes.read_bytes()[:-2])
    with pytest.raises(IndexFormatError, match="shard-0000.*truncated"):
        ShardedRetriever.load(cut, model=minilm_encoder)

    from colengine.distributed.sharded import _start, _unfinished

    unfinished = tmp_path / "unfinished"     # a build that stopped before its top manifest
    _start(unfinished, minilm_encoder)
    with pytest.raises(IndexFormatError, match="did not finish"):
        ShardedRetriever.load(unfinished, model=minilm_encoder)
    assert _unfinished(unfinished) and not _unfinished(plaid.path)


def test_bad_input_is_refused_at_the_door(plaid, corpus, minilm_encoder, tmp_path):
    docs, ids, _, packed = corpus
    with pytest.raises(ValueError, match="shards must be positive"):
        ShardedRetriever.build(docs, ids=ids, model=minilm_encoder, shards=0, path=tmp_path / "a")
    with pytest.raises(ValueError, match="empty: use fewer shards"):
        ShardedRetriever.build(docs, ids=ids, model=minilm_encoder, shards=200,
                               path=tmp_path / "b")
    with pytest.raises(DuplicateIdError):
        ShardedRetriever.build(docs, ids=["x"] * len(docs), model=minilm_encoder, shards=2,
                               path=tmp_path / "c")
    with pytest.raises(ValueError, match="already holds an index"):
        ShardedRetriever.build_encoded(packed, ids, model=minilm_encoder, shards=2,
                                       path=plaid.path)
    assert not any((tmp_path / n).exists() and any((tmp_path / n).iterdir()) for n in "abc")
    with pytest.raises(FilterError):
        plaid.search("q", filter={"year": {"$where": 1}})
    with pytest.raises(TypeError, match="knob"):
        plaid.search("q", n_prob=3)
    with pytest.raises(ValueError):
        plaid.search("   ")


def test_without_ray_the_engine_works_and_sharding_says_how_to_install():
    code = """
import importlib.abc, sys
class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoRay())
import colengine
from colengine import Retriever
from colengine.distributed import shard_of
print(shard_of("a", 4))
try:
    from colengine.distributed import ShardedRetriever
except ImportError as e:
    print("ImportError:", e)
"""
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'colengine[ray]'" in out.stdout


def test_cli_search_a_sharded_index(exhaustive, corpus, minilm_encoder, tmp_path, capsys):
    from colengine.cli import main

    flt = {"topic": "tech"}
    assert main(["search", str(exhaustive.path), QUERIES[0], "-k", "3", "--json", "--model",
                 minilm_encoder.name, "--filter", json.dumps(flt)]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = exhaustive.search(QUERIES[0], k=3, filter=flt)
    assert [h["doc_id"] for h in got] == [h.doc_id for h in want]
    info = json.loads((exhaustive.path / "manifest.json").read_text())["meta"]
    assert [s["documents"] for s in info["shards"]] == [
        sum(shard_of(i, SHARDS) == s for i in corpus[1]) for s in range(SHARDS)]
    data = tmp_path / "c.txt"
    data.write_text("one\ntwo\n")
    with pytest.raises(SystemExit, match="--bm25 cannot be combined with --shards"):
        main(["index", str(data), "--out", str(tmp_path / "b"), "--shards", "2", "--bm25"])


def test_serve_a_sharded_index(plaid, minilm_encoder, tmp_path):
    import time

    from fastapi.testclient import TestClient

    from colengine.server.app import create_app

    path = tmp_path / "idx"
    shutil.copytree(plaid.path, path)
    flt = {"topic": "tech"}
    want = plaid.search_batch(QUERIES[:2], k=3, filter=flt)
    with TestClient(create_app(path, model=minilm_encoder, device="cpu")) as c:
        deadline = time.monotonic() + 60
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline, c.get("/health").json()
            time.sleep(0.2)
        res = c.post("/search", json={"queries": QUERIES[:2], "k": 3, "filter": flt}).json()
        for g, w in zip(res["results"], want):
            assert [h["id"] for h in g] == [h.doc_id for h in w]
            np.testing.assert_allclose([h["score"] for h in g], [h.score for h in w], rtol=1e-6)
        doc = {"id": "n1", "text": "Kelp forests turn sunlight into sugar.",
               "metadata": {"topic": "sea"}}
        assert c.post("/documents", json={"documents": [doc]}).json() == {"added": 1}
        assert c.post("/documents", json={"documents": [doc]}).status_code == 409
        assert c.get("/documents/n1").json()["metadata"] == {"topic": "sea"}
        assert c.post("/documents/delete", json={"ids": ["doc4"]}).json() == {"deleted": 1}
        info = c.get("/info").json()
        assert info["sharded"] and info["documents"] == 32 and len(info["shards"]) == SHARDS
        assert c.post("/search", json={"queries": ["q"], "pipeline": "bm25"}).status_code == 400
    r = ShardedRetriever.load(path, model=minilm_encoder, timeout=20)   # acknowledged = saved
    try:
        assert set(_owned(r, ["n1", "doc4"])) == {"n1"}
    finally:
        r.close()


def test_a_sharded_service_encodes_its_adds_in_a_child_process(plaid, minilm_encoder, tmp_path):
    """Given the model by name (as `colengine serve` loads it), a sharded service encodes
    adds in a child process: its hits equal those of the same documents added in process,
    and so do a fresh load's, which replays the log the child's vectors went into."""
    from colengine.distributed.service import ShardedService

    path = Path(shutil.copytree(plaid.path, tmp_path / "idx"))
    ref_path = Path(shutil.copytree(plaid.path, tmp_path / "ref"))
    new = [{"id": f"vent-{j}", "text": f"Hydrothermal vent {j} feeds tube worms in the dark."}
           for j in range(3)]
    q = "tube worms at hydrothermal vents"
    s = ShardedService(path, model=str(minilm_encoder.name), device="cpu",
                       checkpoint_docs=10**9, checkpoint_seconds=10**9)
    s.open()
    try:
        assert s.ready, s.error
        assert s.info()["write_encoder"] == "process"
        assert s.add(new) == 3
        served = s.search([q], k=5)[0]
    finally:
        s.close(checkpoint=False)
    ref = ShardedRetriever.load(ref_path, model=minilm_encoder)
    try:
        ref.add([d["text"] for d in new], ids=[d["id"] for d in new])
        want = ref.search(q, k=5)
    finally:
        ref.close()
    assert {h.doc_id for h in want} & {d["id"] for d in new}
    assert_hits_close(served, want)
    again = ShardedRetriever.load(path, model=minilm_encoder)
    try:
        assert_hits_close(again.search(q, k=5), want)
    finally:
        again.close()


def test_sharded_serve_logs_writes_and_a_load_after_a_crash_replays_them(plaid, corpus,
                                                                          minilm_encoder,
                                                                          tmp_path, monkeypatch):
    """Writes through the sharded server's service go to the write-ahead log (no save per
    write; each add encoded at the writes' lower priority); a load of the folder as a crash
    leaves it (no checkpoint) holds every acknowledged write, automatic ids included, against
    a dict model of the documents, with the service's hits; a checkpoint saves a new
    generation and deletes the log."""
    from colengine import wal
    from colengine.distributed.service import ShardedService

    docs, ids, _, _ = corpus
    path = tmp_path / "idx"
    shutil.copytree(plaid.path, path)
    gen = current_generation(path)
    model = {i: d["text"] for i, d in zip(ids, docs)}
    s = ShardedService(path, model=minilm_encoder, device="cpu", checkpoint_docs=10**9,
                       checkpoint_seconds=10**9)
    s.open()
    assert s.ready, s.error
    encoder, nices = s.retriever.encoder, []
    encode = encoder.encode_documents

    def encode_seen(*args, **kwargs):   # the thread's nice value while it encodes an add
        nices.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return encode(*args, **kwargs)

    monkeypatch.setattr(encoder, "encode_documents", encode_seen)
    try:
        new = [{"id": f"kelp-{j}", "text": f"Kelp forest {j} turns sunlight into sugar.",
                "metadata": {"topic": "sea"}} for j in range(3)]
        assert s.add(new[:2]) == 2 and s.add(new[2:]) == 1
        assert s.add([{"text": "An automatic id for this one."}]) == 1
        if sys.platform.startswith("linux"):   # encoded at the writes' lower priority
            mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            assert nices == [max(mine, BACKGROUND_NICE)] * 3
        assert s.delete(["doc4", "kelp-1"]) == 2
        model.update({d["id"]: d["text"] for d in new})
        model[str(len(ids))] = "An automatic id for this one."
        del model["doc4"], model["kelp-1"]
        with pytest.raises(DuplicateIdError, match="kelp-0"):
            s.add([new[0]])
        assert len(nices) == 3                  # refused before it was encoded
        assert current_generation(path) == gen                  # no save per write
        assert s.stats["log_appends"] == 4 and wal.wal_path(path, gen).stat().st_size > 0
        q = ["kelp forest sunlight sugar", QUERIES[0]]
        want = s.search(q, k=5, return_metadata=True)
        r = ShardedRetriever.load(path, model=minilm_encoder, timeout=20)   # as after kill -9
        try:
            assert r.generation == gen and r.log_end == wal.wal_path(path, gen).stat().st_size
            assert len(r) == len(model)
            assert set(_owned(r, sorted(set(model) | {"doc4", "kelp-1"}))) == set(model)
            assert [d["text"] for d in r.get(sorted(model))] == [model[i] for i in sorted(model)]
            for g, w in zip(r.search_batch(q, k=5, return_metadata=True), want):
                assert_hits_close(g, w)
            assert r.add(["the counter went on"]) == [str(len(ids) + 1)]
        finally:
            r.close()
        assert s.checkpoint() and not s.checkpoint()
        assert current_generation(path) == gen + 1 and not list(path.glob("wal-*"))
        r = ShardedRetriever.load(path, model=minilm_encoder, timeout=20)
        try:
            assert r.log_end == 0 and len(r) == len(model)
            for g, w in zip(r.search_batch(q, k=5, return_metadata=True), want):
                assert_hits_close(g, w)
        finally:
            r.close()
    finally:
        s.close(checkpoint=False)


def test_sharded_serve_searches_during_a_checkpoint_and_writes_wait_for_it(plaid, minilm_encoder,
                                                                            tmp_path):
    """A checkpoint holds off writes, not searches. The test holds the writer lock of the shard
    that owns an unsaved document, so that shard actor's save waits inside ``Retriever.save``:
    meanwhile a search through the service answers (with that document: the state in memory),
    and an add waits; once the lock is let go, the checkpoint saves a new generation and the
    add goes to the new generation's log, and a load holds both documents."""
    from colengine.distributed.service import ShardedService
    from colengine.storage import writer_lock

    path = tmp_path / "idx"
    shutil.copytree(plaid.path, path)
    gen = current_generation(path)
    s = ShardedService(path, model=minilm_encoder, device="cpu", checkpoint_docs=10**9,
                       checkpoint_seconds=10**9)
    s.open()
    assert s.ready, s.error
    kelp = [{"id": f"kelp-{j}", "text": f"Kelp forest {j} turns sunlight into sugar."}
            for j in range(2)]
    q = ["kelp forest sunlight sugar"]
    try:
        assert s.add(kelp[:1]) == 1
        saving = threading.Event()
        call = s.retriever._call

        def observed(method, *a, **kw):
            if method == "save":
                saving.set()
            return call(method, *a, **kw)

        s.retriever._call = observed
        owner = path / s.retriever.names[shard_of("kelp-0", SHARDS)]
        found: list = []
        with writer_lock(owner):
            ckpt = threading.Thread(target=s.checkpoint)
            ckpt.start()
            assert saving.wait(30)
            search = threading.Thread(target=lambda: found.extend(s.search(q, k=3)))
            search.start()
            search.join(20)   # less than the 30 s a shard's save may take before it fails
            assert not search.is_alive(), "a search waited for the checkpoint"
            adding = threading.Thread(target=s.add, args=(kelp[1:],))
            adding.start()
            adding.join(1.0)
            assert adding.is_alive() and ckpt.is_alive(), "an add went on during a checkpoint"
        ckpt.join(60)
        adding.join(60)
        assert not ckpt.is_alive() and not adding.is_alive()
        assert found[0][0].doc_id == "kelp-0"
        assert s.stats["checkpoints"] == 1 and current_generation(path) == gen + 1
        assert {h.doc_id for h in s.search(q, k=2)[0]} == {"kelp-0", "kelp-1"}
    finally:
        s.close(checkpoint=False)
    r = ShardedRetriever.load(path, model=minilm_encoder, timeout=20)   # replays kelp-1's log
    try:
        assert r.generation == gen + 1 and r.log_end > 0
        assert [d["text"] for d in r.get(["kelp-0", "kelp-1"])] == [d["text"] for d in kelp]
    finally:
        r.close()


def test_a_shard_actor_searches_while_it_saves_and_adds_alone(plaid, minilm_encoder, tmp_path):
    """The actor's own locking (its calls run on several threads): a save that waits (the
    test holds the shard folder's writer lock) lets searches and gets through, an add waits
    for it, and the add lands after the save (in memory, not in the saved generation)."""
    from colengine.distributed.shard import ShardActor
    from colengine.storage import writer_lock

    folder = tmp_path / plaid.names[0]
    shutil.copytree(plaid.path / plaid.names[0], folder)
    actor = ShardActor(plaid.names[0], str(folder), plaid.meta["model"])
    assert actor.error is None, actor.error
    gen = actor.retriever.generation
    q = minilm_encoder.encode_queries(["kelp forest sunlight sugar"]).numpy()
    new = minilm_encoder.encode_documents(["Kelp forests turn sunlight into sugar."],
                                          show_progress=False)
    before = actor.search(None, q, 3, None, False, False, {})[1]
    with writer_lock(folder):
        saving = threading.Thread(target=actor.save, args=(None,))
        saving.start()
        saving.join(0.5)
        assert saving.is_alive()                        # waiting for the writer lock
        found: list = []
        search = threading.Thread(target=lambda: found.append(
            actor.search(None, q, 3, None, False, False, {})))
        search.start()
        search.join(20)
        assert not search.is_alive(), "a search waited for the save"
        boot, hits = found[0]
        assert boot == actor.boot and [h.doc_id for h in hits[0]] == [h.doc_id for h in before[0]]
        adding = threading.Thread(target=actor.add, args=(None, ["kelp"], [{"text": "kelp"}],
                                                          new.tokens, new.offsets))
        adding.start()
        adding.join(1.0)
        assert adding.is_alive() and saving.is_alive(), "an add went on during a save"
    saving.join(60)
    adding.join(60)
    assert not saving.is_alive() and not adding.is_alive()
    assert actor.retriever.generation == gen + 1
    assert actor.search(None, q, 1, None, False, False, {})[1][0][0].doc_id == "kelp"
    assert len(Retriever.load(folder, model=minilm_encoder)) == len(actor.retriever) - 1


def test_sharded_serve_groups_concurrent_writes_into_shared_fsyncs(plaid, corpus, minilm_encoder,
                                                                   tmp_path):
    """Writes from many threads share log appends (the first one is held until the rest are
    queued behind it); inside a batch each write is checked on top of the ones before it (a
    duplicate of an earlier request, an unknown id, a delete of a document added earlier in
    the batch), automatic ids follow the queue, past an id given explicitly before them; a
    load as after ``kill -9`` holds exactly the acknowledged writes, against a dict model."""
    from colengine.distributed.service import ShardedService

    docs, ids, _, _ = corpus
    path = tmp_path / "idx"
    shutil.copytree(plaid.path, path)
    model = {i: d["text"] for i, d in zip(ids, docs)}
    s = ShardedService(path, model=minilm_encoder, device="cpu", checkpoint_docs=10**9,
                       checkpoint_seconds=10**9)
    s.open()
    assert s.ready, s.error
    requests = [("add", {"id": f"reef-{j}", "text": f"Coral reef {j} shelters young fish."})
                for j in range(6)]
    requests += [("add", {"id": "reef-1", "text": "a second reef-1"}),   # duplicate -> 409
                 ("delete", ["no-such-id"]),                                 # unknown -> 404
                 ("delete", ["reef-2", "doc3"]),           # added earlier in the batch: fine
                 ("add", {"id": str(len(ids)), "text": "The next automatic id, given."}),
                 ("add", {"text": "An automatic id."})]     # skips the one given before it
    appends: list[int] = []
    hold_first_append(s, len(requests), appends)
    outcome: dict[int, object] = {}
    try:
        def send(n: int) -> None:
            op, arg = requests[n]
            try:
                outcome[n] = s.add([arg]) if op == "add" else s.delete(arg)
            except Exception as e:  # noqa: BLE001 - checked below
                outcome[n] = e

        first = threading.Thread(target=send, args=(0,))
        first.start()
        while not appends:          # the first request is in its (held) log append
            first.join(0.05)
        rest = [threading.Thread(target=send, args=(n,)) for n in range(1, len(requests))]
        for n, th in enumerate(rest, 1):
            th.start()
            while len(s._commit.queue) < n:   # queued in this order
                th.join(0.02)
        for th in [first, *rest]:
            th.join(60)
        assert isinstance(outcome[6], DuplicateIdError)
        assert isinstance(outcome[7], UnknownIdError)
        assert all(outcome[n] == 1 for n in (0, 1, 2, 3, 4, 5, 9, 10)) and outcome[8] == 2
        assert appends[0] == 1 and sum(appends) == 9 == s.stats["records_logged"]
        assert len(appends) == s.stats["log_appends"] == 2
        model.update({d["id"]: d["text"] for _, d in requests[:6]})
        del model["reef-2"], model["doc3"]
        model[str(len(ids))] = "The next automatic id, given."
        model[str(len(ids) + 1)] = "An automatic id."
    finally:
        s.close(checkpoint=False)
    r = ShardedRetriever.load(path, model=minilm_encoder, timeout=20)   # replays the log
    try:
        assert len(r) == len(model) and r.live(sorted(model)) == set(model)
        assert not r.live(["reef-2", "doc3", "no-such-id"])
        assert [d["text"] for d in r.get(sorted(model))] == [model[i] for i in sorted(model)]
        assert r.add(["next"]) == [str(len(ids) + 2)]
    finally:
        r.close()


def test_an_add_is_prepared_on_every_shard_then_swapped_in_on_all_at_once(plaid, minilm_encoder,
                                                                         tmp_path):
    """An add over several shards: when ``hold`` is entered every shard has prepared its part
    and none shows it (searches still answer, without the new documents); on leaving it
    every shard shows its part. A shard actor killed between the halves loses its prepared
    part: its new life is sent the whole add, once (no document twice, none lost)."""
    r = _copy(plaid, tmp_path / "idx", minilm_encoder)
    new = [f"kelp-{j}" for j in range(8)]
    owners = {shard_of(i, SHARDS) for i in new}
    assert len(owners) >= 2
    texts = [f"Kelp forest {j} turns sunlight into sugar under the sea." for j in range(8)]
    encoded = minilm_encoder.encode_documents(texts, show_progress=False)
    seen: dict[str, object] = {}
    killed = shard_of(new[0], SHARDS)

    @contextlib.contextmanager
    def hold():
        hits = r.search("kelp forest sunlight sugar sea", k=len(r) + len(new))
        seen["between"] = {h.doc_id for h in hits} & set(new)
        seen["live"] = r.live(new)
        ray.kill(r.actors[killed], no_restart=False)   # its prepared part dies with it
        yield

    try:
        r._add_checked(texts, new, None, encoded, hold=hold)
        assert seen == {"between": set(), "live": set()}
        assert _owned(r, new) == {i: shard_of(i, SHARDS) for i in new}
        assert r.restarts[killed] == 1
        hits = r.search("kelp forest sunlight sugar sea", k=len(new))
        assert sorted(h.doc_id for h in hits) == new
        assert len(r) == 32 + len(new)
        assert sum(r._docs) == len(r)
    finally:
        r.close()


def test_sharded_serve_searches_while_an_add_is_prepared(plaid, minilm_encoder, tmp_path):
    """The service holds searches off only while an add is swapped in: with the shards'
    preparation held (the test holds the driver's call to them), a search answers, without
    the document; once let go, the add is acknowledged and found."""
    from colengine.distributed.service import ShardedService

    path = tmp_path / "idx"
    shutil.copytree(plaid.path, path)
    s = ShardedService(path, model=minilm_encoder, device="cpu", checkpoint_docs=10**9,
                       checkpoint_seconds=10**9)
    s.open()
    assert s.ready, s.error
    preparing, go = threading.Event(), threading.Event()
    call = s.retriever._call

    def held(method, *a, **kw):
        if method == "prepare_add":
            preparing.set()
            assert go.wait(60)
        return call(method, *a, **kw)

    s.retriever._call = held
    q = ["kelp forest sunlight sugar"]
    try:
        adding = threading.Thread(target=s.add, args=(
            [{"id": "kelp", "text": "Kelp forests turn sunlight into sugar."}],))
        adding.start()
        assert preparing.wait(60)
        found: list = []
        search = threading.Thread(target=lambda: found.extend(s.search(q, k=3)))
        search.start()
        search.join(20)
        assert not search.is_alive(), "a search waited for an add's preparation"
        assert "kelp" not in {h.doc_id for h in found[0]}
        go.set()
        adding.join(60)
        assert not adding.is_alive()
        assert s.search(q, k=1)[0][0].doc_id == "kelp"
    finally:
        go.set()
        s.close(checkpoint=False)


def test_a_shard_actor_prepares_an_add_while_it_searches_and_commits_it_by_token(
        plaid, minilm_encoder, tmp_path):
    """The actor's two-phase add: a search answers while an add is being prepared (the test
    holds the preparation), the prepared add is invisible until its commit, a token commits
    once, and a change in between (a delete) makes the commit answer UNPREPARED with nothing
    applied."""
    from colengine.distributed.shard import UNPREPARED, ShardActor

    folder = tmp_path / plaid.names[0]
    shutil.copytree(plaid.path / plaid.names[0], folder)
    actor = ShardActor(plaid.names[0], str(folder), plaid.meta["model"])
    assert actor.error is None, actor.error
    n = len(actor.retriever)
    q = minilm_encoder.encode_queries(["kelp forest sunlight sugar"]).numpy()
    new = minilm_encoder.encode_documents(["Kelp forests turn sunlight into sugar."] * 2,
                                          show_progress=False)
    one = (new.tokens[:new.offsets[1]], new.offsets[:2])
    preparing, go = threading.Event(), threading.Event()
    prepare = actor.retriever.prepare_add

    def held(*a, **kw):
        preparing.set()
        assert go.wait(60)
        return prepare(*a, **kw)

    actor.retriever.prepare_add = held
    answer: list = []
    first = threading.Thread(target=lambda: answer.append(
        actor.prepare_add(None, ["kelp"], [{"text": "kelp"}], *one)))
    first.start()
    assert preparing.wait(30)
    found: list = []
    search = threading.Thread(target=lambda: found.append(
        actor.search(None, q, 3, None, False, False, {})))
    search.start()
    search.join(20)
    assert not search.is_alive(), "a search waited for an add's preparation"
    go.set()
    first.join(60)
    actor.retriever.prepare_add = prepare
    boot, token = answer[0]
    assert boot == actor.boot
    assert actor.known(None, ["kelp"])[1] == [] and len(actor.retriever) == n
    assert actor.commit_add(None, token) == (actor.boot, n + 1)
    assert actor.search(None, q, 1, None, False, False, {})[1][0][0].doc_id == "kelp"
    assert actor.commit_add(None, token) == (actor.boot, UNPREPARED)   # once only
    _, token = actor.prepare_add(None, ["kelp-2"], [{"text": "kelp"}], *one)
    actor.delete(None, ["kelp"])
    assert actor.commit_add(None, token) == (actor.boot, UNPREPARED)
    assert actor.known(None, ["kelp", "kelp-2"])[1] == [] and len(actor.retriever) == n
