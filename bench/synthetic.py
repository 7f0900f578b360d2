"""Synthetic clustered token embeddings that behave like a ColBERT corpus, at any size.

Real token vectors are clustered twice over: by topic (documents about one subject share
vocabulary) and by token (the same word gives similar vectors wherever it occurs). The
generator mimics both:

* ``n_topics`` topic directions on the unit sphere;
* a vocabulary of ``n_prototypes`` token prototypes, each a noisy copy of one topic direction;
* a document picks 1-3 topics, draws its tokens' prototypes from them, and adds per-token noise;
* a query is drawn from one document's prototypes with fresh noise: that document is its
  known relevant answer.

Everything is derived from ``seed`` and the chunk number, so a corpus of a million documents is
produced chunk by chunk in bounded memory, identically on every run, in any chunk order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from colengine.embeddings import PackedEmbeddings

__all__ = ["SyntheticCorpus"]


#: tokens generated at a time within a chunk
_BLOCK = 1 << 14


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@dataclass
class SyntheticCorpus:
    n_docs: int
    dim: int = 128
    mean_len: int = 100
    n_topics: int = 1024
    n_prototypes: int = 65536
    topic_noise: float = 0.6
    token_noise: float = 0.25
    seed: int = 0
    chunk_docs: int = 10_000

    def __post_init__(self) -> None:
        rng = np.random.default_rng([self.seed, 0])
        topics = _normalize(rng.standard_normal((self.n_topics, self.dim)))
        self.proto_topic = rng.integers(0, self.n_topics, self.n_prototypes)
        protos = topics[self.proto_topic] + self.topic_noise * rng.standard_normal(
            (self.n_prototypes, self.dim)) / np.sqrt(self.dim) * 4
        self.prototypes = _normalize(protos).astype(np.float32)
        # Token noise is drawn from a fixed bank of Gaussian vectors: a gather per token instead
        # of 128 fresh normals, which makes a 100M-token corpus cheap to regenerate.
        self._noise = (rng.standard_normal((1 << 18, self.dim), dtype=np.float32)
                       * np.float32(4 * self.token_noise / np.sqrt(self.dim)))
        order = np.argsort(self.proto_topic, kind="stable")
        self._by_topic = order
        self._topic_start = np.searchsorted(self.proto_topic[order], np.arange(self.n_topics + 1))

    @property
    def n_chunks(self) -> int:
        return -(-self.n_docs // self.chunk_docs)

    def ids(self, chunk: int) -> list[str]:
        start = chunk * self.chunk_docs
        return [f"d{i}" for i in range(start, min(self.n_docs, start + self.chunk_docs))]

    def _doc_prototypes(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Prototype ids of ``n`` documents' tokens, packed, and their lengths."""
        lens = np.clip(rng.poisson(self.mean_len, n), 8, 4 * self.mean_len)
        n_top = rng.integers(1, 4, n)
        doc_topics = rng.integers(0, self.n_topics, (n, 3))
        tok_doc = np.repeat(np.arange(n), lens)
        which = rng.integers(0, n_top[tok_doc])
        topic = doc_topics[tok_doc, which]
        lo, hi = self._topic_start[topic], self._topic_start[topic + 1]
        # each document prefers a small sub-vocabulary of its topics: repeated words
        pick = lo + (rng.integers(0, 1 << 30, tok_doc.size) % np.maximum(hi - lo, 1))
        return self._by_topic[np.minimum(pick, self.n_prototypes - 1)], lens

    def chunk(self, i: int) -> PackedEmbeddings:
        """Documents ``[i * chunk_docs, ...)`` as float16 packed embeddings."""
        rng = np.random.default_rng([self.seed, 1, i])
        n = len(self.ids(i))
        proto, lens = self._doc_prototypes(rng, n)
        noise = rng.integers(0, self._noise.shape[0], proto.size)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        # Block by block through two small float32 buffers: the same values, bit for bit, as
        # normalising the whole chunk at once (every step is row-wise), without two fresh
        # float32 copies of the chunk (2 x 512 MB at 10k documents, mostly page faults).
        out = np.empty((proto.size, self.dim), dtype=np.float16)
        m = min(_BLOCK, proto.size)
        x, e = (np.empty((m, self.dim), dtype=np.float32) for _ in range(2))
        for a in range(0, proto.size, _BLOCK):
            b = min(proto.size, a + _BLOCK)
            xa, ea = x[:b - a], e[:b - a]
            np.take(self.prototypes, proto[a:b], axis=0, out=xa)
            np.take(self._noise, noise[a:b], axis=0, out=ea)
            xa += ea
            np.divide(xa, np.linalg.norm(xa, axis=-1, keepdims=True), out=out[a:b],
                      casting="same_kind")
        return PackedEmbeddings(out, offsets)

    def __iter__(self) -> Iterator[tuple[list[str], PackedEmbeddings]]:
        for i in range(self.n_chunks):
            yield self.ids(i), self.chunk(i)

    def exact_top(self, q, k: int = 10):
        """Exact MaxSim top-``k`` (scores float32 ``[B, k]``, document numbers int64
        ``[B, k]``) of queries ``q`` (float32 tensor ``[B, Lq, dim]``), streamed: one chunk of
        the corpus at a time, so the float vectors are never all in memory."""
        import torch

        from colengine.embeddings import readonly_tensor
        from colengine.kernels import score_candidates_packed

        ql = torch.full((q.shape[0],), q.shape[1], dtype=torch.int64)
        best_s = torch.full((q.shape[0], 0), float("-inf"))
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.int64)
        for c in range(self.n_chunks):
            ch = self.chunk(c)
            cand = torch.arange(len(ch)).unsqueeze(0).expand(q.shape[0], -1).contiguous()
            s = score_candidates_packed(q, ql, readonly_tensor(np.asarray(ch.tokens)),
                                        readonly_tensor(np.asarray(ch.offsets)), cand)
            s_all = torch.cat([best_s, s], 1)
            i_all = torch.cat([best_i, cand + c * self.chunk_docs], 1)
            top = s_all.topk(k, dim=1)
            best_s, best_i = top.values, torch.gather(i_all, 1, top.indices)
        return best_s, best_i

    def queries(self, n: int, length: int = 32, seed: int = 1) -> tuple[np.ndarray, list[str]]:
        """``n`` queries ``[n, length, dim]`` float32, each drawn from one document's tokens,
        and that document's id (its known relevant answer)."""
        rng = np.random.default_rng([self.seed, 2, seed])
        targets = rng.choice(self.n_docs, n, replace=False)
        docs: dict[int, np.ndarray] = {}      # each needed chunk is generated once
        for c in sorted({int(t) // self.chunk_docs for t in targets}):
            chunk = self.chunk(c)
            for t in targets:
                if int(t) // self.chunk_docs == c:
                    docs[int(t)] = chunk[int(t) % self.chunk_docs].astype(np.float32)
        out = np.empty((n, length, self.dim), dtype=np.float32)
        for j, t in enumerate(targets):
            doc = docs[int(t)]
            rows = rng.integers(0, doc.shape[0], length)
            out[j] = _normalize(doc[rows] + self.token_noise * rng.standard_normal(
                (length, self.dim)).astype(np.float32) / np.sqrt(self.dim) * 4)
        return out, [f"d{t}" for t in targets]
