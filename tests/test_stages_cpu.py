"""PLAID's CPU stages as compiled loops (``colengine.index.plaid.stages_cpu``) against the torch
stages of ``colengine.index.plaid.search`` (the GPU path, an independent implementation of the
same definitions), on random centroid scores with every knob varied: probes, thresholds (and
none), imputation, tombstones, metadata filters, batches, short queries."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import clustered_docs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from colengine.index.plaid import PlaidIndex
from colengine.index.plaid import search as S
from colengine.index.plaid import stages_cpu as C


@pytest.fixture(scope="module")
def state():
    docs = clustered_docs(150, 24, 10, seed=3, lo=0, hi=30)   # some documents have no tokens
    idx = PlaidIndex.build(docs, nbits=2, n_centroids=24, seed=0, device="cpu")
    return idx._search_state()


def _agree(ref, got, full):
    """Both stages' (scores, positions), best first: equal scores column by column (the torch
    stage may return fewer columns: the rest must be empty), and every document returned once,
    with the score the torch stage gives it when asked for every candidate (``full``: among
    documents tied at the cut either may be kept)."""
    (rv, rp), (gv, gp) = ref, got
    w = rv.shape[1]
    assert gv.shape[1] >= w
    torch.testing.assert_close(gv[:, :w], rv, rtol=0, atol=1e-5)
    assert bool((gp[:, w:] == -1).all()) and bool(torch.isinf(gv[:, w:]).all())
    fv, fp = full
    for b in range(rv.shape[0]):
        score = {int(d): float(v) for d, v in zip(fp[b], fv[b]) if int(d) >= 0}
        mine = [int(d) for d in gp[b] if int(d) >= 0]
        assert len(set(mine)) == len(mine)
        assert len(mine) == int((rp[b] >= 0).sum())
        for d, v in zip(gp[b].tolist(), gv[b].tolist()):
            if d >= 0:
                assert abs(score[d] - v) <= 1e-5, (b, d)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=hs.integers(0, 10_000), B=hs.integers(1, 4), n_probe=hs.integers(1, 23),
       threshold=hs.one_of(hs.none(), hs.floats(-0.2, 0.9)), impute=hs.booleans(),
       n_keep=hs.integers(1, 200), dead=hs.floats(0, 0.5), filtered=hs.booleans(),
       parts=hs.sampled_from([None, 2, 3]))
def test_stage2_and_stage3_equal_the_torch_stages(state, seed, B, n_probe, threshold, impute,
                                                  n_keep, dead, filtered, parts):
    """``parts``: a single query's scans cut into that many ranges of centroids (on a large
    index with several threads; forced here on 24 centroids), merged after each scan."""
    if parts is not None:
        B = 1
        threads, split = torch.get_num_threads(), C._SPLIT_CENTROIDS
        torch.set_num_threads(parts)
        C._SPLIT_CENTROIDS = 0
    try:
        _check_stages(state, seed, B, n_probe, threshold, impute, n_keep, dead, filtered)
    finally:
        if parts is not None:
            torch.set_num_threads(threads)
            C._SPLIT_CENTROIDS = split


def _check_stages(state, seed, B, n_probe, threshold, impute, n_keep, dead, filtered):
    rng = np.random.default_rng(seed)
    N = state.n_docs
    st = state
    if dead > 0:
        st = dataclasses.replace(st, live=torch.from_numpy(rng.random(N) >= dead))
    allowed = torch.from_numpy(rng.random(N) < 0.6) if filtered else None
    Lq = 6
    q = torch.from_numpy(rng.standard_normal((B, Lq, st.centroids.shape[1])).astype(np.float32))
    q = torch.nn.functional.normalize(q, dim=2)
    qlens = torch.from_numpy(rng.integers(1, Lq + 1, size=B))
    qvalid = torch.arange(Lq).unsqueeze(0) < qlens.unsqueeze(1)
    q = q * qvalid.unsqueeze(2)
    # float32 scores (no ties between centroids), laid out [K, B, Lq] as plaid_search makes them
    SK = (st.centroids.float() @ q.reshape(B * Lq, -1).T).view(-1, B, Lq)
    ref2 = S._stage2(SK, qvalid, st, n_probe, threshold, n_keep, allowed, impute)
    got2 = C.stage2(SK, qlens, st, n_probe, threshold, n_keep, allowed, impute)
    _agree(ref2, got2, S._stage2(SK, qvalid, st, n_probe, threshold, N, allowed, impute))
    pos = got2[1].clone()
    pos[:, ::3] = -1                        # holes, as stage 2 leaves when short
    n3 = max(1, n_keep // 3)
    _agree(S._stage3(SK, pos, st, n3), C.stage3(SK, pos, st, n3),
           S._stage3(SK, pos, st, pos.shape[1]))


def test_stage2_needs_nothing_the_size_of_the_corpus(state):
    """A query's memory follows its candidates, never the corpus: the same lists with every
    document renumbered past 2**40 (a corpus whose per-document bit alone would take 137 GB)
    give the same scores, with the candidates renumbered."""
    st = state
    far = 1 << 40
    st_far = dataclasses.replace(st, ivf_docs=st.ivf_docs.to(torch.int64) + far,
                                 n_docs=st.n_docs + far)
    rng = np.random.default_rng(0)
    q = torch.nn.functional.normalize(torch.from_numpy(
        rng.standard_normal((2, 5, st.centroids.shape[1])).astype(np.float32)), dim=2)
    SK = (st.centroids.float() @ q.reshape(10, -1).T).view(-1, 2, 5)
    ql = torch.tensor([5, 5])
    v, p = C.stage2(SK, ql, st, 2, 0.3, 16)
    vf, pf = C.stage2(SK, ql, st_far, 2, 0.3, 16)
    assert bool((p >= 0).any())
    torch.testing.assert_close(vf, v, rtol=0, atol=0)
    assert torch.equal(pf, torch.where(p >= 0, p + far, p))


def test_the_compiled_stages_work_where_numba_cannot_cache(tmp_path):
    """Where numba can write its cache nowhere (a read-only install without a home folder) it
    refuses ``cache=True`` at import; the engine then compiles without caching and searches
    as anywhere else (a fresh process, numba's cache locators made to fail)."""
    import json
    import subprocess
    import sys

    script = """
import json, sys
import numba.core.caching as caching
def nowhere(self):
    raise OSError("read-only")
caching._CacheLocator.ensure_cache_path = nowhere
import numpy as np
from colengine.index.plaid import PlaidIndex
from colengine.index.plaid import stages_cpu
rng = np.random.default_rng(0)
docs = [rng.standard_normal((int(n), 16)).astype(np.float32) for n in rng.integers(3, 12, 40)]
docs = [d / np.linalg.norm(d, axis=1, keepdims=True) for d in docs]
idx = PlaidIndex.build(docs, nbits=2, n_centroids=8, seed=0)
scores, rows = idx.search_topk(docs[3][:4][None], k=3)
cache = type(stages_cpu._stage3_kernel._cache).__name__
print(json.dumps({"rows": rows.tolist(), "cached": cache}))
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["cached"] == "NullCache"   # compiled, not cached
    assert out["rows"][0][0] == 3
