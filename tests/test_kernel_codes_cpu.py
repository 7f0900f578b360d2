"""MaxSim from compressed tokens on the CPU (``colengine.kernels.codes_cpu``, numba) against
an independent reference: the codec's own decompression plus an fp64 einsum MaxSim (the helpers
of ``test_kernel_codes``), and PLAID's stage 4 on it against the torch path it replaced.

Small shapes on purpose: documents of 0, 1, 3, 4, 5, 16, 17 and 33 tokens (the kernel decodes
four tokens at a time), query lengths that are and are not a multiple of four (its blocks of
query tokens) and zero, dimensions that are and are not a multiple of a byte's dimensions, both
codecs at every nbits, float32 and bfloat16 centroids, int16 and int32 codes, -1 and repeated
candidates, and renormalisation on and off. No timing here (bench/bench_plaid.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from colengine.kernels import score_candidates_packed_unchecked
from colengine.kernels.codes_cpu import score_candidates_codes_cpu
from conftest import clustered_docs, clustered_queries
from test_kernel_codes import _independent, _store

from colengine.index.plaid import PlaidIndex
from colengine.index.plaid import search as S
from colengine.index.plaid.codec import ProductCodec, ScalarCodec

LENS = [0, 1, 3, 4, 5, 16, 17, 33]


@pytest.mark.parametrize("d", [32, 30, 128])
@pytest.mark.parametrize("codec_cls", [ProductCodec, ScalarCodec])
@pytest.mark.parametrize("nbits", [1, 2, 4])
@pytest.mark.parametrize("cent_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_codes_cpu_equals_decode_then_maxsim(d, codec_cls, nbits, cent_dtype, normalize):
    cents, codes, res, off, codec = _store(d, codec_cls, nbits, LENS, seed=d + nbits)
    cents = cents.to(cent_dtype)
    rng = np.random.default_rng(nbits)
    q = torch.from_numpy(rng.standard_normal((4, 7, d)).astype(np.float32))
    ql = torch.tensor([7, 0, 5, 4])
    cand = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7],
                         [7, 6, -1, 2, 2, 1, 0, -1],
                         [-1, -1, 6, 5, 5, 4, 3, 0],
                         [3, 4, 5, 6, 7, 1, 2, -1]])
    want = _independent(q, ql, cents.float(), codes, res, off, codec, cand, normalize)
    for codes_t in (codes, codes.to(torch.int32)):
        got = score_candidates_codes_cpu(q, ql, codes_t, res, codec.lut("cpu"), cents, off, cand,
                                         normalize=normalize)
        assert got.dtype == torch.float32 and got.shape == cand.shape
        finite = np.isfinite(want)
        assert np.array_equal(np.isfinite(got.numpy()), finite)   # -1 and empty docs: -inf
        np.testing.assert_allclose(got.numpy()[finite], want[finite], rtol=1e-5, atol=1e-5)
    # a query of length 0 scores 0 against a non-empty document
    assert float(got[1, 0]) == pytest.approx(0.0, abs=1e-9)


def test_codes_cpu_empty_inputs():
    cents, codes, res, off, codec = _store(16, ProductCodec, 2, [2, 3])
    q = torch.randn(0, 4, 16)
    got = score_candidates_codes_cpu(q, torch.zeros(0, dtype=torch.int64), codes, res,
                                     codec.lut("cpu"), cents, off,
                                     torch.zeros(0, 3, dtype=torch.int64))
    assert got.shape == (0, 3)
    q = torch.randn(2, 4, 16)
    got = score_candidates_codes_cpu(q, torch.tensor([4, 4]), codes, res, codec.lut("cpu"), cents,
                                     off, torch.full((2, 3), -1))
    assert bool(torch.isinf(got).all()) and bool((got < 0).all())


@pytest.mark.parametrize("loaded_with_adds", [False, True])
def test_stage4_from_codes_equals_the_decompressing_path(tmp_path, loaded_with_adds):
    """PLAID's exact scoring on the CPU (scored from the codes: stage 4, rerank, filters) gives
    the scores of the torch path that decompresses the survivors into the MaxSim kernel, also
    on a loaded index whose added documents sit in a second part of each token store."""
    docs = clustered_docs(120, 32, 8, seed=1, lo=1, hi=40)
    if loaded_with_adds:
        PlaidIndex.build(docs[:90], nbits=2, seed=0, path=tmp_path / "i")
        idx = PlaidIndex.load(tmp_path / "i")
        idx.add(docs[90:], [f"x{i}" for i in range(30)])
    else:
        idx = PlaidIndex.build(docs, nbits=2, seed=0)
    st = idx._search_state()
    assert S.is_appended(st.residuals) == loaded_with_adds
    q = clustered_queries(docs, 4, 6, 2).float()
    ql = torch.tensor([6, 3, 6, 1])
    rng = np.random.default_rng(0)
    pos = torch.from_numpy(rng.integers(-1, idx.n_rows, size=(4, 50)))
    pos[:, :5] = torch.arange(85, 90) if not loaded_with_adds else torch.arange(88, 93)
    q = q * (torch.arange(6) < ql[:, None]).unsqueeze(2)
    # the torch path: the residuals decoded a chunk at a time into the MaxSim kernel's block
    want = score_candidates_packed_unchecked(q, ql, st.decode, st.tok_offsets, pos)
    got = S.score_stored(q, ql, pos, st, score_candidates_packed_unchecked)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
