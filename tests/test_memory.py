"""Releasing the resident pages of memory-mapped files (colengine.memory.release_mapped),
reading pages ahead (page_spans, will_need) and saving large memory-mapped arrays a slice at a
time (colengine.storage)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colengine import storage
from colengine.memory import page_spans, release_mapped, will_need
from colengine.storage import Bundle, load_bundle, save_bundle

STATUS = Path("/proc/self/status")


def _rss() -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.skipif(not STATUS.exists(), reason="reads resident memory from /proc (Linux)")
def test_written_pages_leave_the_process_and_stay_in_the_file(tmp_path):
    f = tmp_path / "a.npy"
    a = np.lib.format.open_memmap(f, mode="w+", dtype=np.float32, shape=(16384, 1024))  # 64 MB
    rng = np.random.default_rng(0)
    want = rng.standard_normal((256, 1024)).astype(np.float32)
    for r in range(0, a.shape[0], 256):
        a[r:r + 256] = want + r
    before = _rss()
    assert release_mapped(a, 0, a.shape[0] // 2) >= a.nbytes // 2
    middle = _rss()
    assert release_mapped(a, a.shape[0] // 2) >= a.nbytes // 2
    after = _rss()
    assert before - middle > 0.4 * a.nbytes and middle - after > 0.4 * a.nbytes
    for r in (0, 8192, 16128):                 # read back through the mapping ...
        np.testing.assert_array_equal(a[r:r + 256], want + r)
    del a
    b = np.load(f)                             # ... and from the file
    for r in range(0, b.shape[0], 256):
        np.testing.assert_array_equal(b[r:r + 256], want + r)


def test_private_mappings_and_plain_arrays_are_left_alone(tmp_path):
    f = tmp_path / "a.npy"
    np.save(f, np.zeros((4096, 64), dtype=np.float32))
    c = np.load(f, mmap_mode="c")              # copy-on-write: changes live only in memory
    c[:] = 7.0
    assert release_mapped(c) == 0 and release_mapped(c[10:20]) == 0
    assert float(c.sum()) == pytest.approx(7.0 * c.size)
    assert release_mapped(np.ones((100, 3))) == 0
    r = np.load(f, mmap_mode="r")
    assert release_mapped(r[::-1]) == 0        # not contiguous: left alone
    assert release_mapped(r, 5, 5) == 0 and release_mapped(r, 10, 3) == 0
    assert release_mapped(r[100:200]) > 0 and float(r.sum()) == 0.0


@pytest.mark.parametrize("dtype", [np.int8, np.float16, np.int32, np.uint8, np.bool_, np.float64])
def test_large_arrays_are_saved_a_slice_at_a_time_and_load_equal(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(storage, "_WRITE_SLICE_BYTES", 1000)
    rng = np.random.default_rng(1)
    src = tmp_path / "src.npy"
    m = np.lib.format.open_memmap(src, mode="w+", dtype=dtype, shape=(1237, 33))
    m[:] = rng.integers(-100, 100, size=m.shape).astype(dtype)
    flat = (np.arange(5001) % 7).astype(dtype)        # 1-d, several slices
    small = rng.integers(0, 9, size=(3, 4)).astype(dtype)   # under the slice size
    save_bundle(tmp_path / "idx", Bundle("thing", {}, {"m": m, "flat": flat, "small": small}))
    got = load_bundle(tmp_path / "idx", kind="thing")
    for name, want in (("m", m), ("flat", flat), ("small", small)):
        assert got.arrays[name].dtype == want.dtype and got.arrays[name].shape == want.shape
        np.testing.assert_array_equal(got.arrays[name], want)
    files = sorted((tmp_path / "idx").glob("g*/m.npy"))
    np.testing.assert_array_equal(np.load(files[-1]), np.asarray(m))   # a plain .npy file


@settings(max_examples=200, deadline=None)
@given(base=st.integers(0, 50_000), row_bytes=st.integers(1, 9000),
       ranges=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 12)), max_size=30),
       page=st.sampled_from([4096, 16384]))
def test_page_spans_are_the_rows_pages_merged(base, row_bytes, ranges, page):
    """Reference: the set of page numbers each non-empty row range touches."""
    starts = np.array([a for a, _ in ranges], dtype=np.int64)
    stops = np.array([a + n for a, n in ranges], dtype=np.int64)
    want = set()
    for a, b in zip(starts.tolist(), stops.tolist()):
        if b > a:
            lo, hi = base + a * row_bytes, base + b * row_bytes
            want.update(range(lo // page, -(-hi // page)))
    lo, hi = page_spans(base, row_bytes, starts, stops, page)
    assert lo.shape == hi.shape
    assert all(x % page == 0 for x in lo.tolist() + hi.tolist())
    assert np.all(hi > lo) and np.all(lo[1:] > hi[:-1])   # sorted, disjoint, not touching
    got = set()
    for a, b in zip(lo.tolist(), hi.tolist()):
        got.update(range(a // page, b // page))
    assert got == want


def test_will_need_advises_a_mapped_file_and_changes_nothing(tmp_path):
    f = tmp_path / "a.npy"
    rng = np.random.default_rng(3)
    want = rng.integers(-127, 127, size=(5000, 128)).astype(np.int8)
    np.save(f, want)
    m = np.load(f, mmap_mode="r")
    starts, stops = np.array([10, 4000, 12]), np.array([40, 4100, 30])
    n = will_need(m.ctypes.data, m.strides[0], starts, stops)
    # 130 rows of 128 bytes in two places: at least their bytes, at most a page more each
    assert 130 * 128 <= n <= 130 * 128 + 4 * 16384
    np.testing.assert_array_equal(m, want)
    plain = np.ones((100, 16))
    assert will_need(plain.ctypes.data, plain.strides[0], np.array([0]), np.array([100])) > 0
    assert will_need(m.ctypes.data, m.strides[0], np.array([5]), np.array([5])) == 0
