"""MaxSim kernels against an independent fp64 einsum reference.

Every backend (torch fallback, Triton under TRITON_INTERPRET=1 on this CPU) and every dtype runs
the same small-shape cases: odd lengths that are not multiples of the block sizes, Lq = 1, Ld = 1,
zero-length documents, -1 candidates, repeated candidates, B > 1, n = 0; padding is filled with
huge values that must never reach a score. No timing assertions here (see bench/).
"""

from __future__ import annotations

import os

# COLENGINE_TEST_DEVICE=cuda runs every case on the GPU with compiled Triton kernels; by default
# the cases run on the CPU, Triton under its interpreter (TRITON_INTERPRET=1, set by conftest).
TEST_DEVICE = os.environ.get("COLENGINE_TEST_DEVICE", "cpu")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from colengine.kernels import (  # noqa: E402
    score_candidates_packed,
    score_candidates_padded,
    score_pairs_packed,
)
from colengine import kernels  # noqa: E402
from colengine.kernels._interpret import interpret_mode  # noqa: E402
from colengine.kernels import torch_impl  # noqa: E402



def _on_test_device(fn):
    """Under COLENGINE_TEST_DEVICE=cuda: CPU tensor arguments go to the GPU, results come back."""
    if TEST_DEVICE == "cpu":
        return fn

    def call(*args, **kw):
        def mv(a):
            return a.to(TEST_DEVICE) if isinstance(a, torch.Tensor) and a.device.type == "cpu" else a

        return fn(*map(mv, args), **{k: mv(v) for k, v in kw.items()}).cpu()

    return call


score_candidates_packed = _on_test_device(score_candidates_packed)
score_candidates_padded = _on_test_device(score_candidates_padded)
score_pairs_packed = _on_test_device(score_pairs_packed)
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = interpret_mode()

BACKENDS = [
    "torch",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            not (HAS_TRITON and (INTERPRET or torch.cuda.is_available())),
            reason="triton needs CUDA or TRITON_INTERPRET=1",
        ),
    ),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GARBAGE = 1e4
NEG_INF = float("-inf")


def tol(dtype: torch.dtype, lq: int) -> dict:
    """Tolerance on a score that sums lq maxima of dot products of unit-scale vectors."""
    # the reference sees the same rounded inputs, so only accumulation-order error remains
    # (plus query rounding to the document dtype on the Triton path with mixed dtypes).
    if dtype == torch.float32:
        return {"atol": 1e-4 * max(lq, 1), "rtol": 1e-5}
    if dtype == torch.float16:
        return {"atol": 2e-3 * max(lq, 1), "rtol": 1e-3}
    return {"atol": 1.5e-2 * max(lq, 1), "rtol": 8e-3}


def device() -> torch.device:
    return torch.device(TEST_DEVICE)


def ref_maxsim(q: torch.Tensor, doc: torch.Tensor) -> float:
    """fp64 einsum reference for one pair; q [lq, d], doc [ld, d] (already sliced)."""
    if doc.shape[0] == 0:
        return NEG_INF
    if q.shape[0] == 0:
        return 0.0
    sim = torch.einsum("qd,td->qt", q.double(), doc.double())
    return float(sim.max(dim=1).values.sum())


def assert_scores(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, lq: int) -> None:
    assert out.dtype == torch.float32
    assert out.shape == ref.shape
    ninf = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(out), ninf), (out, ref)
    torch.testing.assert_close(out[~ninf].double(), ref[~ninf], **tol(dtype, lq))


def rand(*shape: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) / 4).to(dtype)


def make_packed(lengths: list[int], d: int, dtype: torch.dtype, gen: torch.Generator):
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    tokens = rand(int(offsets[-1]), d, dtype=dtype, gen=gen)
    return tokens, offsets


# ----------------------------------------------------------------------------- padded


PADDED_CASES = [
    # (B, n, Lq, Ld, d, query_lengths, doc_lengths or None for random)
    (2, 5, 7, 19, 32, [7, 3], None),
    (1, 3, 1, 1, 16, [1], [[1, 1, 0]]),  # Lq = 1, Ld = 1, an empty document
    (3, 4, 33, 37, 48, [33, 17, 0], None),  # Lq over a 32 tile, d not a power of two, ql = 0
    (2, 0, 5, 9, 32, [5, 5], []),  # n = 0
    (1, 2, 8, 40, 128, [8], [[40, 23]]),  # the d = 128 fast path
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(PADDED_CASES)))
def test_padded(backend: str, dtype: torch.dtype, case: int) -> None:
    bsz, n, lq, ld, d, qls, dls = PADDED_CASES[case]
    gen = torch.Generator().manual_seed(case)
    queries = rand(bsz, lq, d, dtype=dtype, gen=gen)
    docs = rand(bsz, n, ld, d, dtype=dtype, gen=gen)
    ql = torch.tensor(qls, dtype=torch.int64)
    if dls is None:
        dl = torch.randint(0, ld + 1, (bsz, n), generator=gen)
        dl[0, 0] = ld
        if n > 1:
            dl[-1, -1] = 0
    else:
        dl = torch.tensor(dls, dtype=torch.int64).reshape(bsz, n)
    for b in range(bsz):  # garbage in every padded slot
        queries[b, qls[b]:] = GARBAGE
        for k in range(n):
            docs[b, k, int(dl[b, k]):] = GARBAGE
    out = score_candidates_padded(queries, docs, ql, dl, backend=backend)
    ref = torch.tensor(
        [[ref_maxsim(queries[b, : qls[b]], docs[b, k, : int(dl[b, k])]) for k in range(n)]
         for b in range(bsz)],
        dtype=torch.float64,
    ).reshape(bsz, n)
    assert_scores(out, ref, dtype, lq)


# ----------------------------------------------------------------------------- packed candidates


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [32, 128])
def test_packed_candidates(backend: str, dtype: torch.dtype, d: int) -> None:
    gen = torch.Generator().manual_seed(d)
    lengths = [5, 0, 17, 1, 33, 16, 2, 0, 21]
    tokens, offsets = make_packed(lengths, d, dtype, gen)
    bsz, lq = 3, 9
    queries = rand(bsz, lq, d, dtype=dtype, gen=gen)
    ql = torch.tensor([9, 1, 4])
    for b in range(bsz):
        queries[b, int(ql[b]):] = GARBAGE
    candidates = torch.tensor(
        [[0, 2, -1, 4, 4, 1],  # repeat, -1, empty doc
         [8, 7, 6, 5, 3, -1],
         [-1, -1, -1, -1, -1, -1]],
        dtype=torch.int64,
    )
    out = score_candidates_packed(queries, ql, tokens, offsets, candidates, backend=backend)
    ref = torch.empty(candidates.shape, dtype=torch.float64)
    for b in range(bsz):
        for k in range(candidates.shape[1]):
            c = int(candidates[b, k])
            ref[b, k] = NEG_INF if c < 0 else ref_maxsim(
                queries[b, : int(ql[b])], tokens[int(offsets[c]) : int(offsets[c + 1])]
            )
    assert_scores(out, ref, dtype, lq)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_shared_candidates_batch(backend: str) -> None:
    """Batched queries with identical candidates (the union / one-GEMM path on torch)."""
    gen = torch.Generator().manual_seed(7)
    lengths = [3, 30, 1, 12, 0, 25, 8]
    tokens, offsets = make_packed(lengths, 64, torch.float32, gen)
    queries = rand(4, 6, 64, dtype=torch.float32, gen=gen)
    ql = torch.tensor([6, 2, 0, 5])
    cand = torch.arange(7).repeat(4, 1)
    out = score_candidates_packed(queries, ql, tokens, offsets, cand, backend=backend)
    ref = torch.tensor(
        [[ref_maxsim(queries[b, : int(ql[b])], tokens[int(offsets[c]) : int(offsets[c + 1])])
          for c in range(7)] for b in range(4)],
        dtype=torch.float64,
    )
    assert_scores(out, ref, torch.float32, 6)
    assert torch.all(out[2, torch.tensor(lengths) > 0] == 0)  # empty query scores 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_empty_shapes(backend: str) -> None:
    tokens, offsets = make_packed([3, 4], 16, torch.float32, torch.Generator().manual_seed(0))
    q = torch.randn(2, 3, 16)
    ql = torch.tensor([3, 3])
    out = score_candidates_packed(q, ql, tokens, offsets, torch.empty(2, 0, dtype=torch.int64),
                                  backend=backend)
    assert out.shape == (2, 0) and out.dtype == torch.float32
    out = score_candidates_packed(q[:0], ql[:0], tokens, offsets,
                                  torch.empty(0, 5, dtype=torch.int64), backend=backend)
    assert out.shape == (0, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_unchecked_equals_checked(backend: str) -> None:
    """The engine's unchecked entry point scores exactly like the public one on valid input
    (fp16 documents, fp32 queries, -1, empty documents, repeats, an empty query)."""
    gen = torch.Generator().manual_seed(3)
    tokens, offsets = make_packed([4, 0, 9, 17, 1], 32, torch.float16, gen)
    q = rand(3, 5, 32, dtype=torch.float32, gen=gen)
    ql = torch.tensor([5, 2, 0])
    cand = torch.tensor([[2, -1, 1, 0], [3, 3, 4, -1], [0, 1, 2, 3]])
    checked = score_candidates_packed(q, ql, tokens, offsets, cand, backend=backend)
    unchecked = _on_test_device(kernels.score_candidates_packed_unchecked)(
        q, ql, tokens, offsets, cand, backend=backend)
    torch.testing.assert_close(unchecked, checked, rtol=0, atol=0)
    ref = torch.tensor([ref_maxsim(q[0], tokens[4:13]), NEG_INF, NEG_INF,
                        ref_maxsim(q[0], tokens[:4])], dtype=torch.float64)
    assert_scores(unchecked[0], ref, torch.float16, 5)


@pytest.mark.parametrize("chunk", [None, 64])
def test_packed_int8_store_with_row_scales(chunk) -> None:
    """An int8 token store with a per-token scale (PLAID's int8 refinement vectors, scored
    where they are stored) scores like the fp64 einsum over ``int8 * scale``: the scale
    multiplies each token's similarities before the max (scales differ from token to token,
    and a zero scale keeps its token at 0). In one chunk and in chunks of a few rows; B > 1
    with repeated candidates, -1, an empty document and an empty query."""
    gen = torch.Generator().manual_seed(5)
    lengths = [7, 0, 13, 3, 21]
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths), 0)
    T, d = int(offsets[-1]), 32
    store = torch.randint(-127, 128, (T, d), generator=gen, dtype=torch.int64).to(torch.int8)
    scale = torch.rand(T, generator=gen) / 100
    scale[4] = 0.0
    q = rand(3, 6, d, dtype=torch.float32, gen=gen)
    ql = torch.tensor([6, 3, 0])
    cand = torch.tensor([[4, 1, 0, 2], [2, 2, -1, 3], [0, 4, 1, 3]])
    out = torch_impl.score_candidates_packed(q, ql, store, offsets, cand, row_scale=scale,
                                             max_chunk_bytes=chunk)
    deq = store.double() * scale.double().unsqueeze(1)
    ref = torch.tensor([[ref_maxsim(q[b, :int(ql[b])], deq[offsets[c]:offsets[c + 1]])
                         if c >= 0 else NEG_INF for c in cand[b].tolist()] for b in range(3)],
                       dtype=torch.float64)
    assert_scores(out, ref, torch.float32, 6)
    # the engine's entry point passes the scales through on the torch backend, and Triton
    # (float tiles only) refuses them rather than reading int8 as floats
    via = kernels.score_candidates_packed_unchecked(q, ql, store, offsets, cand, row_scale=scale,
                                                    backend="torch")
    assert_scores(via, ref, torch.float32, 6)
    if HAS_TRITON and (INTERPRET or torch.cuda.is_available()):
        with pytest.raises(ValueError, match="torch backend only"):
            kernels.score_candidates_packed_unchecked(q, ql, store, offsets, cand,
                                                      row_scale=scale, backend="triton")


@pytest.mark.parametrize("chunk", [None, 64])
def test_packed_token_function(chunk) -> None:
    """A token source given as a function of row numbers (PLAID's decoder) scores like the
    stored rows it returns, against the fp64 einsum; it is asked only for rows of the
    candidates (padding repeats a document's own last row), and Triton refuses it."""
    gen = torch.Generator().manual_seed(8)
    tokens, offsets = make_packed([5, 0, 11, 2, 17], 32, torch.float32, gen)
    asked = []

    def take(rows):
        asked.append(rows.clone())
        return tokens.index_select(0, rows) * 1.0

    q = rand(2, 4, 32, dtype=torch.float32, gen=gen)
    ql = torch.tensor([4, 3])
    cand = torch.tensor([[4, 1, 0, -1], [2, 2, 3, 0]])
    out = torch_impl.score_candidates_packed(q, ql, take, offsets, cand, max_chunk_bytes=chunk)
    ref = torch.tensor([[ref_maxsim(q[b, :int(ql[b])], tokens[offsets[c]:offsets[c + 1]])
                         if c >= 0 else NEG_INF for c in cand[b].tolist()] for b in range(2)],
                       dtype=torch.float64)
    assert_scores(out, ref, torch.float32, 4)
    wanted = set()
    for c in {0, 2, 3, 4}:
        wanted |= set(range(int(offsets[c]), int(offsets[c + 1])))
    assert set(torch.cat(asked).tolist()) <= wanted
    via = kernels.score_candidates_packed_unchecked(q, ql, take, offsets, cand, backend="torch")
    assert_scores(via, ref, torch.float32, 4)
    if HAS_TRITON and (INTERPRET or torch.cuda.is_available()):
        with pytest.raises(ValueError, match="torch backend only"):
            kernels.score_candidates_packed_unchecked(q, ql, take, offsets, cand,
                                                      backend="triton")


def test_unchecked_skips_the_value_checks() -> None:
    """What the public function refuses by value (an offset past the tokens, a candidate id
    past the end) the unchecked one does not look at: it must only get the engine's inputs."""
    q, ql, tokens, offsets, cand = _packed_inputs()
    with pytest.raises(ValueError, match="candidates must be document ids"):
        kernels.score_candidates_packed(q, ql, tokens, offsets, torch.tensor([[0, 2]]))
    bad_offsets = torch.tensor([0, 2, 4])   # the last should be 5: reads stop short
    with pytest.raises(ValueError, match=r"doc_offsets\[-1\] must equal"):
        kernels.score_candidates_packed(q, ql, tokens, bad_offsets, cand)
    out = kernels.score_candidates_packed_unchecked(q, ql, tokens, bad_offsets, cand,
                                                    backend="torch")
    assert out.shape == (1, 2)


# ----------------------------------------------------------------------------- ragged pairs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pairs(backend: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    d = 48
    q_lens = [1, 7, 33, 0, 5, 12]
    d_lens = [1, 19, 40, 6, 0, 17]
    q_tokens, q_off = make_packed(q_lens, d, dtype, gen)
    d_tokens, d_off = make_packed(d_lens, d, dtype, gen)
    out = score_pairs_packed(q_tokens, q_off, d_tokens, d_off, backend=backend)
    ref = torch.tensor(
        [ref_maxsim(q_tokens[int(q_off[p]) : int(q_off[p + 1])],
                    d_tokens[int(d_off[p]) : int(d_off[p + 1])]) for p in range(len(q_lens))],
        dtype=torch.float64,
    )
    assert_scores(out, ref, dtype, max(q_lens))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairs_empty(backend: str) -> None:
    z = torch.zeros(1, dtype=torch.int64)
    out = score_pairs_packed(torch.empty(0, 16), z, torch.empty(0, 16), z, backend=backend)
    assert out.shape == (0,) and out.dtype == torch.float32


# ----------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_entry_points_agree(backend: str) -> None:
    """The same (query, document) pairs through padded, packed and pairs give the same scores."""
    gen = torch.Generator().manual_seed(5)
    d, lq = 32, 5
    lengths = [4, 1, 18, 0, 9]
    tokens, offsets = make_packed(lengths, d, torch.float32, gen)
    q = rand(1, lq, d, dtype=torch.float32, gen=gen)
    ql = torch.tensor([lq])
    packed = score_candidates_packed(q, ql, tokens, offsets, torch.arange(5)[None], backend=backend)
    docs = torch.full((1, 5, 18, d), GARBAGE)
    for i, n in enumerate(lengths):
        docs[0, i, :n] = tokens[int(offsets[i]) : int(offsets[i + 1])]
    padded = score_candidates_padded(q, docs, ql, torch.tensor([lengths]), backend=backend)
    pairs = score_pairs_packed(
        q[0].repeat(5, 1), torch.arange(6) * lq, tokens, offsets, backend=backend
    )
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0], pairs, atol=1e-5, rtol=1e-5)


def test_mixed_dtypes_torch() -> None:
    gen = torch.Generator().manual_seed(9)
    tokens, offsets = make_packed([6, 3], 32, torch.float16, gen)
    q = rand(1, 4, 32, dtype=torch.float32, gen=gen)
    out = score_candidates_packed(q, torch.tensor([4]), tokens, offsets, torch.tensor([[0, 1]]),
                                  backend="torch")
    ref = torch.tensor([[ref_maxsim(q[0], tokens[:6]), ref_maxsim(q[0], tokens[6:])]],
                       dtype=torch.float64)
    assert_scores(out, ref, torch.float32, 4)


# ----------------------------------------------------------------------------- bounded chunks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_tiny_chunks_match(dtype: torch.dtype) -> None:
    """Force chunks of a few rows: results are identical to one big chunk (same semantics)."""
    gen = torch.Generator().manual_seed(13)
    lengths = torch.randint(0, 40, (60,), generator=gen).tolist()
    tokens, offsets = make_packed(lengths, 32, dtype, gen)
    q = rand(3, 8, 32, dtype=dtype, gen=gen)
    ql = torch.tensor([8, 3, 6])
    cand = torch.randint(-1, 60, (3, 50), generator=gen)
    big = torch_impl.score_candidates_packed(q, ql, tokens, offsets, cand, max_chunk_bytes=1 << 30)
    for budget in (1, 4096, 50_000):
        small = torch_impl.score_candidates_packed(q, ql, tokens, offsets, cand,
                                                  max_chunk_bytes=budget)
        torch.testing.assert_close(small, big, atol=1e-5, rtol=1e-5)
    shared = cand[:1].repeat(3, 1)  # union path
    big = torch_impl.score_candidates_packed(q, ql, tokens, offsets, shared, max_chunk_bytes=1 << 30)
    small = torch_impl.score_candidates_packed(q, ql, tokens, offsets, shared, max_chunk_bytes=1)
    torch.testing.assert_close(small, big, atol=1e-5, rtol=1e-5)
    ref = torch.tensor(
        [[NEG_INF if int(c) < 0 else ref_maxsim(q[b, : int(ql[b])],
                                                tokens[int(offsets[c]) : int(offsets[c + 1])])
          for c in shared[b]] for b in range(3)],
        dtype=torch.float64,
    )
    assert_scores(small, ref, dtype, 8)
    qo = torch.arange(61) * 8
    po = torch_impl.score_pairs_packed(q[0].repeat(60, 1), qo, tokens, offsets, max_chunk_bytes=1)
    pb = torch_impl.score_pairs_packed(q[0].repeat(60, 1), qo, tokens, offsets)
    torch.testing.assert_close(po, pb, atol=1e-5, rtol=1e-5)
    every = torch_impl.score_candidates_packed(q[:1], ql[:1], tokens, offsets, torch.arange(60)[None])
    torch.testing.assert_close(po, every[0], atol=1e-5, rtol=1e-5)


def test_padding_nan_never_read_torch() -> None:
    """Even nan/inf padding cannot leak: padded tokens are never read by the torch fallback."""
    q = torch.randn(1, 4, 16)
    docs = torch.randn(1, 2, 6, 16)
    docs[0, 0, 3:] = float("nan")
    docs[0, 1, 2:] = float("inf")
    q_pad = torch.cat([q, torch.full((1, 2, 16), float("nan"))], dim=1)
    out = score_candidates_padded(q_pad, docs, torch.tensor([4]), torch.tensor([[3, 2]]),
                                  backend="torch")
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- validation


def _packed_inputs():
    tokens, offsets = make_packed([2, 3], 16, torch.float32, torch.Generator().manual_seed(0))
    return torch.randn(1, 4, 16), torch.tensor([4]), tokens, offsets, torch.tensor([[0, 1]])


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: {**a, "queries": a["queries"][0]}, "queries must have 3 dimensions"),
        (lambda a: {**a, "queries": a["queries"].double()}, "float32, float16 or bfloat16"),
        (lambda a: {**a, "queries": a["queries"][..., :8]}, "embedding dim"),
        (lambda a: {**a, "query_lengths": torch.tensor([5])}, r"query_lengths must lie in \[0, 4\]"),
        (lambda a: {**a, "query_lengths": torch.tensor([4.0])}, "query_lengths must be an int64"),
        (lambda a: {**a, "doc_offsets": torch.tensor([0, 3, 2, 5])}, "non-decreasing"),
        (lambda a: {**a, "doc_offsets": torch.tensor([0, 2, 4])}, r"doc_offsets\[-1\] must equal"),
        (lambda a: {**a, "doc_offsets": torch.tensor([1, 2, 5])}, r"doc_offsets\[0\] must be 0"),
        (lambda a: {**a, "doc_offsets": a["doc_offsets"].float()}, "doc_offsets must be an int64"),
        (lambda a: {**a, "candidates": torch.tensor([[0, 2]])}, "candidates must be document ids"),
        (lambda a: {**a, "candidates": torch.tensor([[0, -2]])}, "candidates must be document ids"),
        (lambda a: {**a, "candidates": torch.tensor([0, 1])}, "candidates must have shape"),
        (lambda a: {**a, "backend": "cuda"}, "backend must be one of"),
        (lambda a: {**a, "doc_tokens": a["doc_tokens"].to("meta")}, "same device"),
    ],
)
def test_packed_validation(mutate, match: str) -> None:
    q, ql, tokens, offsets, cand = _packed_inputs()
    args = {"queries": q, "query_lengths": ql, "doc_tokens": tokens, "doc_offsets": offsets,
            "candidates": cand, "backend": "torch"}
    args = mutate(args)
    with pytest.raises(ValueError, match=match):
        score_candidates_packed(args.pop("queries"), args.pop("query_lengths"),
                                args.pop("doc_tokens"), args.pop("doc_offsets"),
                                args.pop("candidates"), **args)


def test_padded_validation() -> None:
    q = torch.randn(2, 4, 16)
    docs = torch.randn(2, 3, 5, 16)
    ql = torch.tensor([4, 4])
    dl = torch.full((2, 3), 5)
    with pytest.raises(ValueError, match="docs must have 4 dimensions"):
        score_candidates_padded(q, docs[0], ql, dl)
    with pytest.raises(ValueError, match=r"docs must have shape \[B=2"):
        score_candidates_padded(q, docs[:1], ql, dl)
    with pytest.raises(ValueError, match=r"doc_lengths must lie in \[0, 5\]"):
        score_candidates_padded(q, docs, ql, dl + 1)
    with pytest.raises(ValueError, match="doc_lengths must have shape"):
        score_candidates_padded(q, docs, ql, dl[0])
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        score_candidates_padded(q.numpy(), docs, ql, dl)


def test_pairs_validation() -> None:
    qt, dt = torch.randn(5, 16), torch.randn(7, 16)
    with pytest.raises(ValueError, match="both have P\\+1 entries"):
        score_pairs_packed(qt, torch.tensor([0, 5]), dt, torch.tensor([0, 3, 7]))
    with pytest.raises(ValueError, match=r"q_offsets\[-1\] must equal"):
        score_pairs_packed(qt, torch.tensor([0, 4]), dt, torch.tensor([0, 7]))


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_backend_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    q, ql, tokens, offsets, cand = _packed_inputs()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):  # CPU tensors, even on a GPU host
        kernels.score_candidates_packed(q, ql, tokens, offsets, cand, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    t2, o2 = make_packed([2, 3], 24, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="multiples of 16"):
        score_candidates_packed(torch.randn(1, 4, 24), ql, t2, o2, cand, backend="triton")
    # auto never picks triton on CPU, and d = 24 works on torch
    out = score_candidates_packed(torch.randn(1, 4, 24), ql, t2, o2, cand)
    assert out.shape == (1, 2)


def test_import_without_triton(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The package must not import triton eagerly (macOS / MPS has none): in a fresh process,
    importing colengine (kernels, PLAID, the retriever) and scoring on the CPU through
    ``backend="auto"`` leaves triton unimported, so none of it needs triton to be there."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "import colengine, colengine.retriever, colengine.index.plaid\n"
        "from colengine.kernels import score_candidates_packed as f\n"
        "t = torch.randn(5, 16); o = torch.tensor([0, 2, 5])\n"
        "print(f(torch.randn(1, 3, 16), torch.tensor([3]), t, o, torch.tensor([[1, 0]])).shape)\n"
        "print('triton imported:', sorted(m for m in sys.modules if m.split('.')[0] == 'triton'))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    # run outside the checkout, so the installed package is imported (its colengine.kernels)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "torch.Size([1, 2])" in res.stdout
    assert "triton imported: []" in res.stdout, res.stdout
