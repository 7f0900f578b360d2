"""MaxSim from compressed tokens (``colengine.kernels.codes``, Triton under TRITON_INTERPRET=1)
against an independent reference: the codec's own decompression plus an fp64 einsum MaxSim.

Small shapes on purpose: documents of 0, 1, 16, 17 and 33 tokens (the interpreter's tiles are
16 tokens), dimensions that are and are not a power of two or a multiple of a byte's
dimensions, both codecs at every nbits, -1 and repeated candidates, and renormalisation on and
off. No timing here (bench/bench_maxsim_gpu.py).
"""

from __future__ import annotations

import os

TEST_DEVICE = os.environ.get("COLENGINE_TEST_DEVICE", "cpu")   # cpu: interpreter (conftest)

import importlib.util  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import clustered_docs  # noqa: E402

from colengine.index.plaid.codec import ProductCodec, ScalarCodec  # noqa: E402
from colengine.kernels._interpret import interpret_mode  # noqa: E402

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or not (interpret_mode() or torch.cuda.is_available()),
    reason="triton needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture(scope="module")
def corpus():
    return clustered_docs(80, 32, 8, seed=0, lo=1, hi=40)


def _store(d: int, codec_cls, nbits: int, lens, seed: int = 0):
    """A compressed store: (centroids, codes, residuals, offsets, codec, original tokens)."""
    rng = np.random.default_rng(seed)
    cents = rng.standard_normal((6, d)).astype(np.float32)
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    T = int(sum(lens))
    codes = rng.integers(0, 6, size=T)
    x = cents[codes] + 0.3 * rng.standard_normal((T, d)).astype(np.float32) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    fit = x[codes >= 0] - cents[codes]
    fit = np.concatenate([fit, 0.3 * rng.standard_normal((600, d)).astype(np.float32) / np.sqrt(d)])
    codec = codec_cls.fit(fit, nbits=nbits)
    res = codec.compress(torch.from_numpy(x - cents[codes]))
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return (torch.from_numpy(cents), torch.from_numpy(codes).to(torch.int16), res,
            torch.from_numpy(off), codec)


def _independent(q, ql, cents, codes, res, off, codec, cand, normalize):
    """Decode with the codec's own decompress, then MaxSim by an fp64 einsum per pair."""
    x = (codec.decompress(res) + cents[codes.long()]).double()
    if normalize:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = np.full(tuple(cand.shape), -np.inf)
    for b in range(cand.shape[0]):
        qb = q[b, : int(ql[b])].double()
        for c in range(cand.shape[1]):
            j = int(cand[b, c])
            if j < 0 or off[j + 1] == off[j]:
                continue
            s = torch.einsum("qd,td->qt", qb, x[int(off[j]):int(off[j + 1])])
            out[b, c] = float(s.max(dim=1).values.sum()) if qb.shape[0] else 0.0
    return out


def _run(fn, *args, **kw):
    if TEST_DEVICE == "cpu":
        return fn(*args, **kw)
    mv = [a.to(TEST_DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    return fn(*mv, **kw).cpu()


@pytest.mark.parametrize("d", [32, 30])
@pytest.mark.parametrize("codec_cls,nbits", [(ProductCodec, 2), (ProductCodec, 1),
                                             (ScalarCodec, 1), (ScalarCodec, 2),
                                             (ScalarCodec, 4)])
@pytest.mark.parametrize("normalize", [True, False])
def test_codes_kernel_equals_decompress_then_maxsim(d, codec_cls, nbits, normalize):
    from colengine.kernels.codes import reference, score_candidates_codes

    lens = [17, 0, 1, 33, 16, 5]
    cents, codes, res, off, codec = _store(d, codec_cls, nbits, lens, seed=d + nbits)
    rng = np.random.default_rng(1)
    q = torch.from_numpy(rng.standard_normal((3, 7, d)).astype(np.float32))
    q = q / q.norm(dim=2, keepdim=True)
    ql = torch.tensor([7, 1, 4])
    cand = torch.tensor([[0, 3, -1, 1, 0], [5, 4, 2, 3, 3], [-1, -1, 1, 0, 4]])
    args = (q, ql, codes, res, codec.lut(), cents, off, cand)
    got = _run(score_candidates_codes, *args, normalize=normalize).numpy()
    want = _independent(q, ql, cents, codes, res, off, codec, cand, normalize)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(reference(*args, normalize=normalize).numpy(), want,
                               rtol=1e-4, atol=1e-4)
    assert np.isneginf(got[0, 2]) and np.isneginf(got[0, 3])   # -1 candidate, empty document


def test_codes_kernel_equals_the_engines_stage4_on_a_built_index(corpus):
    """On a PLAID index: the kernel's scores are the engine's stage 4 (SearchState.decompress
    then the packed MaxSim kernel), query padding included."""
    from colengine.index.plaid import PlaidIndex
    from colengine.kernels import score_candidates_packed
    from colengine.kernels.codes import score_candidates_codes

    idx = PlaidIndex.build(corpus[:40], nbits=2, seed=0, device="cpu")
    st = idx._search_state()
    rng = np.random.default_rng(3)
    q = torch.from_numpy(rng.standard_normal((2, 6, idx.dim)).astype(np.float32))
    q = q / q.norm(dim=2, keepdim=True)
    ql = torch.tensor([6, 3])
    cand = torch.tensor([[0, 7, 39, -1], [12, 12, 3, 20]])
    uniq, inv = torch.unique(cand[cand >= 0], return_inverse=True)
    tokens, offsets = st.decompress(uniq)
    local = torch.full_like(cand, -1)
    local[cand >= 0] = inv
    want = score_candidates_packed(q, ql, tokens, offsets, local).numpy()
    got = _run(score_candidates_codes, q, ql, st.codes, st.residuals, st.codec.lut(),
               st.centroids.float(), st.tok_offsets, cand, normalize=st.normalized).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_codes_kernel_rejects_mismatched_inputs():
    from colengine.kernels.codes import score_candidates_codes

    cents, codes, res, off, codec = _store(32, ProductCodec, 2, [3, 4])
    q, ql, cand = torch.zeros(1, 2, 32), torch.tensor([2]), torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="residuals must be uint8"):
        score_candidates_codes(q, ql, codes, res.to(torch.int16), codec.lut(), cents, off, cand)
    with pytest.raises(ValueError, match="does not decode"):
        score_candidates_codes(q, ql, codes, res, codec.lut()[:256], cents, off, cand)
    with pytest.raises(ValueError, match="one centroid per token"):
        score_candidates_codes(q, ql, codes[:-1], res, codec.lut(), cents, off, cand)
    with pytest.raises(ValueError, match="must be \\[B, C\\]"):
        score_candidates_codes(q, ql, codes, res, codec.lut(), cents, off, cand.view(-1))


def test_search_with_the_fused_stage4_equals_the_decompressing_one(corpus, monkeypatch):
    """plaid_search with stage 4 scored from codes (the GPU path: compiled under
    COLENGINE_TEST_DEVICE=cuda, forced on the CPU under the interpreter otherwise) returns the
    same documents and scores as with decompression."""
    from colengine.index.plaid import PlaidIndex
    from colengine.index.plaid import search as sm

    idx = PlaidIndex.build(corpus[:60], nbits=2, seed=0, device=TEST_DEVICE)
    rng = np.random.default_rng(5)
    q = torch.from_numpy(rng.standard_normal((3, 5, idx.dim)).astype(np.float32))
    q = q / q.norm(dim=2, keepdim=True)
    lens = torch.tensor([5, 2, 4])
    monkeypatch.setattr(sm, "_fused_stage4", lambda dev, d: False)
    want = idx.search_topk(q, k=7, query_lengths=lens, n_exact=20, n_candidates=40)
    monkeypatch.setattr(sm, "_fused_stage4", lambda dev, d: True)
    got = idx.search_topk(q, k=7, query_lengths=lens, n_exact=20, n_candidates=40)
    assert not sm._FUSED_FAILED
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("failure", ["triton", "driver", "bad-input"])
def test_a_fused_kernel_that_cannot_run_falls_back_but_a_bad_input_is_raised(corpus, monkeypatch,
                                                                              failure):
    """A Triton compile error or a driver error in the fused stage 4 warns once and the search
    (and every later one) decompresses instead, with the same results; a ValueError (the
    engine passing something wrong) is not hidden."""
    import triton.errors

    from colengine.index.plaid import PlaidIndex
    from colengine.index.plaid import search as sm

    idx = PlaidIndex.build(corpus[:60], nbits=2, seed=0, device="cpu")
    rng = np.random.default_rng(6)
    q = torch.from_numpy(rng.standard_normal((2, 4, idx.dim)).astype(np.float32))
    want = idx.search_topk(q, k=5)
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise {"triton": triton.errors.TritonError("no such instruction"),
               "driver": RuntimeError("CUDA error: invalid device function"),
               "bad-input": ValueError("residuals must be uint8")}[failure]

    import colengine.kernels.codes as kc
    monkeypatch.setattr(kc, "score_candidates_codes", broken)
    monkeypatch.setattr(sm, "_fused_stage4", lambda dev, d: not sm._FUSED_FAILED)
    monkeypatch.setattr(sm, "_FUSED_FAILED", [])
    if failure == "bad-input":
        with pytest.raises(ValueError, match="uint8"):
            idx.search_topk(q, k=5)
        assert not sm._FUSED_FAILED
        return
    with pytest.warns(RuntimeWarning, match="fused stage-4 kernel failed"):
        got = idx.search_topk(q, k=5)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1]) and len(sm._FUSED_FAILED) == 1
    again = idx.search_topk(q, k=5)          # no second try, no second warning
    assert torch.equal(again[1], want[1]) and len(calls) == 1
