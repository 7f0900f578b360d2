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

Nothing here pickles: arrays are plain ``.npy`` loaded with ``allow_pickle=False`` and every
other value goes into the JSON manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from colengine.errors import IndexFormatError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "Bundle", "save_bundle", "load_bundle", "is_index"]

FORMAT_NAME = "colengine"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
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
    mpath = root / MANIFEST
    if not root.is_dir():
        raise IndexFormatError(f"{root}: no such index directory")
    if not mpath.is_file():
        raise IndexFormatError(f"{root}: not a colengine index (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFormatError(f"{mpath}: manifest is not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"{root}: not a colengine index (foreign manifest)")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(
            f"{root}: index format version {version!r} is not supported "
            f"(this colengine reads version {FORMAT_VERSION})"
        )
    return manifest


def is_index(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a readable colengine manifest."""
    try:
        _read_manifest(Path(path))
    except IndexFormatError:
        return False
    return True


def _current_generation(root: Path) -> int:
    try:
        return int(_read_manifest(root)["generation"])
    except (IndexFormatError, KeyError, TypeError, ValueError):
        return 0


def save_bundle(path: str | os.PathLike, bundle: Bundle) -> Path:
    """Write ``bundle`` to ``path`` atomically; returns the index directory.

    ``path`` may be new, or an existing colengine index (which is replaced as a whole).
    A non-empty directory that is not a colengine index is refused, so that a typo never
    writes into (and later cleans up) somebody else's folder.
    """
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise IndexFormatError(f"{root}: exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not (root / MANIFEST).is_file():
        raise IndexFormatError(f"{root}: refusing to write an index into a non-empty folder")
    root.mkdir(parents=True, exist_ok=True)
    for name in list(bundle.arrays) + list(bundle.files):
        if not _NAME_RE.match(name) or ".." in name.split("/"):
            raise ValueError(f"file name {name!r} must be path-safe ([A-Za-z0-9_.-] and '/')")

    prev = _current_generation(root)
    gen = prev + 1
    gdir = root / f"g{gen:06d}"
    if gdir.exists():  # left over by a crashed save that never reached the manifest swap
        shutil.rmtree(gdir)
    gdir.mkdir()
    entries: dict[str, Any] = {}
    for name, arr in bundle.arrays.items():
        arr = np.asarray(arr)
        if arr.dtype == object:
            raise TypeError(f"array {name!r} has dtype object; refusing to pickle")
        rel = f"{gdir.name}/{name}.npy"
        fpath = root / rel
        fpath.parent.mkdir(parents=True, exist_ok=True)
        with open(fpath, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
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
        "format_version": FORMAT_VERSION,
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

    # Keep this generation and the previous one (readers may still have it open).
    for child in root.iterdir():
        m = _GEN_RE.match(child.name)
        if m and int(m.group(1)) not in (gen, prev) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        elif child.name.startswith(f".{MANIFEST}.") and child.name.endswith(".tmp"):
            child.unlink(missing_ok=True)
    return root


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
    if kind is not None and manifest.get("kind") != kind:
        raise IndexFormatError(
            f"{root}: holds a {manifest.get('kind')!r} index, expected {kind!r}"
        )
    arrays: dict[str, np.ndarray] = {}
    for name, entry in manifest.get("arrays", {}).items():
        fpath = root / entry["file"]
        if not fpath.is_file():
            raise IndexFormatError(f"{root}: array file {entry['file']} is missing")
        if fpath.stat().st_size != entry["bytes"]:
            raise IndexFormatError(
                f"{root}: {entry['file']} is {fpath.stat().st_size} bytes, manifest says "
                f"{entry['bytes']} (truncated or modified)"
            )
        if verify and _checksum(fpath) != entry["blake2b"]:
            raise IndexFormatError(f"{root}: checksum mismatch in {entry['file']} (corrupted)")
        try:
            arr = np.load(fpath, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise IndexFormatError(f"{root}: cannot read {entry['file']}: {e}") from e
        if list(arr.shape) != entry["shape"] or arr.dtype.str != entry["dtype"]:
            raise IndexFormatError(
                f"{root}: {entry['file']} has shape {arr.shape} dtype {arr.dtype.str}, "
                f"manifest says {tuple(entry['shape'])} {entry['dtype']}"
            )
        arrays[name] = arr
    files: dict[str, Any] = {}
    for name, entry in manifest.get("files", {}).items():
        files[name] = _checked_file(root, manifest, name, entry, verify=verify)
    return Bundle(kind=manifest["kind"], meta=manifest.get("meta", {}), arrays=arrays, files=files)


def _checked_file(root: Path, manifest: dict[str, Any], name: str, entry: Any, *,
                  verify: bool) -> Path:
    """The path of a generation's non-array file, after checking that the manifest names
    it inside this generation's folder and that its size (and checksum) match."""
    rel = entry.get("file") if isinstance(entry, dict) else None
    gen = manifest.get("generation")
    if (not isinstance(rel, str) or not isinstance(gen, int) or not _NAME_RE.match(name)
            or ".." in name.split("/") or rel != f"g{gen:06d}/{name}"):
        raise IndexFormatError(f"{root}: manifest entry for file {name!r} is malformed")
    fpath = root / rel
    if not fpath.resolve().is_relative_to(root.resolve()):
        raise IndexFormatError(f"{root}: file {rel} points outside the index folder")
    if not fpath.is_file():
        raise IndexFormatError(f"{root}: file {rel} is missing")
    if fpath.stat().st_size != entry.get("bytes"):
        raise IndexFormatError(
            f"{root}: {rel} is {fpath.stat().st_size} bytes, manifest says {entry.get('bytes')} "
            "(truncated or modified)")
    if verify and _checksum(fpath) != entry.get("blake2b"):
        raise IndexFormatError(f"{root}: checksum mismatch in {rel} (corrupted)")
    return fpath


def sub_bundle(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The arrays under ``prefix/`` with the prefix removed."""
    p = prefix.rstrip("/") + "/"
    return {k[len(p):]: v for k, v in arrays.items() if k.startswith(p)}


def prefixed(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """``arrays`` with every name put under ``prefix/``."""
    p = prefix.rstrip("/") + "/"
    return {p + k: v for k, v in arrays.items()}
