"""Issue 11, on-disk side: writers across processes, readers' leases, and indexes handed over by
a stranger (paths that escape the folder, symbolic links, malformed manifests, forged headers).

Each test reproduces a defect that the storage layer had before (named in the test) and checks
the behaviour against a plain model of what must be on disk.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colengine.errors import IndexFormatError, LockTimeoutError, StaleIndexError
from colengine.index.exhaustive import ExhaustiveIndex
from colengine.storage import current_generation, writer_lock

DIM = 16
ROOT = Path(__file__).resolve().parents[1]


def _docs(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((int(rng.integers(2, 9)), DIM)).astype(np.float32)
        out.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return out


def _index(path: Path, n: int = 6, prefix: str = "d") -> ExhaustiveIndex:
    idx = ExhaustiveIndex.build(_docs(n, seed=n), [f"{prefix}{i}" for i in range(n)])
    idx.save(path)
    return idx


def _run(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT, check=False)


# -- writers --------------------------------------------------------------------------------
def test_stale_writer_gets_an_error_and_deleted_documents_stay_deleted(tmp_path):
    """Before: A deletes d0..d4 and saves; B (loaded earlier) adds 10 and saves: the deleted
    documents came back without a word."""
    path = tmp_path / "idx"
    _index(path, n=12)
    a, b = ExhaustiveIndex.load(path), ExhaustiveIndex.load(path)
    a.delete([f"d{i}" for i in range(5)])
    a.save(path)
    b.add(_docs(10, seed=99), [f"new{i}" for i in range(10)])
    with pytest.raises(StaleIndexError, match="reload"):
        b.save(path)
    on_disk = ExhaustiveIndex.load(path)
    assert sorted(on_disk.ids) == sorted(f"d{i}" for i in range(5, 12))
    # reload and reapply: both changes kept
    b = ExhaustiveIndex.load(path)
    b.add(_docs(10, seed=99), [f"new{i}" for i in range(10)])
    b.save(path)
    assert sorted(ExhaustiveIndex.load(path).ids) == sorted(
        [f"d{i}" for i in range(5, 12)] + [f"new{i}" for i in range(10)])


_WRITER = """
import sys, time
import numpy as np
from colengine.errors import StaleIndexError
from colengine.index.exhaustive import ExhaustiveIndex
path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(abs(hash(tag)) % 1000)
for i in range(n):
    while True:
        idx = ExhaustiveIndex.load(path)
        x = rng.standard_normal((3, 16)).astype(np.float32)
        idx.add([x / np.linalg.norm(x, axis=1, keepdims=True)], [f"{tag}{i}"])
        try:
            idx.save(path)
            break
        except StaleIndexError:
            continue   # another writer saved first: reload and reapply
print("ok")
"""


def test_two_processes_adding_at_once_lose_nothing(tmp_path):
    """Before: both picked the same next generation and the second removed the first's
    half-written folder; 3 of 4 runs left an unloadable index."""
    path = tmp_path / "idx"
    _index(path, n=3)
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [subprocess.Popen([sys.executable, str(script), str(path), tag, "6"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag in ("a", "b")]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    ids = set(ExhaustiveIndex.load(path).ids)
    assert ids == {"d0", "d1", "d2"} | {f"{t}{i}" for t in "ab" for i in range(6)}


def test_writer_lock_is_exclusive_across_processes(tmp_path):
    path = tmp_path / "idx"
    _index(path)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from colengine.storage import writer_lock
            with writer_lock({str(path)!r}):
                print("held", flush=True)
                time.sleep(30)
        """)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeoutError):
            with writer_lock(path, timeout=0.2):
                pass
        idx = ExhaustiveIndex.load(path)
        with pytest.raises(LockTimeoutError):
            from colengine.storage import save_bundle
            save_bundle(path, idx.to_bundle(), lock_timeout=0.2)
    finally:
        holder.kill()
        holder.wait()
    with writer_lock(path, timeout=5):       # a killed holder releases the lock
        with writer_lock(path, timeout=0):   # re-entrant in the same thread
            pass


def test_a_generation_is_kept_while_a_reader_maps_it(tmp_path):
    """Before: a generation was deleted two saves later even while a reader still mapped it."""
    path = tmp_path / "idx"
    _index(path)
    reader = ExhaustiveIndex.load(path)
    first = current_generation(path)
    writer = ExhaustiveIndex.load(path)
    for i in range(3):
        writer.add(_docs(1, seed=i), [f"x{i}"])
        writer.save(path)
    assert (path / f"g{first:06d}").is_dir()                 # leased: kept
    assert sorted(reader.ids) == [f"d{i}" for i in range(6)]  # and still readable
    q = np.asarray(_docs(1, seed=7)[0])[None]
    assert len(reader.search(q, k=3)[0]) == 3
    del reader
    gc.collect()
    writer.add(_docs(1, seed=9), ["x9"])
    writer.save(path)
    gens = sorted(p.name for p in path.iterdir() if p.name.startswith("g"))
    assert f"g{first:06d}" not in gens and len(gens) == 2      # current + previous


# -- a folder handed over by a stranger -----------------------------------------------------
def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path: Path, m: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "gen-dotdot", "other-gen"])
def test_array_paths_outside_the_generation_are_refused(tmp_path, kind, verify):
    path = tmp_path / "idx"
    _index(path)
    secret = tmp_path / "secret.npy"
    np.save(secret, np.zeros((3, DIM), np.float16))
    m = _manifest(path)
    name = next(iter(m["arrays"]))
    rel = {"dotdot": "../secret.npy", "absolute": str(secret),
           "gen-dotdot": "g000001/../../secret.npy", "other-gen": "g000002/x.npy"}[kind]
    m["arrays"][name]["file"] = rel
    _write_manifest(path, m)
    with pytest.raises(IndexFormatError, match="only 'g000001/") as e:
        ExhaustiveIndex.load(path, verify=verify)
    assert "bytes" not in str(e.value)     # no size of an outside file is ever reported


def test_symlinked_array_or_generation_folder_is_refused(tmp_path):
    path = tmp_path / "idx"
    _index(path)
    m = _manifest(path)
    entry = next(iter(m["arrays"].values()))
    target = path / entry["file"]
    outside = tmp_path / "outside.npy"
    outside.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(outside)                       # same bytes, but through a link
    with pytest.raises(IndexFormatError, match="symbolic link"):
        ExhaustiveIndex.load(path, verify=False)
    target.unlink()
    target.write_bytes(outside.read_bytes())
    ExhaustiveIndex.load(path)                       # restored: loads
    gdir = path / "g000001"
    moved = tmp_path / "gen-elsewhere"
    gdir.rename(moved)
    gdir.symlink_to(moved, target_is_directory=True)
    with pytest.raises(IndexFormatError, match="symbolic link"):
        ExhaustiveIndex.load(path)


def test_saving_over_a_foreign_folder_is_refused(tmp_path):
    """Before: a folder with someone else's manifest.json was overwritten."""
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "my web app", "version": 3}')
    (foreign / "notes.txt").write_text("mine")
    idx = ExhaustiveIndex.build(_docs(3, 0), ["a", "b", "c"])
    with pytest.raises(IndexFormatError, match="not a readable colengine index"):
        idx.save(foreign)
    assert json.loads((foreign / "manifest.json").read_text())["name"] == "my web app"
    assert sorted(p.name for p in foreign.iterdir()) == ["manifest.json", "notes.txt"]
    plain = tmp_path / "file.txt"
    plain.write_text("x")
    with pytest.raises(IndexFormatError, match="is a file"):
        ExhaustiveIndex.load(plain)


def _mutations() -> list[tuple[str, object]]:
    def drop(field):
        return lambda m: next(iter(m["arrays"].values())).pop(field)

    def setv(path_, value):
        def f(m):
            cur = m
            for k in path_[:-1]:
                cur = cur[k] if k != "*" else next(iter(cur.values()))
            cur[path_[-1]] = value
        return f

    return [
        ("file", drop("file")), ("bytes", drop("bytes")), ("shape", drop("shape")),
        ("blake2b", drop("blake2b")), ("dtype", drop("dtype")),
        ("arrays", setv(["arrays"], [])), ("meta", setv(["meta"], [])),
        ("kind", lambda m: m.pop("kind")), ("generation", setv(["generation"], "1")),
        ("shape", setv(["arrays", "*", "shape"], [-1])),
        ("dtype", setv(["arrays", "*", "dtype"], "|O")),
        ("dtype", setv(["arrays", "*", "dtype"], "not-a-dtype")),
        ("bytes", setv(["arrays", "*", "bytes"], True)),
    ]


@pytest.mark.parametrize("i", range(len(_mutations())))
def test_malformed_manifest_is_an_index_format_error_naming_the_field(tmp_path, i):
    """Before: KeyError / AttributeError / TypeError escaped from these."""
    field, mutate = _mutations()[i]
    path = tmp_path / "idx"
    _index(path)
    m = _manifest(path)
    mutate(m)
    _write_manifest(path, m)
    with pytest.raises(IndexFormatError, match=field):
        ExhaustiveIndex.load(path)


def test_deeply_nested_manifest_is_an_index_format_error(tmp_path):
    path = tmp_path / "idx"
    _index(path)
    (path / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(IndexFormatError, match="not valid JSON"):
        ExhaustiveIndex.load(path)


def test_forged_npy_header_cannot_make_a_huge_allocation(tmp_path):
    """Before: a header shape of 2**41 with mmap=False tried to allocate it (MemoryError)."""
    path = tmp_path / "idx"
    _index(path)
    m = _manifest(path)
    name, entry = next((k, v) for k, v in m["arrays"].items() if len(v["shape"]) == 2)
    fpath = path / entry["file"]
    header = {"descr": entry["dtype"], "fortran_order": False, "shape": (2**41, DIM)}
    with open(fpath, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 64)
    entry.update(shape=[2**41, DIM], bytes=fpath.stat().st_size)
    _write_manifest(path, m)
    with pytest.raises(IndexFormatError, match="would need"):
        ExhaustiveIndex.load(path, mmap=False, verify=False)


# -- property: any mutation of the manifest is a clean error or a correct load ---------------
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.text(max_size=8)
                     | st.floats(allow_nan=False), lambda c: st.lists(c, max_size=3)
                     | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8)


@settings(max_examples=int(os.environ.get("COLENGINE_HYPOTHESIS_EXAMPLES", "40")), deadline=None,
          derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_manifest_mutations_never_escape_as_other_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("prop") / "idx"
    original = _index(path)
    m = _manifest(path)
    mutated = copy.deepcopy(m)
    # pick a random place in the manifest and replace, drop or add something there
    cur = mutated
    while isinstance(cur, dict) and cur and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(cur)))
        if not isinstance(cur[key], (dict, list)):
            break
        cur = cur[key] if isinstance(cur[key], dict) else cur
        if not isinstance(cur, dict):
            break
    action = data.draw(st.sampled_from(["replace", "drop", "add"]))
    if isinstance(cur, dict) and cur:
        key = data.draw(st.sampled_from(sorted(cur)))
        if action == "replace":
            cur[key] = data.draw(_JSON)
        elif action == "drop":
            del cur[key]
        else:
            cur[data.draw(st.text(max_size=6))] = data.draw(_JSON)
    _write_manifest(path, mutated)
    try:
        loaded = ExhaustiveIndex.load(path, verify=data.draw(st.booleans()))
    except IndexFormatError:
        return
    assert list(loaded.ids) == list(original.ids)   # a load that succeeds is the real index


# -- tampered arrays whose checksums were updated to match (issue 11 item 11) ---------------
def _tamper(path: Path, name: str, change) -> None:
    """Rewrite array ``name`` with ``change(array)`` and make the manifest agree (size, shape,
    checksum): what a deliberate tamperer does. Loading must still refuse it."""
    from colengine.storage import _checksum

    m = _manifest(path)
    entry = m["arrays"][name]
    fpath = path / entry["file"]
    arr = np.array(np.load(fpath, allow_pickle=False))
    arr = change(arr)
    fpath.unlink()
    np.save(fpath, arr, allow_pickle=False)
    entry.update(shape=list(arr.shape), dtype=arr.dtype.str, bytes=fpath.stat().st_size,
                 blake2b=_checksum(fpath))
    _write_manifest(path, m)


def _set(i, v):
    def f(a):
        a[i] = v
        return a
    return f


@pytest.mark.parametrize("name, change, match", [
    ("offsets", _set(2, 0), "decrease|never decrease"),          # non-monotonic
    ("offsets", _set(-1, 10**6), "end"),                          # past the end
    ("offsets", _set(0, -1), "start"),                            # negative start
    ("ids_offsets", _set(1, -1), "decrease|start"),               # id offsets with -1
])
def test_tampered_exhaustive_arrays_fail_at_load(tmp_path, name, change, match):
    path = tmp_path / "idx"
    _index(path, n=6)
    _tamper(path, name, change)
    with pytest.raises(IndexFormatError, match=match):
        ExhaustiveIndex.load(path)


def test_tampered_plaid_and_bm25_arrays_fail_at_load(tiny_encoder, tmp_path):
    from colengine import Retriever
    from colengine.testing import sample_corpus

    corpus = sample_corpus()[:12]
    ids = [d["_id"] for d in corpus]

    def fresh(name):
        p = tmp_path / name
        Retriever.build(corpus, ids, model=tiny_encoder, index="plaid", bm25=True, path=p,
                        show_progress=False)
        return p

    cases = [
        ("index/centroid_exponents", lambda a: _set(0, 100)(a), "centroid_exponents must lie in"),
        ("index/centroid_q", lambda a: _set(0, -128)(a), "-128"),
        ("bm25/doc_terms", lambda a: _set(0, 10**6)(a), "do not agree|inconsistent"),
        ("bm25/score_indptr", lambda a: a[::-1].copy(), "inconsistent"),
        ("bm25/ids_utf8", lambda a: _set(0, ord("X"))(a), "different document ids"),
    ]
    for i, (name, change, match) in enumerate(cases):
        p = fresh(f"r{i}")
        Retriever.load(p, model=tiny_encoder)       # loads before the tampering
        _tamper(p, name, change)
        with pytest.raises(IndexFormatError, match=match):
            Retriever.load(p, model=tiny_encoder)


@pytest.mark.parametrize("offset", range(10, 70, 3))
def test_any_flipped_header_byte_is_an_index_format_error_or_a_correct_load(tmp_path, offset):
    """A flipped byte inside a ``.npy`` header used to escape as tokenize.TokenError (found by
    a long hypothesis run of the format helper)."""
    path = tmp_path / "idx"
    original = _index(path)
    m = _manifest(path)
    fpath = path / m["arrays"]["offsets"]["file"]
    data = bytearray(fpath.read_bytes())
    data[offset] ^= 0xFF
    fpath.write_bytes(bytes(data))
    try:
        loaded = ExhaustiveIndex.load(path, verify=False, mmap=False)
    except IndexFormatError:
        return
    assert list(loaded.ids) == list(original.ids)
