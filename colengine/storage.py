"""Crash-safe persistence: one JSON manifest plus ``.npy`` arrays, memory-mapped on load.

Layout of an index directory::

    index_dir/
      manifest.json        the only file that is ever replaced; names the live generation
      g000003/             arrays of generation 3 (immutable once written)
        <name>.npy
        <name>             other files of the generation (e.g. ``metadata.sqlite``)
      g000002/             the previous generation, kept for readers that opened it

A save writes every array of the new generation into a fresh ``gNNNNNN/`` folder, fsyncs it,
then swaps ``manifest.json`` with ``os.replace`` (atomic on POSIX). A crash at any point leaves
either the old manifest (pointing at the old, untouched generation) or the new one (pointing at
a complete new generation): never a mix. Readers that already mapped the previous generation
keep working because it is only deleted one save later.

Writers and readers across processes:

* every save runs under the index's writer lock (:func:`writer_lock`: an exclusive ``fcntl``
  lock on ``index_dir/.lock``), so two processes never write generations at once; a writer
  that loaded generation N passes ``expected_generation=N`` and gets :class:`StaleIndexError`
  instead of overwriting a newer generation that another writer saved meanwhile;
* a loaded generation is leased: the reader holds a shared ``fcntl`` lock on the generation
  folder for as long as any array mapped from it is alive. A save deletes an old generation
  only when it can take that lock exclusively, i.e. when no reader maps it.

Loading trusts nothing in the folder: every path named by the manifest must be a plain file
of the generation's own folder (no ``..``, no absolute path, no symbolic link anywhere on the
way), the manifest's structure is checked field by field, and each ``.npy`` header is checked
against the manifest and the file size before any array is allocated or mapped.

Nothing here pickles: arrays are plain ``.npy`` loaded with ``allow_pickle=False`` and every
other value goes into the JSON manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from colengine.appended import AppendedRows, parts
from colengine.errors import IndexFormatError, LockTimeoutError, StaleIndexError
from colengine.memory import release_mapped

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "Bundle", "save_bundle", "load_bundle", "is_index",
           "writer_lock", "current_generation"]

FORMAT_NAME = "colengine"
#: version 2 adds array entries stored in two files (``"tail"``, see :func:`_write_generation`);
#: a manifest without them is still written as version 1, which older readers read
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
#: the file name suffix of an array's appended rows (``<name>.appended.npy``)
TAIL_SUFFIX = ".appended.npy"
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
_MAX_MANIFEST_BYTES = 64 << 20
_GEN_RE = re.compile(r"^g(\d{6})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
_HASH_CHUNK = 1 << 24


@dataclass
class Bundle:
    """What one save writes: a kind tag, JSON-able metadata and named numpy arrays.

    ``arrays`` names may contain ``/`` to group components (``"index/codes"``).
    ``files`` are other files of the generation, written and checked like the arrays: to
    save, a callable that writes the file at the path it is given; after a load, the
    file's path inside the generation (read-only; never executed).
    """

    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    files: dict[str, "Callable[[Path], None] | Path"] = field(default_factory=dict)
    #: after a load: the generation read, and the reader's lease on it (see :class:`_Lease`)
    generation: int | None = None
    lease: Any = field(default=None, repr=False, compare=False)


def _checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of ``root``, with its structure checked (:func:`_check_manifest`)."""
    mpath = root / MANIFEST
    if root.exists() and not root.is_dir():
        raise IndexFormatError(f"{root}: is a file, not an index directory")
    if not root.is_dir():
        raise IndexFormatError(f"{root}: no such index directory")
    if mpath.is_symlink() or not mpath.is_file():
        raise IndexFormatError(f"{root}: not a colengine index (no {MANIFEST})")
    if mpath.stat().st_size > _MAX_MANIFEST_BYTES:
        raise IndexFormatError(f"{mpath}: manifest is larger than {_MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise IndexFormatError(f"{mpath}: manifest is not valid JSON ({type(e).__name__}: "
                               f"{str(e)[:200]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"{root}: not a colengine index (foreign manifest)")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in _READABLE_VERSIONS:
        raise IndexFormatError(
            f"{root}: index format version {version!r} is not supported "
            f"(this colengine reads versions {', '.join(map(str, _READABLE_VERSIONS))})"
        )
    _check_manifest(mpath, manifest)
    return manifest


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_manifest(mpath: Path, m: dict[str, Any]) -> None:
    """Field-by-field structure of a manifest; any deviation is an IndexFormatError naming
    the manifest and the field (never a KeyError or TypeError later)."""

    def bad(field_: str, why: str) -> IndexFormatError:
        return IndexFormatError(f"{mpath}: field {field_!r} {why}")

    if not isinstance(m.get("kind"), str) or not m["kind"]:
        raise bad("kind", "must be a non-empty string")
    if not _is_int(m.get("generation")) or not 1 <= m["generation"] < 10**6:
        raise bad("generation", "must be an integer in [1, 999999]")
    if not isinstance(m.get("meta", {}), dict):
        raise bad("meta", "must be an object")
    for section in ("arrays", "files"):
        entries = m.get(section, {})
        if not isinstance(entries, dict):
            raise bad(section, "must be an object of name -> entry")
        for name, e in entries.items():
            where = f"{section}.{name}"
            if not _NAME_RE.match(name) or ".." in name.split("/"):
                raise bad(where, "has a name that is not path-safe")
            if not isinstance(e, dict):
                raise bad(where, "must be an object")
            if not isinstance(e.get("file"), str):
                raise bad(f"{where}.file", "must be a string")
            if not _is_int(e.get("bytes")) or e["bytes"] < 0:
                raise bad(f"{where}.bytes", "must be a non-negative integer")
            if not isinstance(e.get("blake2b"), str):
                raise bad(f"{where}.blake2b", "must be a string")
            if section == "arrays":
                shape = e.get("shape")
                if (not isinstance(shape, list) or len(shape) > 8
                        or not all(_is_int(x) and x >= 0 for x in shape)):
                    raise bad(f"{where}.shape", "must be a list of at most 8 non-negative integers")
                if not isinstance(e.get("dtype"), str):
                    raise bad(f"{where}.dtype", "must be a string")
                try:
                    dt = np.dtype(e["dtype"])
                except TypeError:
                    raise bad(f"{where}.dtype", f"{e['dtype']!r} is not a numpy dtype") from None
                if dt.hasobject or dt.kind not in "biuf":
                    raise bad(f"{where}.dtype", f"{e['dtype']!r} is not a plain numeric dtype")
                if "tail" in e:
                    t = e["tail"]
                    if m.get("format_version") != 2:
                        raise bad(f"{where}.tail", "needs format version 2")
                    if not isinstance(t, dict) or not isinstance(t.get("file"), str) \
                            or not isinstance(t.get("blake2b"), str):
                        raise bad(f"{where}.tail", "must be an object with 'file' and 'blake2b'")
                    for key in ("bytes", "rows"):
                        if not _is_int(t.get(key)) or t[key] < 0:
                            raise bad(f"{where}.tail.{key}", "must be a non-negative integer")
                    if not shape or t["rows"] > shape[0]:
                        raise bad(f"{where}.tail.rows", "exceeds the array's rows")


def is_index(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a readable colengine manifest."""
    try:
        _read_manifest(Path(path))
    except IndexFormatError:
        return False
    return True


def _current_generation(root: Path) -> int:
    return current_manifest_meta(root)[0]


def current_generation(path: str | os.PathLike) -> int:
    """The generation the manifest of ``path`` names now (0 when there is no index there)."""
    return _current_generation(Path(path))


def current_manifest_meta(path: str | os.PathLike) -> tuple[int, dict[str, Any]]:
    """(generation, meta) of the manifest of ``path`` now; ``(0, {})`` when there is no
    readable index there."""
    try:
        m = _read_manifest(Path(path))
    except (IndexFormatError, OSError):
        return 0, {}
    meta = m.get("meta")
    return int(m["generation"]), meta if isinstance(meta, dict) else {}


# -- the writer lock ----------------------------------------------------------------------
class _HeldLock:
    """This process's hold on one index's writer lock: re-entrant for the thread that has it."""

    def __init__(self) -> None:
        self.mutex = threading.RLock()
        self.depth = 0
        self.fd: int | None = None


_HELD: dict[str, _HeldLock] = {}
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike, timeout: float | None = None) -> Iterator[Path]:
    """Hold the writer lock of the index at ``path`` (created if absent) for the ``with`` block.

    An exclusive ``fcntl.flock`` on ``path/.lock``: one writer at a time across processes,
    re-entrant within a thread (``save_bundle`` takes it too). ``timeout`` seconds (``None``:
    wait forever) before :class:`LockTimeoutError`. The lock goes with the process: a writer
    killed while holding it releases it.
    """
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise IndexFormatError(f"{root}: is a file, not an index directory")
    root.mkdir(parents=True, exist_ok=True)
    key = str(root.resolve())
    with _HELD_GUARD:
        held = _HELD.setdefault(key, _HeldLock())
    deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
    if not held.mutex.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
        raise LockTimeoutError(f"{root}: writer lock held by another thread for {timeout} s")
    try:
        if held.depth == 0:
            held.fd = _flock_exclusive(root / LOCK_FILE, deadline, root, timeout)
        held.depth += 1
        try:
            yield root
        finally:
            held.depth -= 1
            if held.depth == 0 and held.fd is not None:
                fcntl.flock(held.fd, fcntl.LOCK_UN)
                os.close(held.fd)
                held.fd = None
    finally:
        held.mutex.release()


def _flock_exclusive(lock_path: Path, deadline: float | None, root: Path,
                     timeout: float | None) -> int:
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(lock_path, flags, 0o644)
    except OSError as e:
        raise IndexFormatError(f"{root}: cannot open the writer lock {LOCK_FILE} ({e})") from e
    delay = 0.005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                os.close(fd)
                raise LockTimeoutError(
                    f"{root}: another process held the writer lock for more than {timeout} s"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


# -- readers' leases on generations ------------------------------------------------------
class _Lease:
    """A shared ``flock`` on a generation folder, held while anything loaded from it lives.

    Memory-mapped arrays keep a reference to it; when the last one is garbage-collected the
    lock is released and a later save may delete the folder."""

    def __init__(self, gdir: Path) -> None:
        self.fd: int | None = None
        try:
            fd = os.open(gdir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
                         | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # a cleaner holds it exclusively: the folder is going away
            os.close(fd)
            return
        self.fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)


def _unleased(gdir: Path) -> bool:
    """True when no reader holds a lease on ``gdir`` (then it is locked for deletion)."""
    try:
        fd = os.open(gdir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _check_target(root: Path) -> None:
    """A save may go to an absent or empty folder, or to a colengine index; nothing else."""
    if root.is_symlink():
        raise IndexFormatError(f"{root}: is a symbolic link; refusing to write an index through it")
    if root.exists() and not root.is_dir():
        raise IndexFormatError(f"{root}: exists and is not a directory")
    if not root.is_dir():
        return
    others = [c.name for c in root.iterdir() if c.name != LOCK_FILE]
    if not others:
        return
    if not (root / MANIFEST).is_file():
        raise IndexFormatError(f"{root}: refusing to write an index into a non-empty folder "
                               f"that is not a colengine index")
    try:
        _read_manifest(root)
    except IndexFormatError as e:
        raise IndexFormatError(
            f"{root}: holds a {MANIFEST} that is not a readable colengine index ({e}); "
            "refusing to overwrite it") from None


def save_bundle(path: str | os.PathLike, bundle: Bundle, *,
                expected_generation: int | None = None,
                lock_timeout: float | None = None) -> Path:
    """Write ``bundle`` to ``path`` atomically under the writer lock; returns the directory.

    ``path`` may be absent, an empty folder, or an existing colengine index (which is
    replaced as a whole). Anything else (a file, a symbolic link, a non-empty folder, a
    folder with a foreign ``manifest.json``) is refused, so that a typo never writes into
    (and later cleans up) somebody else's folder. With ``expected_generation`` the save
    fails with :class:`StaleIndexError` unless that generation is still the current one.
    ``bundle.generation`` is set to the generation written.
    """
    root = Path(path)
    for name in list(bundle.arrays) + list(bundle.files):
        if not _NAME_RE.match(name) or ".." in name.split("/"):
            raise ValueError(f"file name {name!r} must be path-safe ([A-Za-z0-9_.-] and '/')")
    _check_target(root)
    with writer_lock(root, timeout=lock_timeout):
        _check_target(root)  # again under the lock: another writer may have created it
        gen = _write_generation(root, bundle, expected_generation)
    bundle.generation = gen
    return root


#: arrays larger than this are saved a slice at a time, releasing a memory-mapped source's
#: pages after each slice: saving a 13 GB memory-mapped array (a streamed build's refinement
#: vectors) otherwise leaves all of it resident in the saving process
_WRITE_SLICE_BYTES = 64 << 20


def _write_npy(f, arr: np.ndarray | AppendedRows) -> None:
    """``np.save(f, arr)``, a large array a slice at a time
    (:func:`colengine.memory.release_mapped` after each); a two-part store
    (:class:`~colengine.appended.AppendedRows`) one part after the other, never joined."""
    if isinstance(arr, AppendedRows):
        np.lib.format.write_array_header_1_0(f, {
            "descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False,
            "shape": arr.shape})
        for part in parts(arr):
            _write_rows(f, np.ascontiguousarray(part))
        return
    if arr.nbytes <= _WRITE_SLICE_BYTES or arr.ndim == 0 or not arr.flags.c_contiguous \
            or arr.dtype.kind not in "biuf":
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        return
    np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(arr))
    _write_rows(f, arr)


def _write_rows(f, arr: np.ndarray) -> None:
    """The raw bytes of C-contiguous ``arr``, a slice of rows at a time."""
    if arr.ndim == 0 or arr.shape[0] == 0:
        f.write(arr.tobytes())
        return
    step = max(1, _WRITE_SLICE_BYTES // max(1, arr.nbytes // arr.shape[0]))
    for a in range(0, arr.shape[0], step):
        f.write(memoryview(arr[a:a + step]).cast("B"))
        release_mapped(arr, a, a + step)


def _kept_base(root: Path, name: str, arr: Any, entry: dict[str, Any] | None
               ) -> dict[str, Any] | None:
    """The manifest entry (of the generation being replaced) of the file that holds ``arr``
    as saved (the base of a two-part store), or None: it must be a memory map of exactly
    that file's data (the same file or a link to it: nothing in an index's folder is ever
    written twice). The entry's own tail, if any, is not kept: the rows appended to the base
    are all in ``arr``'s tail and written anew."""
    if entry is None or not re.fullmatch(rf"g\d{{6}}/{re.escape(name)}\.npy", entry["file"]):
        return None   # (only ever a file of the generation's own folder, as loads check)
    base = arr.base if isinstance(arr, AppendedRows) else arr
    fname = getattr(base, "filename", None)
    if not isinstance(base, np.memmap) or fname is None:
        return None
    src = root / entry["file"]
    try:
        a, b = os.stat(fname), os.lstat(src)
    except OSError:
        return None
    if (a.st_ino, a.st_dev) != (b.st_ino, b.st_dev) or not stat.S_ISREG(b.st_mode) \
            or b.st_size != entry["bytes"] or list(base.shape) != [
                entry["shape"][0] - entry.get("tail", {}).get("rows", 0), *entry["shape"][1:]] \
            or base.dtype.str != entry["dtype"] or base.offset + base.nbytes != b.st_size:
        return None
    return entry


def _link(src: Path, dst: Path) -> bool:
    """Hard-link ``src`` as ``dst``; False where the file system refuses."""
    try:
        os.link(src, dst)
    except OSError:
        return False
    return True


def _write_generation(root: Path, bundle: Bundle, expected_generation: int | None) -> int:
    prev = _current_generation(root)
    if expected_generation is not None and prev != expected_generation:
        raise StaleIndexError(
            f"{root}: another writer saved generation {prev} after this copy was loaded at "
            f"generation {expected_generation}; reload the index and apply the change again "
            "(nothing was written)")
    gen = prev + 1
    gdir = root / f"g{gen:06d}"
    if gdir.is_symlink():
        gdir.unlink()
    elif gdir.exists():  # left over by a crashed save (we hold the lock: no one is writing it)
        shutil.rmtree(gdir)
    gdir.mkdir()
    entries: dict[str, Any] = {}
    old_entries = _read_manifest(root).get("arrays", {}) if prev else {}
    for name, arr in bundle.arrays.items():
        rel = f"{gdir.name}/{name}.npy"
        fpath = root / rel
        fpath.parent.mkdir(parents=True, exist_ok=True)
        kept = _kept_base(root, name, arr, old_entries.get(name))
        if kept is not None and not _link(root / kept["file"], fpath):
            kept = None   # a file system without hard links: written as any other
        if not isinstance(arr, AppendedRows):   # a two-part store is written part by part
            arr = np.asarray(arr)
        if arr.dtype == object:
            raise TypeError(f"array {name!r} has dtype object; refusing to pickle")
        if kept is not None:
            # the file as saved is linked, not written again; rows appended to it since (a
            # two-part store's tail) are written to a file of their own
            entries[name] = {"file": rel, "shape": list(arr.shape), "dtype": arr.dtype.str,
                             "bytes": kept["bytes"], "blake2b": kept["blake2b"]}
            if isinstance(arr, AppendedRows) and arr.n_tail:
                trel = f"{gdir.name}/{name}{TAIL_SUFFIX}"
                with open(root / trel, "wb") as f:
                    _write_npy(f, np.ascontiguousarray(arr.tail))
                    f.flush()
                    os.fsync(f.fileno())
                entries[name]["tail"] = {"file": trel, "rows": arr.n_tail,
                                         "bytes": (root / trel).stat().st_size,
                                         "blake2b": _checksum(root / trel)}
            continue
        with open(fpath, "wb") as f:
            _write_npy(f, arr)
            f.flush()
            os.fsync(f.fileno())
        entries[name] = {
            "file": rel,
            "shape": list(arr.shape),
            "dtype": arr.dtype.str,
            "bytes": fpath.stat().st_size,
            "blake2b": _checksum(fpath),
        }
    files: dict[str, Any] = {}
    for name, write in bundle.files.items():
        if not callable(write):
            raise TypeError(f"file {name!r}: expected a callable that writes it, got {type(write).__name__}")
        rel = f"{gdir.name}/{name}"
        fpath = root / rel
        fpath.parent.mkdir(parents=True, exist_ok=True)
        write(fpath)
        if not fpath.is_file():
            raise IndexFormatError(f"{root}: writing {rel} produced no file")
        with open(fpath, "rb+") as f:
            os.fsync(f.fileno())
        files[name] = {"file": rel, "bytes": fpath.stat().st_size, "blake2b": _checksum(fpath)}
    for d in sorted({p.parent for p in gdir.rglob("*") if p.is_file()} | {gdir}):
        _fsync_dir(d)

    manifest = {
        "format": FORMAT_NAME,
        "format_version": 2 if any("tail" in e for e in entries.values()) else 1,
        "kind": bundle.kind,
        "generation": gen,
        "meta": bundle.meta,
        "arrays": entries,
    }
    if files:
        manifest["files"] = files
    tmp = root / f".{MANIFEST}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)
    _fsync_dir(root)

    # Keep this generation, the previous one, and any that a reader still maps (leased).
    for child in root.iterdir():
        m = _GEN_RE.match(child.name)
        if (m and int(m.group(1)) not in (gen, prev) and child.is_dir()
                and not child.is_symlink() and _unleased(child)):
            shutil.rmtree(child, ignore_errors=True)
        elif child.name.startswith(f".{MANIFEST}.") and child.name.endswith(".tmp"):
            child.unlink(missing_ok=True)
    return gen


def load_bundle(
    path: str | os.PathLike,
    *,
    kind: str | None = None,
    mmap: bool = True,
    verify: bool = True,
) -> Bundle:
    """Read a bundle written by :func:`save_bundle`.

    Arrays are memory-mapped read-only when ``mmap`` is true and always loaded with
    ``allow_pickle=False``. ``verify`` re-hashes every file against the manifest, which
    catches tampering and silent corruption (one sequential read of the index); shapes,
    dtypes and sizes are checked either way, which catches truncation.
    Raises :class:`IndexFormatError` on anything unexpected.

    Safe against a concurrent writer: if the generation this reader started on is swapped
    out and cleaned up under it, the read starts over on the new manifest.
    """
    root = Path(path)
    for _ in range(_READ_ATTEMPTS):
        manifest = _read_manifest(root)
        try:
            return _load_generation(root, manifest, kind=kind, mmap=mmap, verify=verify)
        except IndexFormatError:
            if _current_generation(root) == manifest.get("generation"):
                raise  # the index really is damaged, not just replaced under us
    raise IndexFormatError(f"{root}: index kept changing while being read")


_READ_ATTEMPTS = 5


def _load_generation(root: Path, manifest: dict[str, Any], *, kind: str | None, mmap: bool,
                     verify: bool) -> Bundle:
    if kind is not None and manifest["kind"] != kind:
        raise IndexFormatError(
            f"{root}: holds a {manifest['kind']!r} index, expected {kind!r}"
        )
    gen = manifest["generation"]
    gdir = _generation_dir(root, gen)
    lease = _Lease(gdir)
    arrays: dict[str, np.ndarray] = {}
    for name, entry in manifest.get("arrays", {}).items():
        shape, dtype = tuple(entry["shape"]), np.dtype(entry["dtype"])
        tail = entry.get("tail")
        if tail is None:
            arrays[name] = _load_npy(root, gen, name + ".npy", entry, shape, dtype, mmap,
                                     verify, lease)
            continue
        n_tail = tail["rows"]
        base = _load_npy(root, gen, name + ".npy", entry, (shape[0] - n_tail, *shape[1:]),
                         dtype, mmap, verify, lease)
        rest = _load_npy(root, gen, name + TAIL_SUFFIX, tail, (n_tail, *shape[1:]), dtype,
                         mmap, verify, lease)
        arrays[name] = AppendedRows(base, rest, n_tail) if mmap else np.concatenate([base, rest])
    files: dict[str, Any] = {}
    for name, entry in manifest.get("files", {}).items():
        files[name] = _contained_file(root, gen, name, entry, "file", verify=verify)
    return Bundle(kind=manifest["kind"], meta=manifest.get("meta", {}), arrays=arrays, files=files,
                  generation=gen, lease=lease)


def _load_npy(root: Path, gen: int, name: str, entry: dict[str, Any], shape: tuple[int, ...],
              dtype: np.dtype, mmap: bool, verify: bool, lease: Any) -> np.ndarray:
    """One ``.npy`` file of generation ``gen``, checked (:func:`_contained_file`,
    :func:`_check_npy_header`) before it is opened; memory-mapped read-only with ``mmap``."""
    fpath = _contained_file(root, gen, name, entry, "array", verify=verify)
    _check_npy_header(root, fpath, entry, shape, dtype)
    try:
        arr = np.load(fpath, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise IndexFormatError(f"{root}: cannot read {entry['file']}: {e}") from e
    if arr.shape != shape or arr.dtype != dtype:
        raise IndexFormatError(
            f"{root}: {entry['file']} has shape {arr.shape} dtype {arr.dtype.str}, "
            f"manifest says {shape} {dtype.str}"
        )
    if isinstance(arr, np.memmap):
        arr._colengine_lease = lease  # type: ignore[attr-defined]  # the mapping holds it
    return arr


def entry_bytes(entry: dict[str, Any]) -> int:
    """Bytes of an array's files as a manifest entry lists them (its tail's included)."""
    return int(entry["bytes"]) + int(entry.get("tail", {}).get("bytes", 0))


def _generation_dir(root: Path, gen: int) -> Path:
    gdir = root / f"g{gen:06d}"
    try:
        st = os.lstat(gdir)
    except OSError:
        raise IndexFormatError(f"{root}: generation folder {gdir.name} is missing") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise IndexFormatError(f"{root}: {gdir.name} is not a plain folder (symbolic link?); "
                               "refusing to read through it")
    return gdir


def _contained_file(root: Path, gen: int, name: str, entry: dict[str, Any], what: str, *,
                    verify: bool) -> Path:
    """The path of a generation's file after checking, before anything is opened, that the
    manifest names it exactly as ``g<gen>/<name>``, that no part of the way is a symbolic
    link, that it stays inside ``root``, and that its size (and checksum) match."""
    rel = entry["file"]
    if rel != f"g{gen:06d}/{name}":
        raise IndexFormatError(
            f"{root}: manifest entry for {what} {name!r} names {rel!r}; only "
            f"'g{gen:06d}/{name}' is allowed (no other folder, no '..', no absolute path)")
    cur = root
    for part in rel.split("/"):
        cur = cur / part
        try:
            st = os.lstat(cur)
        except OSError:
            raise IndexFormatError(f"{root}: {what} file {rel} is missing") from None
        if stat.S_ISLNK(st.st_mode):
            raise IndexFormatError(f"{root}: {rel} goes through a symbolic link; refusing it")
    if not stat.S_ISREG(st.st_mode):
        raise IndexFormatError(f"{root}: {rel} is not a regular file")
    if not cur.resolve().is_relative_to(root.resolve()):
        raise IndexFormatError(f"{root}: {rel} points outside the index folder")
    if st.st_size != entry["bytes"]:
        raise IndexFormatError(
            f"{root}: {rel} is {st.st_size} bytes, manifest says {entry['bytes']} "
            "(truncated or modified)")
    if verify and _checksum(cur) != entry["blake2b"]:
        raise IndexFormatError(f"{root}: checksum mismatch in {rel} (corrupted)")
    return cur


def _check_npy_header(root: Path, fpath: Path, entry: dict[str, Any], shape: tuple[int, ...],
                      dtype: np.dtype) -> None:
    """The ``.npy`` header agrees with the manifest and the data fit the file exactly: checked
    before numpy allocates or maps anything (a forged header cannot ask for 2**41 elements)."""
    try:
        with open(fpath, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                hshape, fortran, hdtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                hshape, fortran, hdtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            data_start = f.tell()
    except Exception as e:  # noqa: BLE001 - numpy's parser of an untrusted header can raise
        # anything (ValueError, SyntaxError, tokenize.TokenError, ...): all mean "not an index"
        raise IndexFormatError(f"{root}: {entry['file']} has no valid .npy header "
                               f"({type(e).__name__}: {e})") from None
    if tuple(hshape) != shape or hdtype != dtype or fortran or hdtype.hasobject:
        raise IndexFormatError(
            f"{root}: {entry['file']} header says shape {tuple(hshape)} dtype {hdtype.str}"
            f"{' (Fortran order)' if fortran else ''}, manifest says {shape} {dtype.str}")
    need = data_start + int(np.prod(shape, dtype=object)) * dtype.itemsize
    if need != entry["bytes"]:
        raise IndexFormatError(
            f"{root}: {entry['file']} would need {need} bytes for shape {shape} "
            f"{dtype.str}, the file has {entry['bytes']}")


def sub_bundle(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The arrays under ``prefix/`` with the prefix removed."""
    p = prefix.rstrip("/") + "/"
    return {k[len(p):]: v for k, v in arrays.items() if k.startswith(p)}


def prefixed(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """``arrays`` with every name put under ``prefix/``."""
    p = prefix.rstrip("/") + "/"
    return {p + k: v for k, v in arrays.items()}
