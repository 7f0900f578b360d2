"""Where a served index encodes its writes (colengine.server.encoding): a child process
(``python -m colengine.server.encode_worker``) gives the vectors this process computes, for
documents and for passages; it is started again when killed, exits when its server is gone,
and a model it cannot load is reported (and, with ``write_encoder="auto"``, the service falls
back to a thread).

References: :func:`colengine.retriever.encode_for_index` in this process with the same model,
and a fresh ``Retriever.load`` of the served folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_hits_close

from colengine import Retriever
from colengine.longdocs import EncodedPassages
from colengine.retriever import encode_for_index
from colengine.server.encoding import (
    EncoderSpec,
    FallbackEncoder,
    ProcessEncoder,
    WorkerUnavailable,
    check_write_encoder,
)
from colengine.server.service import IndexService
from colengine.testing import sample_corpus

TEXTS = ["a short note about ice", "lava " * 300 + "and a long tail about volcanoes",
         "a third text, on rivers and their deltas"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_encoder) -> Path:
    corpus = sample_corpus()
    path = tmp_path_factory.mktemp("wenc") / "idx"
    Retriever.build(corpus, [d["_id"] for d in corpus], model=tiny_encoder, path=path,
                    index="plaid", show_progress=False)   # long_documents="chunk": passages
    return path


def _spec(encoder, policy=None, trust=True) -> EncoderSpec:
    return EncoderSpec(encoder.name, encoder.dim, trust, policy, encoder.batch_size)


def _same_vectors(got, want) -> None:
    assert type(got) is type(want)
    if isinstance(want, EncodedPassages):
        for name in ("doc", "window", "start", "end"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
        assert got.n_texts == want.n_texts
        got, want = got.docs, want.docs
    np.testing.assert_array_equal(got.offsets, want.offsets)
    np.testing.assert_allclose(np.asarray(got.tokens, np.float32),
                               np.asarray(want.tokens, np.float32), atol=2e-3)


def test_the_child_encodes_documents_and_passages_as_this_process_does(built, tiny_encoder):
    policy = Retriever.load(built, model=tiny_encoder).passage_policy
    assert policy is not None and policy["mode"] == "chunk"
    for pol in (None, policy):
        enc = ProcessEncoder(_spec(tiny_encoder, pol))
        try:
            got = enc.encode(TEXTS)
            want = encode_for_index(tiny_encoder, TEXTS, pol)
            _same_vectors(got, want)
            if pol is not None:   # the long text really was cut into several passages
                assert int((got.doc == 1).sum()) > 1
        finally:
            enc.close()


def test_a_killed_child_is_started_again(tiny_encoder):
    enc = ProcessEncoder(_spec(tiny_encoder))
    try:
        first = enc.encode(TEXTS[:1])
        pid = enc.pid
        os.kill(pid, signal.SIGKILL)
        again = enc.encode(TEXTS[:1])
        assert enc.starts == 2 and enc.pid != pid
        _same_vectors(again, first)
    finally:
        enc.close()
    assert enc.pid is None
    with pytest.raises(WorkerUnavailable, match="closed"):
        enc.encode(TEXTS[:1])


def test_the_child_exits_when_its_server_is_killed(tiny_encoder, tmp_path):
    """kill -9 of the process that started the child: the child's input closes and it
    exits, instead of living on with a copy of the model."""
    script = textwrap.dedent(f"""
        import sys
        from colengine.server.encoding import EncoderSpec, ProcessEncoder
        enc = ProcessEncoder(EncoderSpec({tiny_encoder.name!r}, {tiny_encoder.dim}, True, None))
        enc.ready()
        print(enc.pid, flush=True)
        sys.stdin.read()
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"   # a zombie has exited
    except FileNotFoundError:
        return False


def test_a_model_the_child_cannot_load_is_reported(tiny_encoder):
    enc = ProcessEncoder(_spec(tiny_encoder, trust=False))   # ships code: not trusted here
    try:
        with pytest.raises(WorkerUnavailable, match="UntrustedModelError"):
            enc.encode(TEXTS[:1])
    finally:
        enc.close()
    enc = ProcessEncoder(EncoderSpec(tiny_encoder.name, tiny_encoder.dim + 1, True, None))
    try:
        with pytest.raises(WorkerUnavailable, match="dim"):
            enc.ready()
    finally:
        enc.close()


def test_write_encoder_values_are_checked():
    for ok in ("auto", "process", "thread"):
        assert check_write_encoder(ok) == ok
    for bad in ("processes", None, 1):
        with pytest.raises(ValueError, match="write_encoder"):
            check_write_encoder(bad)
    with pytest.raises(ValueError, match="write_encoder"):
        IndexService("unused", write_encoder="fork")
    from colengine.distributed.service import ShardedService

    with pytest.raises(ValueError, match="write_encoder"):
        ShardedService("unused", write_encoder="fork")


def _service(path, model, **kw) -> IndexService:
    s = IndexService(path, model=model, device="cpu", checkpoint_docs=10**9,
                     checkpoint_seconds=10**9, trust_remote_code=True, **kw)
    s.open()
    return s


def test_a_service_encodes_its_adds_in_the_child(built, tmp_path, tiny_encoder):
    path = Path(shutil.copytree(built, tmp_path / "idx"))
    s = _service(path, str(tiny_encoder.name))          # by name: "auto" picks the process
    try:
        assert s.ready, s.error
        assert s.info()["write_encoder"] == "process"
        s.add([{"id": f"n{i}", "text": t} for i, t in enumerate(TEXTS)])
        served = s.search(["volcanoes and lava"], k=5)[0]
    finally:
        s.close(checkpoint=False)
    ref = Retriever.load(shutil.copytree(built, tmp_path / "ref"), model=tiny_encoder)
    ref.add(TEXTS, [f"n{i}" for i in range(len(TEXTS))])
    assert_hits_close(served, ref.search("volcanoes and lava", k=5))
    # the log replayed from disk (the vectors the child computed) answers the same
    again = Retriever.load(path, model=tiny_encoder)
    assert_hits_close(again.search("volcanoes and lava", k=5),
                      ref.search("volcanoes and lava", k=5))


def test_auto_falls_back_to_a_thread_and_process_does_not(built, tmp_path, tiny_encoder):
    path = Path(shutil.copytree(built, tmp_path / "idx"))
    s = _service(path, str(tiny_encoder.name))
    try:
        assert s._writes.kind == "process" and isinstance(s._writes, FallbackEncoder)
        s._writes.current.close()
        s._writes.current = ProcessEncoder(_spec(tiny_encoder, trust=False))   # cannot load
        s.add([{"id": "x1", "text": "a note about glaciers"}])
        assert s._writes.kind == "thread"
        assert [d["id"] for d in s.get(["x1"])] == ["x1"]
    finally:
        s.close(checkpoint=False)
    path2 = Path(shutil.copytree(built, tmp_path / "idx2"))
    s = _service(path2, str(tiny_encoder.name), write_encoder="process")
    try:
        assert isinstance(s._writes, ProcessEncoder)   # asked for: no fallback
        s._writes.close()
        s._writes = ProcessEncoder(_spec(tiny_encoder, trust=False))
        with pytest.raises(WorkerUnavailable):
            s.add([{"id": "x1", "text": "a note about glaciers"}])
        assert s._writes.kind == "process" and len(s.retriever) == len(sample_corpus())
    finally:
        s.close(checkpoint=False)
    # a model passed as an object cannot be loaded again in a child
    s = _service(Path(shutil.copytree(built, tmp_path / "idx3")), tiny_encoder,
                 write_encoder="process")
    assert not s.ready and "by name" in s.error
    s = _service(Path(shutil.copytree(built, tmp_path / "idx4")), tiny_encoder)
    try:
        assert s._writes.kind == "thread"
    finally:
        s.close(checkpoint=False)
