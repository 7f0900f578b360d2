"""PLAID with few probed candidates (issue 11 item 9, issue 12 item 3), with the narrowest knobs:
one probe per token, one token for a query whose only probed list is wholly deleted. A short row
must be filled from the rest of the live documents, and k >= the live count returns them all."""

from __future__ import annotations

import numpy as np
import torch

from colengine.index.plaid import PlaidIndex

DIM = 16


def _docs(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((int(rng.integers(2, 7)), DIM)).astype(np.float32)
        out.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return out


def _queries(b: int, seed: int = 1) -> torch.Tensor:
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((b, 4, DIM)).astype(np.float32))
    return x / x.norm(dim=2, keepdim=True)


def test_plaid_k_at_least_live_count_returns_every_live_document():
    n = 40
    docs = _docs(n, seed=3)
    ids = [f"d{i}" for i in range(n)]
    idx = PlaidIndex.build(docs, ids, nbits=4, n_centroids=16, seed=0)
    idx.delete(ids[:3])
    live = set(ids[3:])
    for k in (len(live), len(live) + 1, 1000):
        res = idx.search(_queries(3), k=k, n_probe=1)
        for hits in res:
            assert {h.doc_id for h in hits} == live


def test_plaid_query_whose_probed_lists_are_all_deleted_gets_the_rest_and_others_unaffected():
    n = 30
    docs = _docs(n, seed=4)
    ids = [f"d{i}" for i in range(n)]
    idx = PlaidIndex.build(docs, ids, nbits=4, n_centroids=8, seed=0)
    q = _queries(4, seed=7)
    ql = torch.tensor([1, 4, 4, 4])   # query 0: one token, so it probes one list
    before = idx.search(q, k=3, n_probe=1, query_lengths=ql)
    # tombstone every document in the lists that query 0 probes (without auto compaction)
    idx.auto_compact_share = 1.0
    cells = (q[0, :1] @ torch.as_tensor(np.asarray(idx.centroids, dtype=np.float32)).T).topk(1, dim=1).indices.view(-1)
    lists_ = idx._get_lists()
    off, lists = lists_.ivf_csr()
    rows = {int(r) for c in cells.tolist() for r in lists[off[c]:off[c + 1]]}
    gone = sorted({idx.ids[r] for r in rows})
    assert 0 < len(gone) < n
    idx.delete(gone)
    after = idx.search(q, k=3, n_probe=1, query_lengths=ql)
    live = set(ids) - set(gone)
    assert len(after) == 4
    for hits in after:
        assert len(hits) == min(3, len(live)) and {h.doc_id for h in hits} <= live
    assert all(len(h) == 3 for h in before)
