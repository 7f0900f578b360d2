"""Shared fixtures: offline models and real data, built once per test session."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

# Triton kernels run under its interpreter on the CPU (COLENGINE_TEST_DEVICE=cuda compiles
# them on a GPU). Set here, before anything can import triton: a kernel decorated before
# the variable is set is a compiled one, and every interpreter test after it fails, whatever
# test file happened to import it first.
if os.environ.get("COLENGINE_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not DATA.is_dir():  # CI clones the repo with shared/ beside it
    DATA = Path(os.environ.get("COLENGINE_DATA", "/work/shared/data"))


def einsum_maxsim(q: np.ndarray, docs: list[np.ndarray]) -> np.ndarray:
    """Independent reference: float64 einsum MaxSim of one query [Lq, d] against each doc."""
    q = np.asarray(q, dtype=np.float64)
    lmax = max(1, max(d.shape[0] for d in docs))
    pad = np.zeros((len(docs), lmax, q.shape[1]))
    mask = np.zeros((len(docs), lmax), dtype=bool)
    for i, d in enumerate(docs):
        pad[i, : d.shape[0]] = d
        mask[i, : d.shape[0]] = True
    sim = np.einsum("qd,nld->nql", q, pad)
    sim = np.where(mask[:, None, :], sim, -np.inf)
    return sim.max(axis=2).sum(axis=1)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    from colengine.testing import build_tiny_pplx_model

    return build_tiny_pplx_model(tmp_path_factory.mktemp("models") / "tiny-pplx")


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model_path):
    from colengine import Encoder

    return Encoder(tiny_model_path, device="cpu", trust_remote_code=True)  # a folder: opt in


@pytest.fixture(scope="session")
def minilm_encoder(tmp_path_factory):
    from colengine import Encoder
    from colengine.testing import build_minilm_colbert

    path = build_minilm_colbert(tmp_path_factory.mktemp("models") / "minilm")
    return Encoder(path, device="cpu", batch_size=64)


def load_beir(name: str, n_docs: int | None = None):
    """(ids, texts) of a BEIR corpus under shared/data, title + ' ' + text."""
    ids, texts = [], []
    with open(DATA / name / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            ids.append(row["_id"])
            texts.append(f"{row.get('title', '')} {row['text']}".strip())
            if n_docs is not None and len(ids) >= n_docs:
                break
    return ids, texts


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def assert_hits_close(got, want, atol: float = 1e-4, rtol: float = 1e-5) -> None:
    """Two rankings agree: same length, scores equal within a tolerance, and the same id at
    each rank unless the two ids tie within that tolerance (then either order is right).
    For results of two computations that may round differently (another build path, another
    torch): never compare their float scores with ``==``."""
    assert len(got) == len(want), (got, want)
    want_score = {h.doc_id: h.score for h in want}
    for g, w in zip(got, want):
        assert abs(g.score - w.score) <= atol + rtol * abs(w.score), (g, w)
        if g.doc_id != w.doc_id:
            assert g.doc_id in want_score, (g, want)
            assert abs(want_score[g.doc_id] - w.score) <= atol + rtol * abs(w.score), (g, w)


def einsum_topk(q: torch.Tensor, packed, k: int) -> tuple[list[list[int]], torch.Tensor]:
    """Independent float32 MaxSim of queries ``[B, Lq, d]`` over packed token matrices, one
    einsum per document: (top-``k`` document positions per query, their scores ``[B, k]``)."""
    toks = torch.from_numpy(np.asarray(packed.tokens, dtype=np.float32))
    off = packed.offsets
    scores = torch.full((q.shape[0], len(packed)), float("-inf"))
    for j in range(len(packed)):
        t = toks[off[j]:off[j + 1]]
        if t.shape[0]:
            scores[:, j] = torch.einsum("bqd,td->bqt", q, t).amax(2).sum(1)
    top = scores.topk(min(k, len(packed)), dim=1)
    return top.indices.tolist(), top.values


def clustered_docs(n_docs: int, dim: int, n_clusters: int, seed: int, lo: int, hi: int) -> list[np.ndarray]:
    """Unit-norm float32 token matrices drawn around ``n_clusters`` shared centres."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(lo, hi))
        x = centers[rng.integers(0, n_clusters, n)] + 0.35 * rng.standard_normal((n, dim))
        docs.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    return docs


def clustered_queries(docs: list[np.ndarray], n: int, lq: int, seed: int) -> torch.Tensor:
    """``[n, lq, d]`` float32 queries, each a noisy sample of one document's tokens."""
    rng = np.random.default_rng(seed)
    qs = []
    for i in rng.choice(len(docs), n, replace=False):
        d = docs[i]
        x = d[rng.integers(0, d.shape[0], lq)] + 0.2 * rng.standard_normal((lq, d.shape[1]))
        qs.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return torch.from_numpy(np.stack(qs).astype(np.float32))


def hold_first_append(service, n_requests: int, appends: list[int]) -> None:
    """Count the records of every log append of a served index (``IndexService`` or
    ``ShardedService``); hold the first one until the other ``n_requests - 1`` requests are
    queued behind it (so they must share later appends)."""
    first = threading.Event()

    def hook(lines: list[bytes]) -> None:
        appends.append(len(lines))
        if not first.is_set():
            first.set()
            pause = threading.Event()
            for _ in range(600):   # up to 60 s: the others are encoding, then queue
                with service._commit.cond:
                    if len(service._commit.queue) >= n_requests - appends[0]:
                        return
                pause.wait(0.1)

    service.on_log_append = hook
