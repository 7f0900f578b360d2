"""Resumable streaming builds: the work folder of a :meth:`PlaidIndex.build_from_iterator`.

Layout (next to the index being built, ``<path>.building/`` by default)::

    state.json        what the build was asked for (its settings' fingerprint) and how far
                      pass 2 got: chunks, documents and tokens done, residual norm sum
    sampling/         a storage bundle written every minute or so during pass 1's reading:
                      the token sample so far (vectors, random keys, positions), the ids and
                      lengths read, how many chunks and tokens (a resumed pass 1 goes on from
                      there); removed once training is saved
    trained/          a storage bundle written at the end of pass 1: centroids, codec, ids,
                      document lengths (so a resumed build skips pass 1 and k-means)
    codes.npy         pass 2's outputs, preallocated at their final size and memory-mapped;
    residuals.npy     only the first ``tokens_done`` rows are trusted
    refine*.npy       (with ``refine``) the refinement vectors and int8 scales, likewise

Progress is recorded by flushing the two arrays and then replacing ``state.json`` atomically,
so a crash at any point leaves a state that names only rows that reached the disk. A resumed
build re-reads the chunks it already did (to check ids and lengths) without compressing them.
A folder made with other settings is refused, never silently mixed in.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from colengine.storage import Bundle, is_index, load_bundle, save_bundle

__all__ = ["BuildCheckpoint"]

_STATE = "state.json"
#: everything a build writes into its work folder (and so everything it may delete there)
_OWN_FILES = (_STATE, f".{_STATE}.tmp", "sampling", "trained", "codes.npy", "residuals.npy",
              "refine.npy", "refine_scale.npy")
_VERSION = 1
#: seconds between two progress records (each flushes the dirty pages of the output arrays)
_COMMIT_EVERY_S = 5.0


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class BuildCheckpoint:
    """One streaming build's work folder; ``settings`` (JSON-able) must match to resume."""

    def __init__(self, root: str | os.PathLike, settings: dict[str, Any]) -> None:
        self.root = Path(root)
        self.settings = json.loads(json.dumps(settings, sort_keys=True))
        self.state: dict[str, Any] = {"version": _VERSION, "settings": self.settings,
                                      "chunks": 0, "docs": 0, "tokens": 0, "norm_sum": 0.0}
        self._last = 0.0
        self._created_root = not self.root.exists()
        if (self.root / _STATE).is_file():
            try:
                old = json.loads((self.root / _STATE).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ValueError(f"{self.root}: unreadable build state ({e}); delete the folder "
                                 "to start over") from e
            if old.get("version") != _VERSION or old.get("settings") != self.settings:
                raise ValueError(
                    f"{self.root} holds an interrupted build with other settings "
                    f"({old.get('settings')}); delete it or build with the same settings")
            self.state = old
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            if self._created_root:   # remembered across an interruption: ours to remove
                (self.root / ".colengine-build").touch()
            _write_json_atomic(self.root / _STATE, self.state)

    # -- pass 1 ----------------------------------------------------------------------
    def save_sampling(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Pass 1's reading so far (replaced atomically: a crash keeps the previous one)."""
        save_bundle(self.root / "sampling", Bundle(kind="plaid-build-sampling", meta=meta,
                                                   arrays=arrays))

    def load_sampling(self) -> Bundle | None:
        """The last :meth:`save_sampling`, or ``None``."""
        if not is_index(self.root / "sampling"):
            return None
        return load_bundle(self.root / "sampling", kind="plaid-build-sampling", mmap=False)

    def drop_sampling(self) -> None:
        shutil.rmtree(self.root / "sampling", ignore_errors=True)

    @property
    def has_trained(self) -> bool:
        return is_index(self.root / "trained")

    def save_trained(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        save_bundle(self.root / "trained", Bundle(kind="plaid-build-trained", meta=meta,
                                                  arrays=arrays))
        self.drop_sampling()

    def load_trained(self) -> Bundle:
        return load_bundle(self.root / "trained", kind="plaid-build-trained", mmap=False)

    # -- pass 2 ----------------------------------------------------------------------
    @property
    def done(self) -> tuple[int, int, int, float]:
        """(chunks, documents, tokens, residual norm sum) already compressed and on disk."""
        s = self.state
        return int(s["chunks"]), int(s["docs"]), int(s["tokens"]), float(s["norm_sum"])

    def outputs(self, n_tokens: int, code_dtype, packed_dim: int, refine: str | None = None,
                dim: int = 0) -> tuple[np.ndarray, np.ndarray,
                                       tuple[np.ndarray | None, np.ndarray | None]]:
        """The memory-mapped ``codes [T]``, ``residuals [T, packed_dim]`` and, with ``refine``,
        the refinement (vectors ``[T, dim]``, int8 scales ``[T]`` or ``None``); created if new."""
        from colengine.index.plaid.refine import REFINE_KINDS
        from numpy.lib.format import open_memmap

        def arr(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
            p = self.root / name
            if p.is_file():
                a = open_memmap(p, mode="r+")
                if a.shape == shape and a.dtype == np.dtype(dtype):
                    return a
                del a
            return open_memmap(p, mode="w+", dtype=dtype, shape=shape)

        codes = arr("codes.npy", (n_tokens,), code_dtype)
        residuals = arr("residuals.npy", (n_tokens, packed_dim), np.uint8)
        ref: tuple[np.ndarray | None, np.ndarray | None] = (None, None)
        if refine:
            ref = (arr("refine.npy", (n_tokens, dim), REFINE_KINDS[refine]),
                   arr("refine_scale.npy", (n_tokens,), np.float32) if refine == "int8" else None)
        self._arrays = tuple(a for a in (codes, residuals, *ref) if a is not None)
        return codes, residuals, ref

    def progress(self, chunks: int, docs: int, tokens: int, norm_sum: float, *,
                 force: bool = False) -> None:
        """Record that everything up to ``tokens`` is written (throttled unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._last < _COMMIT_EVERY_S:
            return
        for a in self._arrays:
            a.flush()
        self.state.update(chunks=int(chunks), docs=int(docs), tokens=int(tokens),
                          norm_sum=float(norm_sum))
        _write_json_atomic(self.root / _STATE, self.state)
        self._last = now

    def remove(self) -> None:
        """Delete what the build wrote (state, trained centroids, output arrays), and the
        folder itself only if the build created it and nothing else is left in it: a
        ``resume_dir`` that already held the user's files keeps them."""
        self._arrays = ()
        for name in _OWN_FILES:
            p = self.root / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        try:
            if self._created_root or (self.root / ".colengine-build").is_file():
                (self.root / ".colengine-build").unlink(missing_ok=True)
                self.root.rmdir()          # only if empty
        except OSError:
            pass
