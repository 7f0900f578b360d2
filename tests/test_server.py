"""The HTTP server: a real ``colengine serve`` process on a free loopback port, a real client.

References: ``Retriever.search`` / ``get`` on the same index in this process, and a plain
dict of the documents each test added or deleted.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import assert_hits_close

from colengine import Client, Retriever
from colengine.errors import DuplicateIdError, FilterError, UnknownIdError
from colengine.testing import sample_corpus

KEY = "test-key-123"
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``colengine serve`` in a subprocess; ``stop()`` is a graceful SIGTERM, ``kill()`` -9."""

    def __init__(self, index: Path, *args: str, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        self.log = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "colengine.cli", "serve", str(index), "--port", str(self.port),
             "--device", "cpu", "--log-level", "warning", "--trust-remote-code", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            start_new_session=True)

    def wait_listening(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                httpx.get(self.url + "/health", timeout=2)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise TimeoutError(self.log.read_text())

    def client(self, key: str | None = KEY) -> Client:
        c = Client(self.url, api_key=key, timeout=60)
        try:
            c.wait_ready(timeout=90)
        except TimeoutError:
            raise TimeoutError(self.log.read_text()) from None
        return c

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and any workers it started
            self.proc.wait(timeout=30)
        self._log.close()


def _metadata(i: int) -> dict:
    return {"lang": "en" if i % 2 == 0 else "fr", "year": 2000 + i}


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_encoder) -> Path:
    corpus = sample_corpus()
    path = tmp_path_factory.mktemp("srv") / "idx"
    Retriever.build(corpus, [d["_id"] for d in corpus], model=tiny_encoder, path=path,
                    metadata=[_metadata(i) for i in range(len(corpus))], show_progress=False)
    return path


@pytest.fixture()
def fresh_index(index_dir, tmp_path) -> Path:
    """A private copy of the index, for tests that change it."""
    return Path(shutil.copytree(index_dir, tmp_path / "idx"))


@pytest.fixture(scope="module")
def server(index_dir, tmp_path_factory):
    s = Server(index_dir, "--api-key", KEY, "--max-queries", "8", "--max-k", "50",
               "--max-text-chars", "2000", "--max-documents", "5", "--max-body-bytes", "20000",
               log=tmp_path_factory.mktemp("logs") / "server.log")
    try:
        s.client().close()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def local(index_dir, tiny_encoder) -> Retriever:
    return Retriever.load(index_dir, model=tiny_encoder)


QUERIES = ["how do plants turn sunlight into energy", "what powers the cell",
           "memory safety without garbage collection", "ranking documents for keywords"]


def _same_hits(got, want) -> None:
    assert [h.doc_id for h in got] == [h.doc_id for h in want]
    assert [h.score for h in got] == pytest.approx([h.score for h in want], rel=1e-5, abs=1e-5)


# -- reads ---------------------------------------------------------------------------------
def test_search_equals_retriever(server, local):
    with server.client() as c:
        for q in QUERIES:
            _same_hits(c.search(q, k=5), local.search(q, k=5))
        batch = c.search_batch(QUERIES, k=3, return_metadata=True, return_text=True)
        want = local.search_batch(QUERIES, k=3, return_metadata=True, return_text=True)
        for got, ref in zip(batch, want):
            _same_hits(got, ref)
            assert [h.metadata for h in got] == [h.metadata for h in ref]
            assert [h.text for h in got] == [h.text for h in ref]
            # the index holds passages (long_documents="chunk", the default): each hit says
            # which window matched, over HTTP as in process
            assert [h.passage for h in got] == [h.passage for h in ref]
            assert all(h.passage is not None for h in got)
        flt = {"$and": [{"lang": "en"}, {"year": {"$gte": 2010}}]}
        _same_hits(c.search(QUERIES[0], k=4, filter=flt), local.search(QUERIES[0], k=4, filter=flt))
        info = c.info()
        assert info["documents"] == len(local) and info["index"] == "plaid"
        assert info["model"]["dim"] == local.encoder.dim


def test_filter_keeps_only_matching_documents(server):
    with server.client() as c:
        hits = c.search(QUERIES[1], k=50, filter={"lang": "fr", "year": {"$lt": 2010}},
                        return_metadata=True)
        corpus_ids = {d["_id"]: i for i, d in enumerate(sample_corpus())}
        want = {d for d, i in corpus_ids.items() if i % 2 == 1 and 2000 + i < 2010}
        assert {h.doc_id for h in hits} == want
        assert all(h.metadata["lang"] == "fr" for h in hits)


def test_get_and_rerank(server, local):
    with server.client() as c:
        assert c.get(["doc3", "doc0"]) == local.get(["doc3", "doc0"])
        one = httpx.get(f"{server.url}/documents/doc1", headers={"X-API-Key": KEY}).json()
        assert one == local.get(["doc1"])[0] and one["metadata"] == _metadata(1)
        _same_hits(c.rerank(QUERIES[0], ["doc5", "doc0", "doc9"], k=2),
                   local.rerank(QUERIES[0], ["doc5", "doc0", "doc9"], k=2))
        texts = ["plants make sugar from light", "a database index", "mitochondria"]
        _same_hits(c.rerank_texts(QUERIES[1], texts), local.rerank_texts(QUERIES[1], texts))


# -- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path,body,status,kind", [
    ("/search", {"queries": ["q"], "k": 0}, 400, "ValidationError"),
    ("/search", {"queries": "not a list"}, 400, "ValidationError"),
    ("/search", {"queries": [""]}, 400, "ValueError"),
    ("/search", {"queries": ["q"], "k": 51}, 400, "ValueError"),
    ("/search", {"queries": ["q"], "unknown": 1}, 400, "ValidationError"),
    ("/search", {"queries": ["q"], "filter": {"lang": {"$regex": "x"}}}, 400, "FilterError"),
    ("/search", {"queries": ["q"], "filter": {"a; DROP TABLE documents": 1}}, 400, "FilterError"),
    ("/search", {"queries": ["q"], "pipeline": "bm25"}, 400, "ValueError"),
    ("/search", {"queries": ["q"], "knobs": {"no_such_knob": 1}}, 400, "TypeError"),
    ("/search", {"queries": ["q"] * 9}, 413, "RequestTooLarge"),
    ("/search", {"queries": ["x" * 2001]}, 413, "RequestTooLarge"),
    ("/documents", {"documents": [{"id": "n1", "text": ""}]}, 400, "ValueError"),
    ("/documents", {"documents": [{"id": "n1", "text": "t", "metadata": {"a": [1]}}]}, 400,
     "TypeError"),
    ("/documents", {"documents": [{"id": "n1", "text": "t", "metadata": {"bad key": 1}}]}, 400,
     "ValueError"),
    ("/documents", {"documents": [{"id": "doc0", "text": "t"}]}, 409, "DuplicateIdError"),
    ("/documents", {"documents": [{"id": "a", "text": "t"}, {"id": "a", "text": "u"}]}, 409,
     "DuplicateIdError"),
    ("/documents", {"documents": [{"id": str(i), "text": "t"} for i in range(6)]}, 413,
     "RequestTooLarge"),
    ("/documents/delete", {"ids": ["nope"]}, 404, "UnknownIdError"),
    ("/documents/delete", {"ids": ["doc0", "doc0"]}, 409, "DuplicateIdError"),
    ("/documents/get", {"ids": ["nope"]}, 404, "UnknownIdError"),
    ("/rerank", {"query": "q", "ids": ["doc0", "nope"]}, 404, "UnknownIdError"),
    ("/rerank", {"query": "q"}, 400, "ValueError"),
])
def test_error_statuses(server, path, body, status, kind):
    r = httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["error"] == kind and err["message"] and "Traceback" not in r.text


def test_malformed_bodies_and_unknown_routes(server):
    h = {"X-API-Key": KEY, "Content-Type": "application/json"}
    r = httpx.post(server.url + "/search", content=b"{not json", headers=h)
    assert r.status_code == 400 and r.json()["error"] == "ValidationError"
    r = httpx.post(server.url + "/search", content=b"x" * 20001, headers=h)
    assert r.status_code == 413 and r.json()["error"] == "RequestTooLarge"

    def chunks():  # no Content-Length: counted while read
        for _ in range(30):
            yield b"x" * 1000

    r = httpx.post(server.url + "/search", content=chunks(), headers=h)
    assert r.status_code == 413
    r = httpx.get(server.url + "/documents/nope", headers=h)
    assert r.status_code == 404 and r.json()["error"] == "UnknownIdError"
    assert httpx.get(server.url + "/nowhere", headers=h).status_code == 404


def test_client_raises_the_retriever_exceptions(server):
    with server.client() as c:
        with pytest.raises(UnknownIdError, match="nope"):
            c.get(["nope"])
        with pytest.raises(DuplicateIdError):
            c.add(["text"], ids=["doc0"])
        with pytest.raises(FilterError, match=r"\$where"):
            c.search("q", filter={"$where": "1=1"})
        with pytest.raises(ValueError, match="limit"):
            c.search_batch(["q"] * 9)


def test_api_key(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # open, for probes
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):
        r = httpx.post(server.url + "/search", json={"queries": ["q"]}, headers=headers)
        assert r.status_code == 401 and r.json()["error"] == "Unauthorized"
        assert httpx.get(server.url + "/info", headers=headers).status_code == 401
    with pytest.raises(PermissionError):
        Client(server.url).info()
    assert httpx.get(server.url + "/info", headers={"X-API-Key": KEY}).status_code == 200
    assert httpx.get(server.url + "/openapi.json").json()["info"]["title"] == "colengine"


# -- writes, durability, concurrency ---------------------------------------------------------
def test_add_filter_delete_then_kill9_and_restart(fresh_index, index_dir, tmp_path, tiny_encoder):
    from colengine.storage import writer_lock

    # while another writer holds the index's lock the server cannot load: 503, not an error
    with writer_lock(fresh_index):
        s = Server(fresh_index, log=tmp_path / "a.log")
        s.wait_listening()
        r = httpx.post(s.url + "/search", json={"queries": ["q"]})
        assert r.status_code == 503 and r.json()["error"] == "NotReady"
        assert httpx.get(s.url + "/health").json()["status"] == "loading"
    try:
        c = s.client(key=None)
        model = {d["_id"]: _metadata(i) for i, d in enumerate(sample_corpus())}
        for i in range(6):
            ids = [f"new{i}a", f"new{i}b"]
            c.add([f"volcano number {i} erupts lava", f"a poem about the sea, part {i}"], ids,
                  metadata=[{"lang": "is", "n": i}, {"lang": "en", "n": i}])
            model.update({ids[0]: {"lang": "is", "n": i}, ids[1]: {"lang": "en", "n": i}})
        c.delete(["doc0", "new0b"])
        del model["doc0"], model["new0b"]
        hits = c.search("volcano erupts lava", k=10, filter={"lang": "is"}, return_metadata=True)
        assert {h.doc_id for h in hits} == {f"new{i}a" for i in range(6)}
        assert c.get(["new3a"])[0]["text"] == "volcano number 3 erupts lava"
        info = c.info()
        assert info["documents"] == len(model)
        # the model is loaded by name on the CPU: the adds were encoded in a child process
        assert info["write_encoder"] == "process"
    finally:
        s.kill()  # kill -9 right after the acknowledged writes: no checkpoint ran

    s = Server(fresh_index, log=tmp_path / "b.log")
    try:
        c = s.client(key=None)
        assert c.info()["documents"] == len(model)
        got = c.get(sorted(model))
        assert {d["id"]: d["metadata"] for d in got} == model
        hits = c.search("volcano erupts lava", k=50)
        assert {f"new{i}a" for i in range(6)} <= {h.doc_id for h in hits}
        for gone in ("doc0", "new0b"):
            with pytest.raises(UnknownIdError):
                c.get([gone])
    finally:
        s.stop()  # graceful: folds the log into a saved generation
    r = Retriever.load(fresh_index, model=tiny_encoder, replay_log=False)
    assert sorted(r.index.ids) == sorted(model) == sorted(r.metadata.ids())
    assert not list(fresh_index.glob("wal-*.jsonl"))
    # what the child process encoded is what this process encodes: the same writes made in
    # process on a copy of the original index give the same rankings and scores
    ref = Retriever.load(shutil.copytree(index_dir, tmp_path / "ref"), model=tiny_encoder)
    for i in range(6):
        ref.add([f"volcano number {i} erupts lava", f"a poem about the sea, part {i}"],
                [f"new{i}a", f"new{i}b"], metadata=[{"lang": "is", "n": i}, {"lang": "en", "n": i}])
    ref.delete(["doc0", "new0b"])
    for q in ("volcano erupts lava", "a poem about the sea"):
        assert_hits_close(r.search(q, k=10), ref.search(q, k=10))


def test_two_servers_add_to_one_index_concurrently(fresh_index, tmp_path, tiny_encoder):
    servers = [Server(fresh_index, log=tmp_path / f"s{i}.log") for i in range(2)]
    try:
        clients = [s.client(key=None) for s in servers]
        added: list[list[str]] = [[], []]
        errors: list[BaseException] = []

        def writer(j: int) -> None:
            try:
                for i in range(8):
                    doc_id = f"p{j}-{i}"
                    clients[j].add([f"writer {j} document {i} about rivers"], [doc_id])
                    added[j].append(doc_id)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(j,)) for j in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors and all(len(a) == 8 for a in added)
        want = sorted(added[0] + added[1])
        for c in clients:   # each server sees the other's documents too (it catches up
            deadline = time.monotonic() + 5   # with the log on a request or in the background)
            while True:
                try:
                    assert [d["id"] for d in c.get(want)] == want
                    break
                except UnknownIdError:
                    assert time.monotonic() < deadline, "a server never saw the other's adds"
                    time.sleep(0.05)
    finally:
        for s in servers:
            s.stop()
    r = Retriever.load(fresh_index, model=tiny_encoder)
    assert set(want) <= set(r.index.ids) and len(r) == 32 + 16
    assert sorted(r.index.ids) == sorted(r.metadata.ids())


def test_workers_see_each_others_writes_and_searches_never_fail(fresh_index, tmp_path):
    # checkpoints every half second: generations are swapped under the searches too
    s = Server(fresh_index, "--workers", "2", "--checkpoint-seconds", "0.5",
               log=tmp_path / "w.log")
    try:
        s.client(key=None).close()
        ready: set[int] = set()   # both workers loaded (each answers 503 until it is)
        t0 = time.monotonic()
        while len(ready) < 2:
            assert time.monotonic() - t0 < 60, "the second worker never became ready"
            with httpx.Client(base_url=s.url, timeout=60) as h:  # new connection
                r = h.get("/info")
            if r.status_code == 200:
                ready.add(r.json()["pid"])
        stop = threading.Event()
        failures: list[str] = []
        searches = [0]

        def searcher() -> None:
            with httpx.Client(base_url=s.url, timeout=60) as h:
                while not stop.is_set():
                    r = h.post("/search", json={"queries": [QUERIES[0]], "k": 5})
                    if r.status_code != 200 or len(r.json()["results"][0]) != 5:
                        failures.append(r.text)
                    searches[0] += 1

        t = threading.Thread(target=searcher)
        t.start()
        pids: set[int] = set()
        try:
            for i in range(4):
                doc_id = f"w{i}"
                with httpx.Client(base_url=s.url, timeout=60) as h:
                    r = h.post("/documents", json={"documents": [
                        {"id": doc_id, "text": f"glaciers of iceland, note {i}"}]})
                    assert r.status_code == 200, r.text
                # every worker answers with the new document (each checks the log before it
                # serves; the bound is generous: no timing asserts on a shared CI machine)
                t0 = time.monotonic()
                seen: dict[int, bool] = {}
                while time.monotonic() - t0 < 0.5 or not all(seen.values()):
                    assert time.monotonic() - t0 < 10, seen
                    with httpx.Client(base_url=s.url, timeout=60) as h:  # new connection
                        pid = h.get("/info").json()["pid"]
                        found = h.post("/documents/get", json={"ids": [doc_id]}).status_code
                    seen[pid] = found == 200
                    pids.add(pid)
        finally:
            stop.set()
            t.join(timeout=60)
        assert len(pids) == 2, "requests never reached the second worker"
        assert not failures and searches[0] > 0
        gens = {h["pid"]: h["generation"] for h in
                (httpx.get(s.url + "/info").json() for _ in range(20))}
        assert max(gens.values()) > 1, gens  # the log was folded into new generations
        r = httpx.post(s.url + "/documents/get", json={"ids": [f"w{i}" for i in range(4)]})
        assert r.status_code == 200
    finally:
        s.stop()
