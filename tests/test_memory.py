"""Releasing the resident pages of memory-mapped files (colengine.memory.release_mapped) and
saving large memory-mapped arrays a slice at a time (colengine.storage)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from colengine import storage
from colengine.memory import release_mapped
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
