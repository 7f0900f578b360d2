"""colengine.csr.distinct_pairs against numpy's own unique over every (row, value) pair."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import colengine.csr as csr


@settings(max_examples=150, deadline=None)
@given(lens=st.lists(st.integers(0, 30), max_size=40), n_values=st.integers(1, 50),
       block=st.sampled_from([1, 7, 64, 1 << 23]), first_row=st.integers(0, 5),
       seed=st.integers(0, 2**16))
def test_distinct_pairs_equal_numpy_unique(lens, n_values, block, first_row, seed):
    rng = np.random.default_rng(seed)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    values = rng.integers(0, n_values, size=int(offsets[-1]))
    rows_all = np.repeat(np.arange(len(lens)), lens)
    keys, want_counts = np.unique(rows_all * n_values + values, return_counts=True)
    old = csr.BLOCK_ITEMS
    csr.BLOCK_ITEMS = block
    try:
        r, v, c = csr.distinct_pairs(values, offsets, n_values, first_row=first_row,
                                     counts=True, dtype=np.int32)
        r2, v2 = csr.distinct_pairs(values, offsets, n_values, first_row=first_row)
    finally:
        csr.BLOCK_ITEMS = old
    np.testing.assert_array_equal(r, keys // n_values + first_row)
    np.testing.assert_array_equal(v, keys % n_values)
    np.testing.assert_array_equal(c, want_counts)
    assert r.dtype == np.int32 and c.dtype == np.int64 and r2.dtype == np.int64
    np.testing.assert_array_equal(r2, r)
    np.testing.assert_array_equal(v2, v)


@pytest.mark.parametrize("counts", [True, False])
def test_no_rows_and_empty_rows(counts):
    out = csr.distinct_pairs(np.zeros(0, dtype=np.int64), np.zeros(4, dtype=np.int64), 5,
                             counts=counts)
    assert all(a.shape == (0,) for a in out)
